"""How is a model doing on data without labels? Its accuracy and macro-F1 on unlabelled target rows, estimated
from labelled validation rows and the model's calibrated probabilities, by three methods that fail differently:

- ATC (Garg et al., 2022): the confidence threshold above which validation rows are as many as the validation
  accuracy; the share of target rows above it estimates the target accuracy.
- Expected confusion (CBPE-style): calibrated probabilities say how likely each prediction is right, and which
  class it is otherwise; their sum over the target rows is an expected confusion matrix.
- Importance-weighted validation: validation rows weighted by the density ratio target/source (from a domain
  classifier), with the effective sample size that those weights leave.

Intervals come from one simulation: target and validation rows are resampled, each row's correctness is drawn
from the method's probability of being right, a wrong row's true class from the model's other probabilities,
and the metrics of every draw come from evaluate's `metrics_from_confusion`. numpy only; the weights are given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from tasks.evaluate import (confusion_counts, effective_sample_size, metrics_from_confusion, percentile_interval,
                            wilson_interval)
from tasks.render import interval_text

METHODS = ("atc", "expected_confusion", "importance_weighted")


@dataclass
class MethodEstimate:
    """One method's estimate of accuracy and macro-F1, each with its interval."""

    method: str
    accuracy: float
    accuracy_interval: list[float | None]
    macro_f1: float
    macro_f1_interval: list[float | None]
    detail: dict = field(default_factory=dict)


def check_inputs(val_proba: np.ndarray, val_labels: np.ndarray, target_proba: np.ndarray) -> None:
    if val_proba.ndim != 2 or target_proba.ndim != 2 or val_proba.shape[1] != target_proba.shape[1]:
        raise ValueError("validation and target probabilities must be (rows, classes) with the same classes")
    if len(val_proba) != len(val_labels) or len(val_proba) == 0 or len(target_proba) == 0:
        raise ValueError("estimation needs labelled validation rows and target rows")


def expected_confusion(correct: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Expected (true x predicted) counts when row i is right with probability correct[i], and otherwise of
    class j with the model's probability of j among the classes it did not predict."""
    k = proba.shape[1]
    predicted = proba.argmax(axis=1)
    others = wrong_class_distribution(proba, predicted)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (predicted, predicted), correct)
    for j in range(k):
        np.add.at(confusion, (np.full(len(proba), j), predicted), (1 - correct) * others[:, j])
    return confusion


