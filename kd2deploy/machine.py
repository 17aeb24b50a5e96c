"""What the machine is: CPU model and the instruction-set extensions that decide which kernels runtimes use."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimddp", "sve")
# CPUs whose matrix units take bf16 natively: there bf16 autocast roughly doubles training throughput
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores_elsewhere(window_s: float = 0.5) -> float:
    """Cores other processes kept busy over a short window: /proc/stat's busy time minus this process's own.
    Unlike the load average, which decays over a minute, this reads the machine as it is now."""
    def sample() -> tuple[float, float]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = os.times()
        return busy, own.user + own.system + own.children_user + own.children_system
    try:
        busy0, own0 = sample()
        time.sleep(window_s)
        busy1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]  # not Linux: the load average is the best there is
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / window_s


def sleep_idle_openmp_threads_when_busy(window_s: float = 0.2) -> float | None:
    """Before torch loads OpenMP: if other processes keep at least half a core busy, set OMP_WAIT_POLICY=PASSIVE, so
    idle OpenMP threads sleep instead of spinning on cores those processes need (a 2-core machine with a 2-thread
    competitor trained 1.6x faster so). On a quiet machine spinning is faster (24% here), so it is left alone, as
    is a policy the user set. Returns the busy cores read (None when not checked)."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return None
    busy = busy_cores_elsewhere(window_s)
    if busy >= 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return busy
