"""Where training runs and in what precision: detected, not assumed."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    threads: int
    reason: str


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX): there bf16 autocast is
    faster than fp32; elsewhere PyTorch emulates bf16 and it is slower."""
    return bool(cpu_flags() & set(NATIVE_BF16_FLAGS)) and torch.backends.mkldnn.is_available()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return max(1, len(os.sched_getaffinity(0)))


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_threads(processes: int = 1) -> int:
    """OMP_NUM_THREADS when set (the usual way to share a machine), else the CPUs this process may use,
    split between the training processes."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, usable_cores() // processes)


def choose_runtime(precision: str = "auto", threads: int = 0, processes: int = 1) -> Runtime:
    """CUDA when present, else CPU; precision from the hardware unless configured."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        reason = f"CUDA device {torch.cuda.get_device_name(device)}"
    else:
        device = torch.device("cpu")
        if precision == "auto":
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
        if precision == "fp16":
            precision = "fp32"  # fp16 autocast on CPU is slow and needs loss scaling: not worth it
        native = "with" if cpu_has_native_bf16() else "without"
        reason = f"CPU {native} native bf16 instructions"
    threads = threads or default_threads(processes)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return Runtime(device=device, precision=precision, threads=threads, reason=reason)


def autocast(runtime: Runtime):
    """The autocast context for forward passes (a no-op in fp32)."""
    if runtime.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float16
    return torch.autocast(device_type=runtime.device.type, dtype=dtype)