def wrong_class_distribution(proba: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """P(true = j | the prediction is wrong): the other classes' probabilities renormalised (uniform when the
    model put all its mass on its prediction)."""
    others = proba.astype(float).copy()
    others[np.arange(len(proba)), predicted] = 0.0
    total = others.sum(axis=1, keepdims=True)
    uniform = np.ones_like(others) / max(proba.shape[1] - 1, 1)
    uniform[np.arange(len(proba)), predicted] = 0.0
    return np.where(total > 1e-12, others / np.where(total > 1e-12, total, 1.0), uniform)


def simulate_metrics(correct: np.ndarray, proba: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> dict:
    """Accuracy and macro-F1 of simulated labellings: draw d resamples `rows[d]` of the target rows, each right
    with probability correct[d, row] and otherwise of a class drawn from the model's other probabilities."""
    k = proba.shape[1]
    predicted = proba.argmax(axis=1)
    cumulative = np.cumsum(wrong_class_distribution(proba, predicted), axis=1)
    pred = predicted[rows]
    is_right = rng.random(rows.shape) < correct
    wrong = (rng.random(rows.shape)[..., None] > cumulative[rows]).sum(axis=-1)
    truth = np.where(is_right, pred, np.minimum(wrong, k - 1))
    metrics = metrics_from_confusion(confusion_counts(truth, pred, k))
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def atc_threshold(val_confidence: np.ndarray, val_correct: np.ndarray) -> float:
    """The confidence t with as many validation rows above t as the validation accuracy says are right."""
    accuracy = float(np.mean(val_correct))
    if accuracy >= 1.0:
        return float(np.min(val_confidence)) - 1e-12
    return float(np.quantile(val_confidence, 1 - accuracy))


def atc_estimate(val_proba, val_labels, target_proba, confidence: float, draws: int, seed: int) -> MethodEstimate:
    """Average thresholded confidence, with both samples resampled in every draw (the threshold is refit)."""
    rng = np.random.default_rng(seed)
    val_conf, target_conf = val_proba.max(axis=1), target_proba.max(axis=1)
    val_correct = val_proba.argmax(axis=1) == val_labels
    threshold = atc_threshold(val_conf, val_correct)
    above = (target_conf > threshold).astype(float)
    val_rows = rng.integers(0, len(val_proba), size=(draws, len(val_proba)))
    thresholds = np.array([atc_threshold(val_conf[r], val_correct[r]) for r in val_rows])
    rows = rng.integers(0, len(target_proba), size=(draws, len(target_proba)))
    correct = (target_conf[rows] > thresholds[:, None]).astype(float)
    draws_out = simulate_metrics(correct, target_proba, rows, rng)
    point = metrics_from_confusion(expected_confusion(above, target_proba))
    return MethodEstimate("atc", float(above.mean()), percentile_interval(draws_out["accuracy"], confidence),
                          float(point["macro_f1"]), percentile_interval(draws_out["macro_f1"], confidence),
                          {"threshold": threshold})


def expected_confusion_estimate(target_proba, confidence: float, draws: int, seed: int) -> MethodEstimate:
    """The calibrated probabilities taken at their word: each prediction is right with its own probability."""
    rng = np.random.default_rng(seed)
    right = target_proba.max(axis=1)
    rows = rng.integers(0, len(target_proba), size=(draws, len(target_proba)))
    draws_out = simulate_metrics(right[rows], target_proba, rows, rng)
    point = metrics_from_confusion(expected_confusion(right, target_proba))
    return MethodEstimate("expected_confusion", float(right.mean()), percentile_interval(draws_out["accuracy"], confidence),
                          float(point["macro_f1"]), percentile_interval(draws_out["macro_f1"], confidence))


def weighted_estimate(val_proba, val_labels, weights, confidence: float, draws: int, seed: int) -> MethodEstimate:
    """Validation metrics with each row weighted by its density ratio, bootstrapped over validation rows."""
    rng = np.random.default_rng(seed)
    k = val_proba.shape[1]
    predicted = val_proba.argmax(axis=1)
    weights = np.asarray(weights, dtype=float)
    point = metrics_from_confusion(confusion_counts(val_labels, predicted, k, weights))
    rows = rng.integers(0, len(val_proba), size=(draws, len(val_proba)))
    resampled = metrics_from_confusion(confusion_counts(val_labels[rows], predicted[rows], k, weights[rows]))
    return MethodEstimate("importance_weighted", float(point["accuracy"]),
                          percentile_interval(resampled["accuracy"], confidence), float(point["macro_f1"]),
                          percentile_interval(resampled["macro_f1"], confidence),
                          {"effective_sample_size": effective_sample_size(weights), "rows": len(weights)})


def measured_performance(predicted: np.ndarray, labels: np.ndarray, k: int, confidence: float) -> dict:
    """Accuracy (with its Wilson interval) and macro-F1 of predictions whose true labels are known."""
    metrics = metrics_from_confusion(confusion_counts(labels, predicted, k))
    hits = int((predicted == labels).sum())
    return {"accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"]), "rows": len(labels),
            "accuracy_interval": wilson_interval(hits, len(labels), confidence)}


def validated_performance(val_proba: np.ndarray, val_labels: np.ndarray, confidence: float) -> dict:
    """The model's measured performance on the labelled validation rows: the no-shift anchor."""
    return measured_performance(val_proba.argmax(axis=1), val_labels, val_proba.shape[1], confidence)


# The methods whose point estimate the combined one averages: both read the target rows' own outputs. Importance
# weighting widens the interval and can make the verdict INCONCLUSIVE, but its point is left out: where the
# target has rows unlike any validation row, its clipped weights are biased (benchmarks/estimate.py: mean error
# 0.065 against 0.027 and 0.033 on the census targets).
POINT_METHODS = ("atc", "expected_confusion")


