"""Reduced-precision serving variants of a candidate, checked before any of them is served.

At package time the candidate is run on the target holdout in fp32 and in each variant this machine offers: bf16
where it measures faster here (CUDA; a CPU with native bf16 that measures at least tasks/devices' threshold), and
dynamic int8 (torch's `quantize_dynamic` of the Linear layers) on a CPU, which is reported but never served (below).
A variant may serve only when its
predictions equal fp32's on at least VARIANT_MIN_AGREEMENT of the holdout texts, the interval of its macro-F1 minus
fp32's (paired bootstrap over the same texts) lies above the gate's non-inferiority margin, and a text's answer does
not depend on the other texts batched with it (VARIANT_MAX_BATCH_SPREAD); of those, the fastest is
chosen when it is at least VARIANT_MIN_SPEEDUP times fp32 on the same texts, else fp32. The choice, every variant's
figures and the reason go into the registry record and the model card (the package stage), and the service serves
the recorded precision where its own machine supports it, else fp32 (tasks/serving.py `serving_precision`).

Why these thresholds: 99% agreement is the issue's definition of a faithful variant, set before measuring; the
margin is the gate's own, so a variant is held to what a candidate is held to against production; 1.1x keeps a
variant whose speed gain is within timing noise from changing what is served for nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VARIANT_MIN_AGREEMENT = 0.99
VARIANT_MIN_SPEEDUP = 1.1
# The service batches concurrent requests, so a text's answer must not depend on what else is in its batch beyond
# rounding: at most a hundredth of probability (bf16 moves by up to 2e-3 here with padding and blocking, fp32 by
# about 1e-6; the 99% agreement bounds the labels that flip). Dynamic int8 quantizes each batch's activations with
# one scale, so its answers move with the batch's other texts by construction (0.21 on the demo's fine-tuned model
# here): it is measured and reported, never served.
VARIANT_MAX_BATCH_SPREAD = 0.01
BATCH_DEPENDENT = {"int8": "dynamic int8 scales each batch's activations together, so a text's answer depends on the "
                           "other texts batched with it"}
SOLO_TEXTS = 16
FP32, BF16, INT8 = "fp32", "bf16", "int8"


def offered_variants() -> tuple[list[str], str]:
    """The reduced precisions worth trying on this machine, and why: bf16 where it measures faster here (the same
    rule training and serving use), int8 on a CPU."""
    from tasks.devices import choose_runtime

    runtime = choose_runtime()
    offered = [BF16] if runtime.precision == BF16 else []
    if runtime.device.type == "cpu":
        offered.append(INT8)
    return offered, runtime.reason


def load_variant(folder: Path, precision: str, max_length: int, version: str = "variant"):
    """The packaged model in `precision`, as the service loads it (tasks/serving.py load_model)."""
    from tasks.serving import load_model

    return load_model(folder, version, max_length, precision)


@dataclass(frozen=True)
class Measured:
    """One precision's class probabilities on the holdout texts and the seconds it took (after a warm-up)."""

    proba: np.ndarray
    seconds: float
    batch_spread: float = 0.0  # the largest change of a probability between a text alone and in its batch


def measure(folder: Path, precision: str, texts: list[str], max_length: int) -> Measured:
    from tasks.serving import predict_probabilities

    loaded = load_variant(folder, precision, max_length)
    predict_probabilities(loaded, texts[:8])  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    proba = predict_probabilities(loaded, texts)
    seconds = time.perf_counter() - started
    solo = np.concatenate([predict_probabilities(loaded, [text]) for text in texts[:SOLO_TEXTS]])
    return Measured(proba, seconds, float(np.abs(solo - proba[:len(solo)]).max()))


