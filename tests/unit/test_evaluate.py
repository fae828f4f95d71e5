"""The one metrics function, intervals and the bootstrap, against sklearn, statsmodels' values and simulation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from tasks.config import EvaluateConfig
from tasks.evaluate import (
    bootstrap_statistics, confusion_counts, evaluate_split, expected_calibration_error, group_columns,
    metrics_from_confusion, percentile_interval, resampled_calibration_error, stratified_resamples, wilson_interval,
)
from tasks.reports import BootstrapKey

pytestmark = pytest.mark.unit
LABELS = ["negative", "neutral", "positive"]


def config(**changes) -> EvaluateConfig:
    base = dict(min_group_size=10, intersections=False, bootstrap=300, confidence=0.95, small_n=30, ece_bins=10, seed=0)
    return EvaluateConfig(**{**base, **changes})


def proba_from(pred: np.ndarray, k: int = 3, confidence: float = 0.8) -> np.ndarray:
    out = np.full((len(pred), k), (1 - confidence) / (k - 1))
    out[np.arange(len(pred)), pred] = confidence
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [7, 60])
def test_metrics_match_sklearn(seed, n):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 3, n), rng.integers(0, 3, n)
    m = metrics_from_confusion(confusion_counts(y, p, 3))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    present = sorted(set(y) | set(p))
    assert np.nan_to_num(m["precision"][present]) == pytest.approx(
        precision_score(y, p, labels=present, average=None, zero_division=0))
    assert np.nan_to_num(m["recall"][present]) == pytest.approx(recall_score(y, p, labels=present, average=None, zero_division=0))


def test_batched_confusion_equals_one_at_a_time():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    idx = rng.integers(0, 50, (20, 50))
    stacked = confusion_counts(y[idx], p[idx], 3)
    for b in range(20):
        assert (stacked[b] == confusion_counts(y[idx[b]], p[idx[b]], 3)).all()


def test_empty_slice_is_nan_not_an_error():
    m = metrics_from_confusion(np.zeros((3, 3)))
    assert np.isnan(m["accuracy"]) and np.isnan(m["macro_f1"])


def test_expected_calibration_error_of_a_perfectly_calibrated_and_an_overconfident_model():
    y = np.array([0] * 8 + [1] * 2)
    calibrated = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(calibrated, y, 10) == pytest.approx(0.0)
    overconfident = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(overconfident, y, 10) == pytest.approx(0.2)


def test_each_resample_has_the_ece_of_its_rows_and_the_split_reports_its_interval_and_the_paired_difference():
    """The resampled ECE is the ECE of the resample's rows (one bincount for all resamples must not mix them up),
    and evaluate reports the ECE's interval and the candidate-minus-baseline ECE difference with its interval."""
    rng = np.random.default_rng(3)
    proba = rng.dirichlet(np.ones(3), size=60)
    y = rng.integers(0, 3, size=60)
    idx = rng.integers(0, 60, size=(25, 60))
    by_resample = resampled_calibration_error(proba, y, idx, 10)
    assert by_resample == pytest.approx([expected_calibration_error(proba[rows], y[rows], 10) for rows in idx])

    frame = pd.DataFrame({"label": [LABELS[i] for i in y], "condition": ["a"] * 60})
    probas = {"candidate": proba, "tfidf": np.eye(3)[y] * 0.5 + 0.5 / 3}
    report, samples = evaluate_split(frame, probas, LABELS, ["condition"], config(), "target_holdout")
    low, high = report.models["candidate"].overall.intervals["ece"]
    assert low <= report.models["candidate"].overall.ece <= high
    difference = report.comparison(BootstrapKey.overall("target_holdout", "candidate-tfidf", "ece"))
    assert difference.estimate == pytest.approx(report.models["candidate"].overall.ece
                                                - report.models["tfidf"].overall.ece)
    assert difference.interval[0] <= difference.estimate <= difference.interval[1]


# Reference values from statsmodels 0.15 `proportion_confint(successes, n, 0.05, "wilson")`
# (statsmodels is not a dependency of regraft).
@pytest.mark.parametrize("successes,n,expected", [
    (0, 5, [0.0, 0.4344824648]),
    (5, 5, [0.5655175352, 1.0]),
    (3, 10, [0.1077912674, 0.6032218525]),
    (80, 100, [0.7111708344, 0.8666330667]),
])
def test_wilson_matches_statsmodels(successes, n, expected):
    assert wilson_interval(successes, n, 0.95) == pytest.approx(expected, abs=1e-9)


