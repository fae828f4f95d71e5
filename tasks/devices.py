"""Where training runs and in what precision: detected, not assumed."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# bf16 costs precision: on a CPU it is used only where it is clearly faster. Measured on a 2-core Xeon with
# AVX512-BF16 and no AMX: bf16 autocast at 0.6-0.85x fp32 for MiniLM-sized blocks, training and inference alike.
BF16_MIN_SPEEDUP = 1.25
# fp32 Linear layers at inference go to oneDNN instead of torch's own kernel (MKL's sgemm) only where oneDNN measures
# faster by this margin: on AMD EPYC (AVX512) MiniLM's feed-forward layers measured 1.06-1.30x at two threads in
# single measurements (1.10-1.14x in repeated ones) and 1.13x at one (MKL takes a slower path on AMD CPUs). A margin,
# not a noise bound: where the two kernels are equal a measurement may land either side, which costs nothing (the
# same answers within 2e-6, the same speed).
ONEDNN_MIN_SPEEDUP = 1.05
# The one thread count the oneDNN choice is measured at, whatever a process runs with: the package stage's offline
# predictions (all cores) and the service's workers (a share each) must take the same kernel, since the smoke test
# holds fp32 labels equal. One thread is a serving worker's usual share.
ONEDNN_MEASURED_THREADS = 1


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    threads: int
    reason: str


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX); without them PyTorch emulates bf16 and
    it is slower. With them it may still be slower (bf16_speedup says)."""
    return bool(cpu_flags() & set(NATIVE_BF16_FLAGS)) and torch.backends.mkldnn.is_available()


# The x86 instruction sets that decide how fast training and inference run here, fastest first, by the Linux flag
# that shows each: AMX multiplies bf16 tiles, AVX512-BF16 has bf16 dot products, AVX512 and AVX2 only fp32 (bf16
# emulated). CPUs of one name differ (a hypervisor may show only "Intel(R) Xeon(R) Processor"), so every benchmark
# names the tier beside the CPU.
CPU_INSTRUCTION_TIERS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))


def cpu_instruction_tier() -> str:
    """The fastest of CPU_INSTRUCTION_TIERS this CPU has ("AMX", "AVX512-BF16", "AVX512", "AVX2"); "other" for an
    x86 CPU with none of them and for any other architecture (an ARM CPU's bf16 is not told apart here)."""
    flags = cpu_flags()
    return next((name for flag, name in CPU_INSTRUCTION_TIERS if flag in flags), "other")


def machine_summary() -> dict:
    """What every benchmark's JSON says about the machine its figures come from: the CPU's name and instruction tier,
    the cores this process may use (its affinity and cgroup quota, not the host's count), torch and Python."""
    return {"cpu": cpu_name(), "instruction_tier": cpu_instruction_tier(), "cores": usable_cores(),
            "torch": torch.__version__, "python": platform.python_version()}


@functools.cache
def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def precision_cache_file() -> Path | None:
    """Where the measured bf16 speedup of this machine is kept (a fact of the machine, not of a project); None
    where the user has no home to keep it in."""
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no HOME and no passwd entry (an arbitrary uid in a container)
        return None
    return base / "regraft" / "cpu-precision.json"


def measure_bf16_speedup(repeats: int = 3) -> float:
    """fp32 time over bf16-autocast time of one transformer block's feed-forward layers (MiniLM's width),
    forward and backward, at the current thread count; the best of `repeats` each. Leaves torch's random state as
    it found it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
        x = torch.randn(256, 384)

    def timed(bf16: bool) -> float:
        best = float("inf")
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for attempt in range(repeats + 1):  # the first is a warm-up
                started = time.perf_counter()
                block(x).float().square().mean().backward()
                if attempt:
                    best = min(best, time.perf_counter() - started)
        return best

    return timed(False) / timed(True)


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fp32 Linear kernel (torch.ops.mkldnn._linear_pointwise)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return True


def measure_onednn_fp32_speedup(repeats: int = 5) -> float:
    """torch's own fp32 Linear time (MKL's sgemm) over oneDNN's, for one transformer block's feed-forward layers
    (MiniLM's width, 2,048 tokens), inference only, at ONEDNN_MEASURED_THREADS threads (restored after); the best of
    `repeats` each, the two timed in turns, each first every other time, so that a drift in the machine's speed
    favours neither. 0 where oneDNN's
    kernel fails on this machine. Leaves torch's random state as it found it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(2048, 384)
        up, down = torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384)

    def torch_linear(layer, rows):
        return torch.nn.functional.linear(rows, layer.weight, layer.bias)

    def onednn_linear(layer, rows):
        return torch.ops.mkldnn._linear_pointwise(rows, layer.weight, layer.bias, "none", [], "")

    best = {torch_linear: float("inf"), onednn_linear: float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(ONEDNN_MEASURED_THREADS)
    try:
        with torch.no_grad():
            for attempt in range(repeats + 1):  # the first is a warm-up
                for linear in (list(best) if attempt % 2 else list(best)[::-1]):
                    started = time.perf_counter()
                    linear(down, linear(up, x))
                    if attempt:
                        best[linear] = min(best[linear], time.perf_counter() - started)
    except RuntimeError:  # a build whose oneDNN cannot run this kernel here: torch's own is used
        return 0.0
    finally:
        torch.set_num_threads(threads)
    return best[torch_linear] / best[onednn_linear]


_MEASURING = threading.Lock()


@functools.cache
def bf16_speedup(threads: int) -> float:
    """How much faster bf16 autocast runs than fp32 on this CPU at `threads` threads (measure_on_this_machine)."""
    return measure_on_this_machine("bf16_speedup", measure_bf16_speedup, threads)


@functools.cache
def onednn_fp32_speedup() -> float:
    """How much faster oneDNN computes an fp32 Linear layer than torch's own kernel on this CPU, at
    ONEDNN_MEASURED_THREADS threads whatever the caller runs with (measure_on_this_machine)."""
    return measure_on_this_machine("onednn_fp32_speedup", measure_onednn_fp32_speedup, ONEDNN_MEASURED_THREADS)


def measure_on_this_machine(name: str, measure, threads: int) -> float:
    """`measure()`, measured once per machine, torch version and thread count, under a file lock, and kept under
    `name` in precision_cache_file(): every process of the machine that asks at the same thread count reads the same
    value (the oneDNN choice is always asked at one count, so the package stage's offline predictions and the service
    that must equal them agree)."""
    key = hashlib.sha256(f"{cpu_name()}|{sorted(cpu_flags())}|{torch.__version__}|{threads}".encode()).hexdigest()[:16]
    path = precision_cache_file()
    with _MEASURING, contextlib.ExitStack() as stack:
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                lock = stack.enter_context(path.with_name(path.name + ".lock").open("a"))
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:
                # A cache that cannot be kept costs a measurement per process; for the oneDNN choice, two processes may
                # then choose differently near the margin (answers within 2e-6 of each other).
                path = None
        known = read_precision_cache(path)
        entry = known.get(key) if isinstance(known.get(key), dict) else {}
        if isinstance(entry.get(name), float):
            return entry[name]
        value = round(measure(), 3)
        if path is not None:
            known[key] = {**entry, name: value, "cpu": cpu_name(), "torch": torch.__version__, "threads": threads}
            try:
                handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    json.dump(known, out, indent=1)
                os.replace(staging, path)
            except OSError:
                pass
        return value


def read_precision_cache(path: Path | None) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, cpusets), narrowed by a cgroup v2 CPU quota
    (a Kubernetes CPU limit: 2 CPUs of a 64-core node)."""
    cores = max(1, len(os.sched_getaffinity(0)))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_threads(processes: int = 1) -> int:
    """OMP_NUM_THREADS when set (the usual way to share a machine), else the CPUs this process may use,
    split between the training processes."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, usable_cores() // processes)


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), and the largest trim threshold an int
# holds.
MMAP_THRESHOLD_MAX, TRIM_THRESHOLD_MAX = 32 << 20, (1 << 31) - 1


