"""What the machine is: CPU model and the instruction-set extensions that decide which kernels runtimes use."""
from __future__ import annotations

import platform
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
