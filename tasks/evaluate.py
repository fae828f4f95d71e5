"""Stage evaluate: the same metrics for every model, split and group, with bootstrap intervals.

Every number comes from one function, `metrics_from_confusion`, applied to a confusion matrix (or a
stack of them: one per bootstrap resample). Per-group tables go through Fairlearn's MetricFrame with
metric functions built on that same function. Resamples are drawn within each group (stratified), and
every model is scored on the *same* resamples, so a difference between two models has its own interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from tasks.config import EvaluateConfig
from tasks.reports import (OVERALL, BootstrapKey, Comparison, Comparisons, Disparity, GroupBreakdown, GroupColumnInfo,
                           GroupMetrics, Interval, ModelResult, OverallMetrics, SplitReport, TransferGain,
                           WeightedModelResult, WeightedOverall, WeightedSplit, pair_name)

OTHER = "other"
SUMMARY_METRICS = ("accuracy", "macro_f1")


# ----------------------------------------------------------------------------- the one metrics function


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted). With 2-D index arrays (resamples x rows),
    one matrix per resample, built with a single bincount."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim == 1:
        codes = y_true * k + y_pred
        return np.bincount(codes, weights=weights, minlength=k * k).reshape(k, k)
    resamples = y_true.shape[0]
    codes = np.arange(resamples)[:, None] * k * k + y_true * k + y_pred
    flat_weights = None if weights is None else weights.ravel()
    return np.bincount(codes.ravel(), weights=flat_weights, minlength=resamples * k * k).reshape(resamples, k, k)


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/selection rate from (..., k, k) counts.

    Undefined values are NaN (an empty slice has no accuracy; a class absent from a slice has no
    recall there). Macro-F1 averages over the classes that occur in the slice's labels or predictions.
    """
    confusion = np.asarray(confusion, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = confusion.sum(axis=(-2, -1))
        hits = np.diagonal(confusion, axis1=-2, axis2=-1)
        support = confusion.sum(axis=-1)
        predicted = confusion.sum(axis=-2)
        present = (support + predicted) > 0
        f1 = np.where(present, 2 * hits / (support + predicted), np.nan)
        n_present = present.sum(axis=-1)
        return {
            "n": total,
            "accuracy": np.where(total > 0, hits.sum(axis=-1) / total, np.nan),
            "macro_f1": np.where(n_present > 0, np.nansum(f1, axis=-1) / n_present, np.nan),
            "precision": np.where(predicted > 0, hits / predicted, np.where(support > 0, 0.0, np.nan)),
            "recall": np.where(support > 0, hits / support, np.nan),
            "f1": f1,
            "selection_rate": np.where(total[..., None] > 0, predicted / total[..., None], np.nan),
        }


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, bins: int) -> float:
    """ECE: the row-weighted gap between confidence and accuracy over equal-width confidence bins."""
    if len(y_true) == 0:
        return float("nan")
    return float(resampled_calibration_error(proba, y_true, np.arange(len(y_true))[None, :], bins)[0])