@functools.cache
def keep_freed_memory_for_reuse() -> bool:
    """Have glibc keep the memory torch frees instead of handing it back to the kernel: by default it returns freed
    memory at the top of its heap beyond a small threshold and serves large blocks from fresh pages, so each training
    step or batch faults in its activations again, every page zeroed by the kernel (100,000 page faults per 400 MB on
    an idle machine). Measured on a 2-core VM (AMD EPYC), paired runs: a training step 0.89x the time, a one-epoch
    full fine-tune 0.94x (whole process), the same weights to the bit and no more peak memory. Blocks up to 32 MB
    (glibc's ceiling) come from the heap, and up to 2 GB of freed heap stays with the process (a long-lived process, a
    serving worker, keeps the memory of its largest batch rather than returning it). Whether it took effect; a no-op
    where the C library is not glibc or another allocator is preloaded (jemalloc, tcmalloc: glibc's malloc then serves
    nothing)."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    if not glibc or os.environ.get("LD_PRELOAD", "").strip():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_MAX))) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_MAX)))


def choose_runtime(precision: str = "auto", threads: int = 0, processes: int = 1) -> Runtime:
    """CUDA when present, else CPU (its threads set, and freed memory kept for reuse); precision from the hardware
    unless configured."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        reason = f"CUDA device {torch.cuda.get_device_name(device)}"
    else:
        device = torch.device("cpu")
        if precision == "fp16":
            precision = "fp32"  # fp16 autocast on CPU is slow and needs loss scaling: not worth it
        reason = f"CPU {'with' if cpu_has_native_bf16() else 'without'} native bf16 instructions"
    threads = threads or default_threads(processes)
    if device.type == "cpu":
        torch.set_num_threads(threads)
        keep_freed_memory_for_reuse()
        if precision == "auto":
            precision, reason = cpu_precision(threads)
    return Runtime(device=device, precision=precision, threads=threads, reason=reason)


def cpu_precision(threads: int) -> tuple[str, str]:
    """bf16 where the CPU has native bf16 instructions and bf16 measures at least BF16_MIN_SPEEDUP times fp32 here;
    else fp32. With the reason, for the reports."""
    if not cpu_has_native_bf16():
        return "fp32", "CPU without native bf16 instructions"
    speedup = bf16_speedup(threads)
    chosen = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return chosen, (f"CPU with native bf16 instructions; bf16 measured {speedup:.2f}x fp32 here at {threads} "
                    f"thread(s), so {chosen} (bf16 from {BF16_MIN_SPEEDUP}x)")


def fp32_linears_on_onednn(runtime: Runtime) -> bool:
    """Whether fp32 inference on this runtime computes Linear layers with oneDNN (tasks/models.py OneDnnLinear): on
    the CPU in fp32, where this torch has the kernel and it measures at least ONEDNN_MIN_SPEEDUP times torch's own
    (at ONEDNN_MEASURED_THREADS, whatever the runtime's threads: one choice per machine)."""
    return (runtime.device.type == "cpu" and runtime.precision == "fp32" and onednn_linear_available()
            and onednn_fp32_speedup() >= ONEDNN_MIN_SPEEDUP)


def autocast(runtime: Runtime):
    """The autocast context for forward passes (a no-op in fp32)."""
    if runtime.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float16
    return torch.autocast(device_type=runtime.device.type, dtype=dtype)
