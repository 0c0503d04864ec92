"""What this machine computes with: the CPU, whether it has native bf16 arithmetic, and torch's CPU kernels.

Why it matters: without native bf16 (x86 ``avx512_bf16`` or ``amx_bf16``; Arm ``bf16``), torch emulates bf16
matmuls, and a training step under bf16 ran 16x slower than in fp32 on an AVX2-only AMD EPYC
(``benchmarks/train_step.py``: 662 vs 10,697 tokens/s, issue 25). A CPU run given a bf16 preset is refused
(:func:`check_cpu_precision`) rather than quietly taking 16x longer; benchmarks print :func:`describe`.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from igpt.errors import UserError

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
"""dense bf16 FLOP/s of each GPU (datasheets, no sparsity): what MFU is taken against; a name matches a device name
that contains it (``NVIDIA A10G`` is an A10)"""

NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU feature flags (``/proc/cpuinfo``: x86 ``flags``, Arm ``Features``) that mean bf16 arithmetic in hardware"""


def cpu_flags() -> set[str]:
    """The CPU's feature flags: Linux's /proc/cpuinfo, macOS's sysctl (``FEAT_BF16`` -> ``bf16``); empty when
    neither answers."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                return set(value.split())
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            return {"bf16"} if out == "1" else set()
        except OSError:
            return set()
    return set()


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def native_bf16(flags: set[str] | None = None) -> bool:
    return bool((cpu_flags() if flags is None else flags) & set(NATIVE_BF16))


def describe() -> str:
    """One line for a benchmark's output: which CPU, its cores, native bf16, and the kernels torch dispatches to
    (ATen's CPU capability: AVX512, AVX2, DEFAULT, ...)."""
    import torch

    flags = cpu_flags()
    bf16 = ", ".join(sorted(flags & set(NATIVE_BF16)))
    return (f"CPU {cpu_name()}, {os.cpu_count()} cores; native bf16: {f'yes ({bf16})' if bf16 else 'no'}"
            f"; torch {torch.__version__} CPU kernels: {torch.backends.cpu.get_cpu_capability()}")


def check_cpu_precision(precision: str, use_gpu: bool, what: str, flags: set[str] | None = None) -> None:
    """Refuse bf16 training on CPU workers whose CPU (this machine's: a cluster's nodes are taken to be alike)
    has no native bf16."""
    if precision == "bf16" and not use_gpu and not native_bf16(flags):
        raise UserError(
            f"{what} trains in bf16 on CPU workers, but this CPU ({cpu_name()}) has no native bf16 "
            f"({' / '.join(NATIVE_BF16)} not in its flags): torch emulates it, and a step ran 16x slower than fp32 "
            "on such a CPU (benchmarks/train_step.py). Give --deepspeed.precision fp32 (or --deepspeed.preset cpu), "
            "or train on GPU workers (--scaling.use_gpu)")