def combine(estimates: list[MethodEstimate], metric: str) -> dict:
    """The methods together: the mean of POINT_METHODS, an interval that spans every used method's interval (each
    method's bias is unknown, so none is trusted more), and whether the methods agree (their intervals share a
    point)."""
    values = [getattr(e, metric) for e in estimates if e.method in POINT_METHODS]
    intervals = [getattr(e, f"{metric}_interval") for e in estimates]
    lows = [i[0] for i in intervals if i[0] is not None]
    highs = [i[1] for i in intervals if i[1] is not None]
    agree = bool(lows and highs and max(lows) <= min(highs))
    return {"estimate": float(np.mean(values)), "interval": [min(lows), max(highs)] if lows and highs else [None, None],
            "methods_agree": agree}


def estimate_performance(val_proba: np.ndarray, val_labels: np.ndarray, target_proba: np.ndarray,
                         weights: np.ndarray | None = None, *, confidence: float = 0.9, draws: int = 400,
                         min_effective_rows: float = 30, seed: int = 0) -> dict:
    """Every method's estimate on the target rows, their combination and a verdict: ESTIMATED when the methods'
    intervals overlap, INCONCLUSIVE when they disagree by more than their intervals. Importance weighting takes
    part only with at least `min_effective_rows` effective validation rows (else it is reported, not used)."""
    val_proba, target_proba = np.asarray(val_proba, dtype=float), np.asarray(target_proba, dtype=float)
    val_labels = np.asarray(val_labels, dtype=int)
    check_inputs(val_proba, val_labels, target_proba)
    methods = [atc_estimate(val_proba, val_labels, target_proba, confidence, draws, seed),
               expected_confusion_estimate(target_proba, confidence, draws, seed + 1)]
    notes = []
    if weights is not None:
        weighted = weighted_estimate(val_proba, val_labels, weights, confidence, draws, seed + 2)
        ess = weighted.detail["effective_sample_size"]
        weighted.detail["used"] = ess >= min_effective_rows
        methods.append(weighted)
        if not weighted.detail["used"]:
            notes.append(f"importance weighting left {ess:.0f} effective validation rows (< {min_effective_rows:g}): "
                         "reported, not used")
    used = [m for m in methods if m.detail.get("used", True)]
    combined = {metric: combine(used, metric) for metric in ("accuracy", "macro_f1")}
    agree = combined["accuracy"]["methods_agree"] and combined["macro_f1"]["methods_agree"]
    if not agree:
        notes.append("the methods disagree by more than their intervals: " + ", ".join(
            f"{m.method} {m.accuracy:.3f} {interval_text(m.accuracy_interval)}" for m in used))
    return {"verdict": "ESTIMATED" if agree else "INCONCLUSIVE", "confidence": confidence,
            "target_rows": len(target_proba), "validated": validated_performance(val_proba, val_labels, confidence),
            "methods": {m.method: asdict(m) for m in methods}, "estimate": combined, "notes": notes}


def performance_drop(estimate: dict, max_drop: float, metric: str = "accuracy") -> dict:
    """Has the model got worse than validated by more than `max_drop`, with confidence? When the interval of every
    method in POINT_METHODS (both read the traffic's own outputs) lies that far below the validated value. Importance
    weighting cannot raise or veto it: it sees which validation rows the traffic resembles, not the model's outputs."""
    validated = estimate["validated"][metric]
    highs = [m[f"{metric}_interval"][1] for name, m in estimate["methods"].items() if name in POINT_METHODS]
    degraded = bool(highs) and all(high is not None and validated - high > max_drop for high in highs)
    entry = estimate["estimate"][metric]
    return {"metric": metric, "validated": validated, "estimated": entry["estimate"], "interval": entry["interval"],
            "drop": validated - entry["estimate"], "max_drop": max_drop, "degraded": bool(degraded)}
