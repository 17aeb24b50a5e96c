"""What the machine is: CPU model and the instruction-set extensions that decide which kernels runtimes use."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimddp", "sve")


def _cpuinfo_field(*names: str) -> str | None:
    """The first /proc/cpuinfo line's value for any of `names` (None off Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() in names), None)


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set extensions that decide which INT8/FP16 kernels a runtime can use."""
    present = set((_cpuinfo_field("flags", "Features") or "").split())
    return [flag for flag in CPU_FLAGS if flag in present]


def gpu_info() -> dict[str, str] | None:
    """Name and driver version of the first NVIDIA GPU, from nvidia-smi (no torch needed); Jetson boards have no
    nvidia-smi, so there the L4T release names the driver stack and torch, when installed, the GPU."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=False)
        if result.returncode == 0 and result.stdout.strip():
            name, driver = (part.strip() for part in result.stdout.strip().splitlines()[0].rsplit(",", 1))
            return {"name": name, "driver": driver}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    tegra = Path("/etc/nv_tegra_release")
    if not tegra.is_file():
        return None
    name = "NVIDIA Jetson"
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
    except ImportError:
        pass
    return {"name": name, "driver": tegra.read_text().splitlines()[0].strip("# ").strip()}