def resampled_calibration_error(proba: np.ndarray, y_true: np.ndarray, idx: np.ndarray, bins: int) -> np.ndarray:
    """The ECE of each resample (rows of `idx`, indexes into the rows): on a holdout of a few dozen rows one row
    crossing a bin edge moves the ECE by a hundredth (the commons-speeches holdout, 58 rows: 0.146 at T = 0.3058,
    0.160 at T = 0.3060), so it is reported with its bootstrap interval like every other metric."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    resamples, n = idx.shape
    # One bin index per (resample, bin), so one bincount gives every resample's bins.
    flat = (which[idx] + bins * np.arange(resamples)[:, None]).ravel()
    sums = [np.bincount(flat, weights=values[idx].ravel(), minlength=resamples * bins).reshape(resamples, bins)
            for values in (confidence, correct)]
    return np.abs(sums[0] - sums[1]).sum(axis=1) / n


def slice_metrics(y_true: np.ndarray, proba: np.ndarray, labels: list[str], ece_bins: int) -> dict:
    """Every metric of one slice (a split, or the rows of one group) for one model."""
    k = len(labels)
    y_pred = proba.argmax(axis=1)
    confusion = confusion_counts(y_true, y_pred, k)
    m = metrics_from_confusion(confusion)
    return {
        "n": int(len(y_true)),
        "accuracy": _num(m["accuracy"]),
        "macro_f1": _num(m["macro_f1"]),
        "ece": expected_calibration_error(proba, y_true, ece_bins),
        "per_class": {label: {"precision": _num(m["precision"][i]), "recall": _num(m["recall"][i]),
                              "f1": _num(m["f1"][i]), "support": int(confusion[i].sum()),
                              "selection_rate": _num(m["selection_rate"][i])}
                      for i, label in enumerate(labels)},
        "confusion": confusion.astype(int).tolist(),
    }


def _num(value) -> float | None:
    """JSON-safe float: NaN becomes None (the gate treats None as missing evidence)."""
    value = float(value)
    return None if np.isnan(value) else value


# ----------------------------------------------------------------------------- intervals


def percentile_interval(samples: np.ndarray, confidence: float) -> list[float | None]:
    """Percentile bootstrap interval over the resamples where the statistic exists."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return [None, None]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal, accurate far into the tail (erfc, not 1 - cdf). The standard library's, so
    the gate and decide stages need no scipy (about a second of import each)."""
    return 0.5 * math.erfc(float(z) / math.sqrt(2.0))


def wilson_interval(successes: float, n: int, confidence: float) -> list[float | None]:
    """Wilson score interval for a proportion: sensible at small n and at 0 or 1, unlike the bootstrap."""
    if n <= 0:
        return [None, None]
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def stratified_resamples(strata: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices; each resample redraws every stratum's rows from that stratum only,
    so every group keeps its size in every resample."""
    rng = np.random.default_rng(seed)
    n = len(strata)
    out = np.empty((resamples, n), dtype=np.int64)
    for value in pd.unique(strata):
        members = np.flatnonzero(strata == value)
        out[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return out


# ----------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class GroupColumn:
    """One grouping of a split's rows, with rare groups merged into "other"."""

    name: str
    values: np.ndarray       # group per row after merging
    eligible: list[str]      # groups with at least min_group_size rows: these are judged
    sizes: dict[str, int]    # rows per group after merging
    merged: dict[str, int]   # original groups merged into "other", with their row counts


def group_columns(frame: pd.DataFrame, columns: list[str], intersections: bool, min_size: int) -> list[GroupColumn]:
    """The configured group columns (and their intersection when asked), rare groups merged into "other"."""
    raw: dict[str, pd.Series] = {}
    for column in columns:
        if column in frame:
            # "|" separates the parts of a statistic's key in the bootstrap table (BootstrapKey.to_str).
            raw[column] = frame[column].astype("str").where(frame[column].notna(), "(missing)").str.replace("|", "/")
    if intersections and len(raw) > 1:
        name = " x ".join(raw)
        raw[name] = pd.Series([" & ".join(parts) for parts in zip(*raw.values())], index=frame.index)
    out = []
    for name, series in raw.items():
        counts = series.value_counts()
        rare = counts[counts < min_size]
        values = series.where(~series.isin(rare.index), OTHER).to_numpy()
        sizes = pd.Series(values).value_counts()
        out.append(GroupColumn(
            name=name, values=values, eligible=sorted(str(g) for g, n in sizes.items() if n >= min_size),
            sizes={str(g): int(n) for g, n in sizes.items()},
            merged={str(g): int(n) for g, n in rare.sort_values(ascending=False).items()},
        ))
    return out


def metric_frame_table(y_true: np.ndarray, y_pred: np.ndarray, groups: GroupColumn, labels: list[str]) -> pd.DataFrame:
    """Per-group accuracy, macro-F1, per-class recall and selection rate, via Fairlearn's MetricFrame
    with metric functions built on `metrics_from_confusion`."""
    from fairlearn.metrics import MetricFrame

    k = len(labels)

    def metric(name: str, index: int | None = None):
        def compute(y_t, y_p):
            value = metrics_from_confusion(confusion_counts(np.asarray(y_t), np.asarray(y_p), k))[name]
            return float(value if index is None else value[index])
        return compute

    functions = {"accuracy": metric("accuracy"), "macro_f1": metric("macro_f1")}
    for i, label in enumerate(labels):
        functions[f"recall:{label}"] = metric("recall", i)
        functions[f"selection_rate:{label}"] = metric("selection_rate", i)
    frame = MetricFrame(metrics=functions, y_true=y_true, y_pred=y_pred,
                        sensitive_features=pd.Series(groups.values, name=groups.name))
    return frame.by_group


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_statistics(y_true: np.ndarray, probas: dict[str, np.ndarray], columns: list[GroupColumn],
                         labels: list[str], cfg: EvaluateConfig, split: str,
                         reference: str) -> dict[BootstrapKey, np.ndarray]:
    """One array of resampled values per statistic; the difference `reference - other` of every model pair shares
    the resamples. NaN where a resample has no such slice."""
    k = len(labels)
    strata = columns[0].values if columns else np.zeros(len(y_true), dtype=int)
    idx = stratified_resamples(strata, cfg.bootstrap, cfg.seed)
    y_boot = y_true[idx]
    out: dict[BootstrapKey, np.ndarray] = {}
    for model, proba in probas.items():
        pred_boot = proba.argmax(axis=1)[idx]
        overall = metrics_from_confusion(confusion_counts(y_boot, pred_boot, k))
        for metric in SUMMARY_METRICS:
            out[BootstrapKey.overall(split, model, metric)] = overall[metric]
        out[BootstrapKey.overall(split, model, "ece")] = resampled_calibration_error(proba, y_true, idx, cfg.ece_bins)
        for column in columns:
            per_group = {}
            for group in column.eligible:
                member = (column.values == group).astype(float)[idx]
                m = metrics_from_confusion(confusion_counts(y_boot, pred_boot, k, weights=member))
                for metric in SUMMARY_METRICS:
                    out[BootstrapKey.of_group(split, model, column.name, group, metric)] = m[metric]
                    per_group.setdefault(metric, []).append(m[metric])
            for metric, rows in per_group.items():
                out[BootstrapKey.gap(split, model, column.name, metric)] = largest_gap(np.vstack(rows))
    add_paired_differences(out, list(probas), split, reference)
    return out


def add_paired_differences(out: dict[BootstrapKey, np.ndarray], models: list[str], split: str, reference: str) -> None:
    """`reference - other` for every statistic both models have, resample by resample (the paired interval)."""
    for model in models:
        if model == reference:
            continue
        for key in [key for key in out if key.split == split and key.model == reference]:
            other = key.for_model(model)
            if other in out:
                out[key.for_model(pair_name(reference, model))] = out[key] - out[other]


def bootstrap_table(samples: dict[BootstrapKey, np.ndarray]) -> pd.DataFrame:
    """The resamples as the bootstrap file keeps them: one column per statistic, named by its key's string form."""
    return pd.DataFrame({key.to_str(): values for key, values in samples.items()})


def comparisons_from(interval: dict[BootstrapKey, Interval],
                     estimate: Callable[[BootstrapKey], float | None]) -> Comparisons:
    """Every paired statistic's point estimate and interval, by pair and then by `scope|metric`."""
    comparisons: Comparisons = {}
    for key, value in interval.items():
        if key.pair is not None:
            comparisons.setdefault(key.model, {})[key.comparison_name] = Comparison(estimate=estimate(key),
                                                                                   interval=value)
    return comparisons


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size: how many unweighted rows the weighted ones are worth."""
    weights = np.asarray(weights, dtype=float)
    return float(weights.sum() ** 2 / max(np.square(weights).sum(), 1e-300))


def weighted_split(y_true: np.ndarray, probas: dict[str, np.ndarray], weights: np.ndarray, labels: list[str],
                   cfg: EvaluateConfig, split: str,
                   reference: str = "candidate") -> tuple[WeightedSplit, dict[BootstrapKey, np.ndarray]]:
    """Every model's overall metrics on rows weighted by importance (the source holdout made to look like the
    target), with bootstrap intervals on shared resamples, paired differences, and the effective sample size."""
    k = len(labels)
    idx = stratified_resamples(np.zeros(len(y_true), dtype=int), cfg.bootstrap, cfg.seed)
    samples: dict[BootstrapKey, np.ndarray] = {}
    points = {}
    for model, proba in probas.items():
        predicted = proba.argmax(axis=1)
        points[model] = metrics_from_confusion(confusion_counts(y_true, predicted, k, weights))
        resampled = metrics_from_confusion(confusion_counts(y_true[idx], predicted[idx], k, weights[idx]))
        for metric in SUMMARY_METRICS:
            samples[BootstrapKey.overall(split, model, metric)] = resampled[metric]
    add_paired_differences(samples, list(probas), split, reference)
    interval = {key: percentile_interval(value, cfg.confidence) for key, value in samples.items()}
    models = {model: WeightedModelResult(overall=WeightedOverall(
                  **{m: _num(point[m]) for m in SUMMARY_METRICS},
                  intervals={m: interval[BootstrapKey.overall(split, model, m)] for m in SUMMARY_METRICS}))
              for model, point in points.items()}
    return WeightedSplit(split=split, n=int(len(y_true)), effective_sample_size=effective_sample_size(weights),
                         models=models, comparisons=comparisons_from(interval, lambda key: point_difference(models, key))
                         ), samples


def largest_gap(values: np.ndarray) -> np.ndarray:
    """Per resample (column), the largest minus the smallest group value; NaN with fewer than two groups."""
    present = (~np.isnan(values)).sum(axis=0)
    with np.errstate(invalid="ignore"), np.testing.suppress_warnings() as quiet:
        quiet.filter(RuntimeWarning)
        gap = np.nanmax(values, axis=0) - np.nanmin(values, axis=0)
    return np.where(present >= 2, gap, np.nan)


# ----------------------------------------------------------------------------- the whole split


def evaluate_split(frame: pd.DataFrame, probas: dict[str, np.ndarray], labels: list[str], group_names: list[str],
                   cfg: EvaluateConfig, split: str,
                   reference: str = "candidate") -> tuple[SplitReport, dict[BootstrapKey, np.ndarray]]:
    """Metrics, per-group tables, disparities and bootstrap intervals of every model on one split."""
    index = {label: i for i, label in enumerate(labels)}
    y_true = frame["label"].map(index).to_numpy()
    columns = group_columns(frame, group_names, cfg.intersections, cfg.min_group_size)
    samples = bootstrap_statistics(y_true, probas, columns, labels, cfg, split, reference)
    interval = {key: percentile_interval(value, cfg.confidence) for key, value in samples.items()}
    models: dict[str, ModelResult] = {}
    for model, proba in probas.items():
        overall = slice_metrics(y_true, proba, labels, cfg.ece_bins)
        overall["intervals"] = {m: interval[BootstrapKey.overall(split, model, m)] for m in (*SUMMARY_METRICS, "ece")}
        overall["intervals"]["accuracy_wilson"] = wilson_interval(overall["accuracy"] * overall["n"], overall["n"],
                                                                  cfg.confidence)
        y_pred = proba.argmax(axis=1)
        groups = {}
        for column in columns:
            table = metric_frame_table(y_true, y_pred, column, labels)
            groups[column.name] = GroupBreakdown(
                groups={
                    str(group): group_entry(
                        row, column, str(group), labels, cfg,
                        {m: interval.get(BootstrapKey.of_group(split, model, column.name, str(group), m), [None, None])
                         for m in SUMMARY_METRICS})
                    for group, row in table.iterrows()
                },
                disparity=disparity(table, column, interval, split, model),
            )
        models[model] = ModelResult(overall=OverallMetrics(**overall), groups=groups)
    report = SplitReport(
        n=int(len(frame)),
        models=models,
        comparisons=comparisons_from(interval, lambda key: point_difference(models, key)),
        group_columns={c.name: GroupColumnInfo(sizes=c.sizes, eligible=c.eligible, merged_into_other=c.merged,
                                               min_group_size=cfg.min_group_size) for c in columns},
        missing_group_columns=[c for c in group_names if c not in frame],
    )
    return report, samples


def group_entry(row: pd.Series, column: GroupColumn, group: str, labels: list[str], cfg: EvaluateConfig,
                intervals: dict) -> GroupMetrics:
    n = column.sizes.get(group, 0)
    accuracy = _num(row["accuracy"])
    entry = {
        "n": n,
        "eligible": group in column.eligible,
        "merged": group == OTHER and bool(column.merged),
        "accuracy": accuracy,
        "macro_f1": _num(row["macro_f1"]),
        "recall": {label: _num(row[f"recall:{label}"]) for label in labels},
        "selection_rate": {label: _num(row[f"selection_rate:{label}"]) for label in labels},
        "intervals": dict(intervals),
    }
    if accuracy is not None and n < cfg.small_n:
        entry["intervals"]["accuracy_wilson"] = wilson_interval(accuracy * n, n, cfg.confidence)
    return GroupMetrics(**entry)


def disparity(table: pd.DataFrame, column: GroupColumn, interval: dict[BootstrapKey, Interval], split: str,
              model: str) -> dict[str, Disparity]:
    """Largest gap, smallest ratio and worst group among the groups large enough to judge."""
    eligible = table.loc[[g for g in table.index if str(g) in column.eligible]]
    out = {}
    for metric in SUMMARY_METRICS:
        values = eligible[metric].dropna()
        if len(values) < 2:
            out[metric] = Disparity(groups=len(values), gap=None, ratio=None, worst_group=None, worst_value=None,
                                    gap_interval=[None, None])
            continue
        out[metric] = Disparity(
            groups=int(len(values)),
            gap=float(values.max() - values.min()),
            ratio=float(values.min() / values.max()) if values.max() > 0 else None,
            worst_group=str(values.idxmin()),
            worst_value=float(values.min()),
            gap_interval=interval.get(BootstrapKey.gap(split, model, column.name, metric), [None, None]),
        )
    return out


def point_difference(models: dict[str, ModelResult] | dict[str, WeightedModelResult],
                     key: BootstrapKey) -> float | None:
    """The point estimate behind a paired key: model a's value minus model b's on the key's slice."""
    a, b = key.pair
    va, vb = slice_value(models[a], key), slice_value(models[b], key)
    return None if va is None or vb is None else float(va - vb)


def slice_value(result: ModelResult | WeightedModelResult, key: BootstrapKey) -> float | None:
    """One model's value of the statistic a key names: overall, in one group, or a column's gap."""
    if key.scope == OVERALL:
        return result.overall.metric(key.metric)
    if key.group is not None:
        column, group = key.group
        entry = result.groups[column].groups.get(group)
        return None if entry is None else entry.metric(key.metric)
    return result.groups[key.scope].disparity[key.gap_metric].gap


def transfer_gain(splits: dict[str, SplitReport], metric: str = "macro_f1") -> TransferGain:
    """Candidate minus TF-IDF on target_holdout: what transfer learning bought over a bag of words."""
    entry = splits["target_holdout"].comparison(
        BootstrapKey.overall("target_holdout", pair_name("candidate", "tfidf"), metric))
    if entry is None:
        return TransferGain(metric=metric, estimate=None, interval=[None, None], negative_transfer=None)
    high = entry.interval[1]
    return TransferGain(metric=metric, estimate=entry.estimate, interval=entry.interval,
                        # Called out when the whole interval is below zero: the fine-tuned model is worse than TF-IDF.
                        negative_transfer=bool(high is not None and high < 0),
                        below_zero=bool(entry.estimate is not None and entry.estimate < 0))