def test_stratified_resamples_keep_every_group_at_its_size():
    strata = np.array(["a"] * 30 + ["b"] * 3 + ["c"])
    idx = stratified_resamples(strata, 200, seed=0)
    for row in idx:
        assert (pd.Series(strata[row]).value_counts().to_dict()) == {"a": 30, "b": 3, "c": 1}


def test_rare_groups_are_merged_into_other_and_marked():
    frame = pd.DataFrame({"condition": ["A"] * 12 + ["B"] * 4 + ["C"] * 2, "site": ["x"] * 9 + ["y"] * 9})
    by_condition, by_site, both = group_columns(frame, ["condition", "site"], intersections=True, min_size=6)
    assert by_condition.eligible == ["A", "other"] and by_condition.merged == {"B": 4, "C": 2}
    assert by_site.eligible == ["x", "y"]
    assert both.name == "condition x site" and "A & x" in both.sizes


def test_a_resample_that_misses_a_group_does_not_crash():
    # Resamples are stratified by the first column; the second column's rare group is absent from many.
    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame({"label": rng.choice(LABELS, n), "condition": ["A"] * 30 + ["B"] * 30,
                          "site": ["x"] * 58 + ["y"] * 2})
    probas = {"candidate": proba_from(rng.integers(0, 3, n)), "tfidf": proba_from(rng.integers(0, 3, n))}
    cfg = config(min_group_size=1)
    report, samples = evaluate_split(frame, probas, LABELS, ["condition", "site"], cfg, "target_holdout")
    site_y = samples[BootstrapKey.of_group("target_holdout", "candidate", "site", "y", "accuracy")]
    assert np.isnan(site_y).any() and not np.isnan(site_y).all()
    lo, hi = report.models["candidate"].groups["site"].groups["y"].intervals["accuracy"]
    assert 0 <= lo <= hi <= 1
    assert report.missing_group_columns == []
    gap = samples[BootstrapKey.gap("target_holdout", "candidate-tfidf", "site", "accuracy")]
    assert gap.shape == (cfg.bootstrap,)


def test_single_class_and_single_row_groups():
    frame = pd.DataFrame({"label": ["positive"] * 20 + ["negative"], "condition": ["A"] * 20 + ["B"]})
    probas = {"candidate": proba_from(np.array([2] * 20 + [0]))}
    report, _ = evaluate_split(frame, probas, LABELS, ["condition"], config(min_group_size=1), "target_holdout")
    groups = report.models["candidate"].groups["condition"].groups
    assert groups["A"].accuracy == 1.0 and groups["A"].macro_f1 == 1.0
    assert groups["A"].recall["neutral"] is None  # no neutral rows: undefined, not 0
    assert groups["B"].intervals["accuracy_wilson"][0] > 0  # Wilson is not the degenerate [1, 1]


def test_missing_group_column_is_reported():
    frame = pd.DataFrame({"label": ["positive", "negative"] * 10})
    report, _ = evaluate_split(frame, {"candidate": proba_from(np.array([2, 0] * 10))}, LABELS, ["condition"],
                               config(), "target_holdout")
    assert report.missing_group_columns == ["condition"]


def test_bootstrap_intervals_cover_the_true_value_at_about_the_stated_rate():
    """Simulation: true accuracy 0.7 and a true candidate - champion difference of 0.05 on 300 rows;
    95% intervals should hold the truth in about 95% of 300 simulated test sets."""
    rng = np.random.default_rng(42)
    n, sims, cfg = 300, 300, config(bootstrap=400)
    covered_accuracy = covered_difference = 0
    for sim in range(sims):
        y = rng.integers(0, 3, n)
        # candidate right with p 0.70, champion with p 0.65; their errors are correlated as real models' are.
        u = rng.random(n)
        candidate = np.where(u < 0.70, y, (y + 1) % 3)
        champion = np.where(u < 0.65, y, (y + 2) % 3)
        samples = bootstrap_statistics(y, {"candidate": proba_from(candidate), "champion": proba_from(champion)}, [],
                                       LABELS, cfg.model_copy(update={"seed": sim}), "t", "candidate")
        lo, hi = percentile_interval(samples[BootstrapKey.overall("t", "candidate", "accuracy")], 0.95)
        covered_accuracy += lo <= 0.70 <= hi
        lo, hi = percentile_interval(samples[BootstrapKey.overall("t", "candidate-champion", "accuracy")], 0.95)
        covered_difference += lo <= 0.05 <= hi
    # Binomial(300, 0.95) lies within [0.91, 0.98] with probability > 0.99.
    assert 0.91 <= covered_accuracy / sims <= 0.98
    assert 0.91 <= covered_difference / sims <= 0.98
