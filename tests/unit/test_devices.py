"""The CPU's precision is measured, not assumed from its flags: bf16 only where it is clearly faster here; and the
memory torch frees is kept for reuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks import devices
from tests.conftest import REPO


@pytest.fixture
def measured_here(monkeypatch, tmp_path):
    """A machine whose measurements nobody kept yet (a new process, as far as the measurements know)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    devices.bf16_speedup.cache_clear()
    devices.onednn_fp32_speedup.cache_clear()
    yield tmp_path
    devices.bf16_speedup.cache_clear()
    devices.onednn_fp32_speedup.cache_clear()


@pytest.fixture
def native_bf16(measured_here, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    return measured_here


@pytest.mark.parametrize("measured, expected", [(0.6, "fp32"), (1.2, "fp32"), (1.25, "bf16"), (3.0, "bf16")])
def test_auto_takes_bf16_only_where_it_measures_faster(native_bf16, monkeypatch, measured, expected):
    monkeypatch.setattr(devices, "measure_bf16_speedup", lambda: measured)
    runtime = devices.choose_runtime("auto", threads=1)
    assert runtime.precision == expected
    assert f"bf16 measured {measured:.2f}x fp32 here at 1 thread(s), so {expected}" in runtime.reason


def test_without_native_bf16_nothing_is_measured(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(devices, "measure_bf16_speedup", lambda: pytest.fail("measured without native bf16"))
    assert devices.choose_runtime("auto", threads=1).precision == "fp32"


def test_the_speedup_is_measured_once_per_machine_and_thread_count(native_bf16, monkeypatch):
    calls = []
    monkeypatch.setattr(devices, "measure_bf16_speedup", lambda: calls.append(1) or 0.7)
    assert devices.bf16_speedup(1) == devices.bf16_speedup(1) == 0.7
    assert devices.bf16_speedup(2) == 0.7
    assert len(calls) == 2  # one per thread count
    devices.bf16_speedup.cache_clear()  # another process reads the file
    assert devices.bf16_speedup(1) == 0.7 and len(calls) == 2
    cache = native_bf16 / "regraft" / "cpu-precision.json"
    assert {entry["threads"] for entry in json.loads(cache.read_text()).values()} == {1, 2}
    cache.write_text("{not json")  # a damaged cache is measured again and rewritten
    devices.bf16_speedup.cache_clear()
    assert devices.bf16_speedup(1) == 0.7 and len(calls) == 3
    assert len(json.loads(cache.read_text())) == 1


def test_without_a_home_it_measures_and_keeps_nothing(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(devices.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    monkeypatch.setattr(devices, "measure_bf16_speedup", lambda: 0.5)
    devices.bf16_speedup.cache_clear()
    try:
        assert devices.choose_runtime("auto", threads=1).precision == "fp32"
    finally:
        devices.bf16_speedup.cache_clear()


def test_the_measurement_compares_the_two_precisions_on_this_cpu_and_leaves_the_random_state():
    import torch

    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    speedup = devices.measure_bf16_speedup(repeats=1)
    assert 0.05 < speedup < 50
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX"),
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
    ({"avx2", "avx512f"}, "AVX512"), ({"avx2", "fma"}, "AVX2"), ({"sse4_2"}, "other"), (set(), "other")])
def test_benchmarks_name_the_fastest_instructions_the_cpu_has(monkeypatch, flags, expected):
    """CPUs of one name differ (a hypervisor may show only "Intel(R) Xeon(R) Processor"): the machine every benchmark
    states beside its figures names the instruction tier that decides its bf16 and fp32 speed."""
    import platform

    import torch

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    assert devices.machine_summary() == {"cpu": devices.cpu_name(), "instruction_tier": expected,
                                         "cores": devices.usable_cores(), "torch": torch.__version__,
                                         "python": platform.python_version()}


LARGE_BLOCK = """
import ctypes, sys, torch
from tasks.devices import keep_freed_memory_for_reuse
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory_for_reuse()
block = torch.ones(4 << 20)  # 16 MB, the process's first large block: an activation
print(libc.mallinfo2().hblkhd)  # bytes glibc holds in blocks of their own (mmap), returned to the kernel when freed
"""


@pytest.mark.skipif(not (hasattr(os, "confstr") and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")),
                    reason="glibc's setting")
def test_large_blocks_come_from_the_heap_that_keeps_freed_memory():
    """By default glibc gives a fresh process's 16 MB block pages of its own (mmap), handed back to the kernel when
    freed and faulted in, zeroed, when asked for again; with the setting it comes from the heap, which keeps what is
    freed. (The faults this saves depend on the kernel's reclaim and the machine's load: benchmarked, not tested.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}

    def mmapped_bytes(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", LARGE_BLOCK, mode], capture_output=True, text=True, cwd=REPO,
                              env=env, check=True)
        return int(done.stdout.split()[-1])

    assert mmapped_bytes("default") >= 16 << 20
    assert mmapped_bytes("keep") < 16 << 20


def cpu_only_with_onednn() -> bool:
    import torch

    return devices.onednn_linear_available() and not torch.cuda.is_available()


onednn = pytest.mark.skipif(not cpu_only_with_onednn(), reason="fp32 on oneDNN: a CPU machine with oneDNN's kernel")


@onednn
@pytest.mark.parametrize("measured, expected", [(0.9, False), (1.04, False), (1.05, True), (1.3, True)])
def test_fp32_linears_go_to_onednn_only_where_it_measures_faster(measured_here, monkeypatch, measured, expected):
    import torch

    monkeypatch.setattr(devices, "measure_onednn_fp32_speedup", lambda: measured)
    assert devices.fp32_linears_on_onednn(devices.Runtime(torch.device("cpu"), "fp32", 1, "")) is expected
    # One choice per machine: the package stage's offline predictions (all cores) and each service worker (a share)
    # take the same kernel.
    monkeypatch.setattr(devices, "measure_onednn_fp32_speedup", lambda: pytest.fail("measured again"))
    assert devices.fp32_linears_on_onednn(devices.Runtime(torch.device("cpu"), "fp32", 2, "")) is expected


def test_nothing_is_measured_for_runtimes_that_do_not_compute_in_fp32_on_the_cpu(measured_here, monkeypatch):
    import dataclasses

    import torch

    monkeypatch.setattr(devices, "measure_onednn_fp32_speedup", lambda: pytest.fail("measured for another runtime"))
    fp32 = devices.Runtime(torch.device("cpu"), "fp32", 1, "")
    assert not devices.fp32_linears_on_onednn(dataclasses.replace(fp32, precision="bf16"))
    assert not devices.fp32_linears_on_onednn(dataclasses.replace(fp32, device=torch.device("cuda", 0)))


def test_the_machine_keeps_both_measurements_in_one_entry(measured_here, monkeypatch):
    monkeypatch.setattr(devices, "measure_bf16_speedup", lambda: 2.0)
    monkeypatch.setattr(devices, "measure_onednn_fp32_speedup", lambda: 1.2)
    assert devices.bf16_speedup(1) == 2.0 and devices.onednn_fp32_speedup() == 1.2
    entries = json.loads((measured_here / "regraft" / "cpu-precision.json").read_text())
    assert [(e["bf16_speedup"], e["onednn_fp32_speedup"], e["threads"]) for e in entries.values()] == [(2.0, 1.2, 1)]
    monkeypatch.setattr(devices, "measure_bf16_speedup", lambda: pytest.fail("measured again"))
    monkeypatch.setattr(devices, "measure_onednn_fp32_speedup", lambda: pytest.fail("measured again"))
    devices.bf16_speedup.cache_clear()  # another process reads the file
    devices.onednn_fp32_speedup.cache_clear()
    assert devices.bf16_speedup(1) == 2.0 and devices.onednn_fp32_speedup() == 1.2


@onednn
def test_a_onednn_linear_computes_torchs_product_on_onednn_and_leaves_grad_and_autocast_to_torch(monkeypatch):
    import torch

    from tasks.models import OneDnnLinear

    torch.manual_seed(0)
    plain = torch.nn.Linear(384, 96)
    swapped = torch.nn.Linear(384, 96)
    swapped.load_state_dict(plain.state_dict())
    swapped.__class__ = OneDnnLinear
    rows = torch.randn(3, 17, 384)[:, ::2]  # batched and strided, as attention hands them on
    assert 0.05 < devices.measure_onednn_fp32_speedup(repeats=1) < 50  # measured on this CPU
    with torch.no_grad():
        expected = plain(rows)
    plain.weight.requires_grad_(False)  # bias-only training: grad enabled, no input or weight needing it
    plain(rows).square().mean().backward()
    torch_linear, calls = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: calls.append(1) or torch_linear(*args))
    with torch.no_grad():
        assert torch.allclose(swapped(rows), expected, atol=1e-5) and not calls  # oneDNN computed it
    swapped.weight.requires_grad_(False)
    swapped(rows).square().mean().backward()
    assert len(calls) == 1 and torch.allclose(swapped.bias.grad, plain.bias.grad, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert swapped(rows).dtype == torch.bfloat16 and torch.equal(swapped(rows), plain(rows))
    assert list(swapped.state_dict()) == ["weight", "bias"]


@onednn
def test_the_onednn_measurement_runs_at_one_thread_and_reads_a_failing_kernel_as_no_speedup(monkeypatch):
    import torch

    threads = torch.get_num_threads()
    seen = []
    torch_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *args: seen.append(torch.get_num_threads()) or torch_linear(*args))
    assert 0.05 < devices.measure_onednn_fp32_speedup(repeats=1) < 50
    assert set(seen) == {devices.ONEDNN_MEASURED_THREADS} and torch.get_num_threads() == threads

    def failing(*args):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", failing)
    assert devices.measure_onednn_fp32_speedup(repeats=1) == 0.0
    assert torch.get_num_threads() == threads