def judge_variant(fp32: Measured, variant: Measured, truth: np.ndarray, margin: float, confidence: float,
                  draws: int = 1000, seed: int = 0, name: str = "") -> dict:
    """A variant against fp32 on the same texts: agreement, the macro-F1 difference with its paired interval, the
    speed-up, and whether it may serve (agreement and margin; the speed decides later, among those that may)."""
    from tasks.evaluate import confusion_counts, metrics_from_confusion, percentile_interval

    k = fp32.proba.shape[1]
    ours, theirs = variant.proba.argmax(axis=1), fp32.proba.argmax(axis=1)
    agreement = float((ours == theirs).mean())
    rows = np.random.default_rng(seed).integers(0, len(truth), size=(draws, len(truth)))
    point = {name: metrics_from_confusion(confusion_counts(truth, pred, k))["macro_f1"]
             for name, pred in (("variant", ours), ("fp32", theirs))}
    drawn = {name: metrics_from_confusion(confusion_counts(truth[rows], pred[rows], k))["macro_f1"]
             for name, pred in (("variant", ours), ("fp32", theirs))}
    difference = float(np.ravel(point["variant"] - point["fp32"])[0])
    interval = percentile_interval(drawn["variant"] - drawn["fp32"], confidence)
    problems = []
    if agreement < VARIANT_MIN_AGREEMENT:
        problems.append(f"agrees with fp32 on {agreement:.1%} of the texts (< {VARIANT_MIN_AGREEMENT:.0%})")
    if interval[0] is None or interval[0] < -margin:
        problems.append(f"macro-F1 difference interval {interval} reaches below -{margin:g} (the gate's margin)")
    if name in BATCH_DEPENDENT:
        problems.append(f"{BATCH_DEPENDENT[name]} (up to {variant.batch_spread:.1e} on {SOLO_TEXTS} texts alone)")
    elif variant.batch_spread > VARIANT_MAX_BATCH_SPREAD:
        problems.append(f"a text's probabilities change by up to {variant.batch_spread:.1e} with the other texts in "
                        f"its batch (> {VARIANT_MAX_BATCH_SPREAD:g})")
    return {"agreement": round(agreement, 4), "macro_f1_difference": round(difference, 4), "interval": interval,
            "batch_spread": float(f"{variant.batch_spread:.3g}"),
            "seconds": round(variant.seconds, 3), "speedup": round(fp32.seconds / variant.seconds, 2),
            "faithful": not problems, "problems": problems}


def choose_variant(judged: dict[str, dict]) -> tuple[str, str]:
    """The precision to serve: the fastest faithful variant at least VARIANT_MIN_SPEEDUP times fp32, else fp32;
    with the reason."""
    fast = {name: v for name, v in judged.items() if v["faithful"] and v["speedup"] >= VARIANT_MIN_SPEEDUP}
    if fast:
        best = max(fast, key=lambda name: fast[name]["speedup"])
        v = fast[best]
        return best, (f"{best}: {v['speedup']:.2f}x fp32 here, agrees with fp32 on {v['agreement']:.1%} of the target "
                      f"holdout, macro-F1 {v['macro_f1_difference']:+.3f} {v['interval']}")
    if not judged:
        return FP32, "fp32: no reduced precision is offered on this machine"
    why = "; ".join(f"{name} " + ("; ".join(v["problems"]) if v["problems"]
                                  else f"only {v['speedup']:.2f}x fp32 (< {VARIANT_MIN_SPEEDUP}x)")
                    for name, v in judged.items())
    return FP32, f"fp32: {why}"


def not_checked(why: str) -> dict:
    """The record when no variant could be checked: fp32 serves."""
    return {"precision": FP32, "reason": f"fp32: the reduced-precision variants were not checked: {why}", "rows": 0,
            "fp32_seconds": None, "machine": None, "variants": {}}


def check_variants(folder: Path, texts: list[str], labels: list[str], label_names: list[str], max_length: int,
                   margin: float, confidence: float, seed: int = 0) -> dict:
    """Measure fp32 and every offered variant on the holdout texts (labels: their true labels) and choose what
    serves. Returns the record for the registry and the model card."""
    from tasks.devices import cpu_name

    offered, why_offered = offered_variants()
    index = {name: i for i, name in enumerate(label_names)}
    truth = np.array([index[label] for label in labels])
    fp32 = measure(folder, FP32, texts, max_length)
    judged = {name: judge_variant(fp32, measure(folder, name, texts, max_length), truth, margin, confidence, seed=seed,
                                  name=name)
              for name in offered}
    precision, reason = choose_variant(judged)
    return {"precision": precision, "reason": reason, "rows": len(texts), "fp32_seconds": round(fp32.seconds, 3),
            "machine": f"{cpu_name()} ({why_offered})", "variants": judged}
