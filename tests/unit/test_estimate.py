"""tasks/estimate.py on synthetic models whose calibration is known: labels drawn from the probabilities."""

import numpy as np
import pytest

from tasks.estimate import (atc_threshold, effective_sample_size, estimate_performance, expected_confusion,
                            performance_drop)


def calibrated_rows(n: int, sharpness: float, rng: np.random.Generator, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a Dirichlet, and labels drawn from them: a perfectly calibrated model."""
    proba = rng.dirichlet(np.full(k, 1.0 / sharpness), size=n)
    labels = np.array([rng.choice(k, p=p) for p in proba])
    return proba, labels


def test_calibrated_model_estimates_cover_the_truth_and_agree():
    rng = np.random.default_rng(1)
    val_proba, val_labels = calibrated_rows(1500, 3.0, rng)
    # The target: less confident rows (covariate shift), so the true accuracy drops.
    target_proba, target_labels = calibrated_rows(2000, 2.0, rng)
    truth = float(np.mean(target_proba.argmax(1) == target_labels))
    found = estimate_performance(val_proba, val_labels, target_proba, confidence=0.9, draws=300, seed=0)
    assert found["verdict"] == "ESTIMATED", found["notes"]
    low, high = found["estimate"]["accuracy"]["interval"]
    assert low <= truth <= high
    assert abs(found["estimate"]["accuracy"]["estimate"] - truth) < 0.03
    assert found["validated"]["accuracy"] - truth > 0.05  # the anchor (no adjustment) misses the drop
    for method in ("atc", "expected_confusion"):
        entry = found["methods"][method]
        assert entry["macro_f1_interval"][0] <= entry["macro_f1"] <= entry["macro_f1_interval"][1]
    drop = performance_drop(found, max_drop=0.02)
    assert drop["degraded"] and drop["drop"] > 0.05
    assert not performance_drop(found, max_drop=0.5)["degraded"]


def test_a_strong_confidence_shift_splits_the_methods():
    """Far less confident target rows: the calibrated probabilities stay right, ATC's threshold does not transfer
    (it assumes the confidence distribution keeps its shape). That disagreement is reported, not averaged away."""
    rng = np.random.default_rng(1)
    val_proba, val_labels = calibrated_rows(1500, 3.0, rng)
    target_proba, target_labels = calibrated_rows(2000, 1.0, rng)
    truth = float(np.mean(target_proba.argmax(1) == target_labels))
    found = estimate_performance(val_proba, val_labels, target_proba, confidence=0.9, draws=300)
    assert found["verdict"] == "INCONCLUSIVE"
    assert abs(found["methods"]["expected_confusion"]["accuracy"] - truth) < 0.03
    assert found["methods"]["atc"]["accuracy"] < truth - 0.08


def test_no_shift_is_not_a_drop():
    rng = np.random.default_rng(2)
    val_proba, val_labels = calibrated_rows(1000, 2.0, rng)
    target_proba, _ = calibrated_rows(1000, 2.0, rng)
    found = estimate_performance(val_proba, val_labels, target_proba, np.ones(1000), confidence=0.9, draws=300)
    assert found["verdict"] == "ESTIMATED"
    assert found["methods"]["importance_weighted"]["detail"]["effective_sample_size"] == pytest.approx(1000)
    assert not performance_drop(found, max_drop=0.05)["degraded"]


def test_methods_that_disagree_are_inconclusive_and_weights_alone_raise_no_drop():
    """Weights that pick out the validation rows the model gets wrong say the target is much worse than the
    target's own outputs say: the methods disagree, the verdict is INCONCLUSIVE, and no drop is claimed."""
    rng = np.random.default_rng(3)
    val_proba, val_labels = calibrated_rows(1000, 3.0, rng)
    target_proba, _ = calibrated_rows(1000, 3.0, rng)
    wrong = val_proba.argmax(1) != val_labels
    weights = np.where(wrong, 5.0, 0.2)
    found = estimate_performance(val_proba, val_labels, target_proba, weights, confidence=0.9, draws=300)
    assert found["methods"]["importance_weighted"]["detail"]["used"]
    assert found["verdict"] == "INCONCLUSIVE"
    assert any("disagree" in note for note in found["notes"])
    assert not performance_drop(found, max_drop=0.0)["degraded"]


def test_weights_with_too_few_effective_rows_are_reported_not_used():
    rng = np.random.default_rng(4)
    val_proba, val_labels = calibrated_rows(500, 2.0, rng)
    target_proba, _ = calibrated_rows(500, 2.0, rng)
    weights = np.full(500, 1e-3)
    weights[:3] = 100.0
    assert effective_sample_size(weights) < 4
    found = estimate_performance(val_proba, val_labels, target_proba, weights, min_effective_rows=30, draws=200)
    assert not found["methods"]["importance_weighted"]["detail"]["used"]
    assert any("effective validation rows" in note for note in found["notes"])


def test_atc_threshold_and_expected_confusion():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, True, False, False])
    threshold = atc_threshold(confidence, correct)
    assert np.mean(confidence > threshold) == pytest.approx(0.6)
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    confusion = expected_confusion(proba.max(1), proba)
    assert confusion.sum() == pytest.approx(2)
    assert confusion[0, 0] == pytest.approx(0.7) and confusion[1, 0] == pytest.approx(0.2)
    assert confusion[2, 2] == pytest.approx(0.8) and confusion[0, 2] == pytest.approx(0.1)


@pytest.mark.parametrize("val_shape, labels, target_shape", [((10, 3), 10, (5, 2)), ((10, 3), 9, (5, 3)),
                                                             ((0, 3), 0, (5, 3)), ((10, 3), 10, (0, 3))])
def test_bad_inputs_are_refused(val_shape, labels, target_shape):
    with pytest.raises(ValueError):
        estimate_performance(np.full(val_shape, 1 / 3), np.zeros(labels, dtype=int), np.full(target_shape, 1 / 3))


def test_the_estimate_renders_with_its_history():
    from tasks.render import performance_markdown
    from tasks.reports import ServedPerformance
    from tests.unit.test_monitoring import estimated

    rng = np.random.default_rng(5)
    val_proba, val_labels = calibrated_rows(300, 3.0, rng)
    target_proba, _ = calibrated_rows(200, 1.5, rng)
    found = estimate_performance(val_proba, val_labels, target_proba, np.ones(300), draws=100)
    found["drop"] = performance_drop(found, 0.05)
    history = [estimated((0, 9)), {"kind": "realized", "estimate_id": "e0", "labelled_rows": 10,
                                   "realized": {"accuracy": 0.75}}]
    found.update(validation={"target_holdout": 300}, window={"from": "2026-01-01", "to": "2026-01-02"})
    page = performance_markdown(ServedPerformance.model_validate(found), history)
    assert f"# Estimated performance on serving traffic: {found['verdict']}" in page
    assert "| importance_weighted |" in page and "effective rows 300" in page
    assert "| 0.800 [0.700, 0.900] | 0.750 (10) |" in page
