"""The shift statistics on synthetic data where the truth is known."""

import numpy as np
import pytest
import torch

from tasks.config import load_params
from tasks.shift import (
    Sample, TestResult, auc_and_p, bbsd_test, classifier_test, decide, fit_logistic, group_mix_test,
    importance_weights, label_shift_test, mlls_priors, mmd_block, mmd_permutation,
)
from tests.conftest import REPO

pytestmark = pytest.mark.unit
CFG = load_params(REPO / "params.yaml").shift


def gaussians(n, shift, seed, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g)
    y[:, 0] += shift
    return x, y


@pytest.mark.parametrize("classes", [1, 3])
def test_fit_logistic_fits_each_problem_as_scikit_learn_does_on_that_problems_rows(classes):
    """Every problem gets scikit-learn's minimiser (C = 1 / (2 * weight_decay * n), the bias unpenalised) on its own
    rows standardised with their own mean and std: all rows, a fold that leaves rows out (weight 0) and a bootstrap
    resample that repeats them (counts), solved together; for the domain classifier's boolean labels (one sigmoid
    output) and the label-shift classifier's integer ones (softmax)."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, 12, dtype=torch.float64) + 1
    score = x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(400, generator=g, dtype=torch.float64)
    labels = score > 1 if classes == 1 else torch.bucketize(score, torch.tensor([0.5, 1.5]))
    resample = np.random.default_rng(0).integers(0, 400, 400)
    rows_of = [np.arange(400), np.flatnonzero(np.arange(400) % 5 != 0), resample]
    weights = torch.stack([torch.bincount(torch.as_tensor(rows), minlength=400) for rows in rows_of])
    models = fit_logistic(x, labels, weights, weight_decay=1e-2)
    assert models.weight.shape == (3, 12, classes)
    logits = models.logits(x)
    for problem, rows in enumerate(rows_of):
        mean, std = x[rows].mean(0), x[rows].std(0)
        reference = LogisticRegression(C=1 / (2 * 1e-2 * len(rows)), tol=1e-10, max_iter=10_000).fit(
            ((x[rows] - mean) / std).numpy(), labels[rows].numpy())
        ours = logits[problem]
        theirs = torch.from_numpy(reference.decision_function(((x - mean) / std).numpy())).reshape(len(x), -1)
        if classes > 1:  # a softmax is defined up to a constant per row
            ours, theirs = ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True)
        assert torch.allclose(ours, theirs, atol=1e-4), (problem, (ours - theirs).abs().max())


def test_batched_lbfgs_stops_a_problem_whose_step_finds_no_decrease_where_it_was():
    """Problem 0's gradient points nowhere its loss decreases (every halving fails): it stays put and stops, without
    disturbing problem 1, an ordinary quadratic solved to its minimum in the same batch."""
    from tasks.shift import batched_lbfgs

    target = torch.tensor([3.0, -2.0], dtype=torch.float64)

    def losses(theta):
        stuck = theta[0].detach().pow(2).sum() + (theta[0] - theta[0].detach()).sum()  # value |t|^2, gradient 1
        return torch.stack([stuck, (theta[1] - target).pow(2).sum()])

    theta = batched_lbfgs(losses, torch.zeros(2, 2, dtype=torch.float64), iterations=50)
    assert torch.equal(theta[0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(theta[1], target, atol=1e-6)


def test_bootstrap_refits_equal_separate_fits_and_do_not_depend_on_the_chunks(monkeypatch):
    """Each resample's classifier (row counts as weights) is the one fit on that resample's rows alone, with every
    class given a column; the label-shift test's intervals are the same whether its refits run in one chunk or many."""
    import tasks.shift as shift

    x, y = gaussians(120, 1.0, 3)
    labels = (x[:, 0] > 0.8).numpy().astype(int) + (x[:, 1] > 0).numpy().astype(int)  # classes 0, 1, 2
    resamples = np.random.default_rng(1).integers(0, 120, (3, 120))
    together = shift.source_classifier_probabilities(x, labels, y, resamples, classes=4)
    assert together.shape == (3, 120, 4)
    for resample, probs in zip(resamples, together, strict=True):
        alone = shift.source_classifier_probabilities(x[torch.as_tensor(resample)], labels[resample], y, classes=4)
        assert np.allclose(probs, alone, atol=1e-5)

    def refit(source_resamples):
        return shift.source_classifier_probabilities(x, labels, y, source_resamples, classes=3)

    target_probs = shift.source_classifier_probabilities(x, labels, y, classes=3)
    one_chunk = shift.label_shift_test(labels, target_probs, None, ["a", "b", "c"], 12, 0, refit)
    monkeypatch.setattr(shift, "CHUNK_ELEMENTS", 5 * 240 * 3)  # five refits a chunk
    chunked = shift.label_shift_test(labels, target_probs, None, ["a", "b", "c"], 12, 0, refit)
    assert np.allclose(chunked.detail["estimated_interval_95"], one_chunk.detail["estimated_interval_95"], atol=1e-8)


@pytest.mark.parametrize("test", ["permutation", "block"])
def test_mmd_null_and_alternative(test):
    run = (lambda x, y, s: mmd_permutation(x, y, 99, s)) if test == "permutation" else \
        (lambda x, y, s: mmd_block(x, y, 50, s))
    # The block estimator trades power for linear cost: it gets more rows.
    n = 300 if test == "permutation" else 2000
    null_p = [run(*gaussians(n, 0.0, s), s).p_value for s in range(20)]
    alt_p = [run(*gaussians(n, 0.6, s), s).p_value for s in range(10)]
    assert sum(p < 0.05 for p in null_p) <= 3
    assert all(p < 0.05 for p in alt_p)


def test_mmd_block_cost_is_linear():
    result = mmd_block(*gaussians(4000, 0.0, 0), block=100, seed=0)
    assert result.detail["blocks"] == 40 and result.detail["method"] == "block"


def test_null_classifier_tests_fit_together_what_one_call_per_split_fits():
    """The calibration's domain classifiers, every split of one pool fit at once, give each split the AUC and scores
    that classifier_test gives it alone."""
    from tasks.shift import null_classifier_tests

    x, _ = gaussians(300, 0.0, 1)
    rng = np.random.default_rng(0)
    pool = rng.permutation(300)[:200]
    orders = [rng.permutation(pool) for _ in range(4)]
    together = null_classifier_tests(x, pool, orders, folds=5, seeds=[7, 8, 9, 10])
    for order, seed, (result, scores) in zip(orders, [7, 8, 9, 10], together, strict=True):
        alone, alone_scores = classifier_test(x[torch.as_tensor(order[:100])], x[torch.as_tensor(order[100:])], 5, seed)
        assert result.statistic == pytest.approx(alone.statistic, abs=1e-9)
        assert np.allclose(scores, alone_scores, atol=1e-6)


def test_classifier_test_scores_every_row_out_of_fold():
    x, y = gaussians(200, 1.0, 0)
    result, scores = classifier_test(x, y, folds=5, seed=0)
    assert scores.shape == (400,)
    assert result.statistic > 0.7 and result.p_value < 1e-6
    assert result.effect == pytest.approx(result.statistic - 0.5)
    weights = importance_weights(scores[:200], 200, 200)
    assert weights.mean() == pytest.approx(1.0)
    # Source rows that look like the target (large first coordinate) weigh more.
    assert np.corrcoef(weights, x[:, 0].numpy())[0, 1] > 0.5


def test_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores, truth = rng.random(300), rng.random(300) > 0.4
    assert auc_and_p(scores, truth)[0] == pytest.approx(roc_auc_score(truth, scores))


def exact_posteriors(n_per_class, source_prior, seed):
    """Two 1-D Gaussian classes and their exact posteriors under `source_prior`."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c * 2.0, 1.0, n) for c, n in enumerate(n_per_class)])
    lik = np.stack([norm.pdf(x, 0.0, 1.0), norm.pdf(x, 2.0, 1.0)], axis=1) * source_prior
    return lik / lik.sum(1, keepdims=True)


def test_em_recovers_known_priors():
    source_prior = np.array([0.5, 0.5])
    probs = exact_posteriors([8000, 2000], source_prior, 0)
    assert mlls_priors(probs, source_prior) == pytest.approx([0.8, 0.2], abs=0.02)


def test_label_shift_intervals_cover_known_priors_across_resamples():
    """Resampled targets with known priors: the 95% interval holds the truth in most draws."""
    truth = np.array([0.75, 0.25])
    covered = 0
    for seed in range(20):
        source_labels = np.repeat([0, 1], 300)
        probs = exact_posteriors([int(400 * truth[0]), int(400 * truth[1])], np.array([0.5, 0.5]), 100 + seed)
        result = label_shift_test(source_labels, probs, None, ["a", "b"], 100, seed)
        low, high = (np.asarray(v) for v in result.detail["estimated_interval_95"])
        covered += int(np.all((low <= truth) & (truth <= high)))
    assert covered >= 18  # the bar: at least 90% of the 95% intervals hold the truth


def synthetic_sample(n_per_class, moved: float, seed: int):
    """8-dimensional embeddings: class 1 sits 2 units from class 0 on axis 0; `moved` shifts every row of this
    sample along axis 1, which changes p(x | y) (not only the class mix)."""
    import torch

    from tasks.shift import Sample

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    x = rng.normal(size=(len(labels), 8))
    x[:, 0] += 2.0 * labels
    x[:, 1] += moved
    n = len(labels)
    return Sample(torch.tensor(x, dtype=torch.float32), np.full(n, 100.0), np.full(n, 1.2), {}, labels)


@pytest.mark.parametrize("moved", [0.0, 1.5])
def test_label_shift_estimates_are_withdrawn_when_the_classes_themselves_moved(moved):
    """Pure label shift (same classes, other mix): the estimate stands and its interval holds the truth. When the
    texts of each class changed too, the priors are not identifiable from unlabelled data, and the report says
    so instead of giving numbers."""
    from pathlib import Path

    from tasks.config import load_params
    from tasks.render import shift_markdown
    from tasks.reports import ShiftAnalysis, parse_report
    from tasks.shift import detect_shift, source_classifier_probabilities

    cfg = load_params(Path(__file__).resolve().parents[2] / "params.yaml").shift.model_copy(
        update={"null_splits": 5, "bootstrap": 50, "permutations": 50})
    source = synthetic_sample([400, 400], 0.0, 0)
    target = synthetic_sample([450, 150], moved, 1)
    target.labels = None  # unlabelled, as served traffic is
    target.class_probs = source_classifier_probabilities(source.embeddings, source.labels, target.embeddings)
    report = detect_shift(source, target, cfg, ["a", "b"])
    label = next(t for t in report["tests"] if t["name"] == "label_shift")["detail"]
    assert label["assumption_check"]["checked"]
    if moved == 0.0:
        assert label["identifiable"] is True
        low, high = label["estimated_interval_95"]
        assert low[0] <= 0.75 <= high[0]
    else:
        assert label["identifiable"] is False and "estimated_target_prior" not in label
        assert label["note"].startswith("not identifiable under this shift")
        assert "not identifiable under this shift" in shift_markdown(parse_report(ShiftAnalysis, report, "the analysis"))


def test_label_shift_interval_covers_the_truth_without_target_labels():
    source_labels = np.repeat([0, 1], 500)
    result = label_shift_test(source_labels, exact_posteriors([300, 100], np.array([0.5, 0.5]), 1), None,
                              ["a", "b"], 200, 0)
    low, high = result.detail["estimated_interval_95"]
    assert low[0] <= 0.75 <= high[0] and low[1] <= 0.25 <= high[1]
    assert result.p_value < 0.05 and result.effect == pytest.approx(0.25, abs=0.05)


def test_bbsd_bonferroni():
    rng = np.random.default_rng(0)
    same = bbsd_test(rng.dirichlet([1, 1, 1], 300), rng.dirichlet([1, 1, 1], 300))
    moved = bbsd_test(rng.dirichlet([1, 1, 1], 300), rng.dirichlet([5, 1, 1], 300))
    assert same.p_value > 0.05 and moved.p_value < 1e-6
    assert moved.p_value == pytest.approx(min(1.0, 3 * min(moved.detail["per_class_p"])))


def test_group_mix_merges_rare_values():
    import pandas as pd

    source = pd.Series(["a"] * 50 + ["b"] * 50 + ["rare1"], name="condition")
    target = pd.Series(["a"] * 90 + ["b"] * 10 + ["rare2"], name="condition")
    result = group_mix_test(source, target)
    assert result.name == "group_mix:condition" and result.p_value < 1e-6
    assert result.detail["categories"] == 3  # a, b, other


@pytest.mark.parametrize(
    ("effects", "verdict"),
    [({"mmd": (0.01, 0.2)}, "none"),           # significant but below the null cut-off: trivial drift
     ({"mmd": (0.03, 0.01)}, "moderate"),
     ({"mmd": (0.2, 0.0)}, "severe"),
     ({"mmd": (0.2, 0.5)}, "none"),            # large but not significant
     ({"mmd": (0.03, 0.01), "classifier": (0.5, 0.0)}, "severe")],
)
def test_decision_needs_significance_and_a_real_effect(effects, verdict):
    results = [TestResult(name, 0.0, p, effect, "x") for name, (effect, p) in effects.items()]
    got, reasons = decide(results, {"mmd": 0.02, "classifier": 0.05}, CFG)
    assert got == verdict
    assert reasons


def test_sample_take_keeps_rows_aligned():
    s = Sample(torch.arange(10.0)[:, None], np.arange(10.0), np.arange(10.0), {"g": np.arange(10)}, np.arange(10))
    t = s.take(np.array([3, 1]))
    assert t.embeddings[:, 0].tolist() == [3.0, 1.0] and t.labels.tolist() == [3, 1] and t.groups["g"].tolist() == [3, 1]


def test_group_mix_is_skipped_when_only_one_side_has_the_column():
    import numpy as np
    import torch

    from tasks.config import load_params
    from tasks.shift import Sample, distribution_tests

    rng = np.random.default_rng(0)

    def sample(groups):
        return Sample(embeddings=torch.tensor(rng.normal(size=(60, 4)), dtype=torch.float32),
                      lengths=rng.integers(10, 100, 60), pieces_per_word=rng.random(60) + 1, groups=groups,
                      labels=None)

    cfg = load_params(REPO / "params.yaml").shift
    results, _ = distribution_tests(sample({"condition": np.array(["a", "b"] * 30)}), sample({}), cfg,
                                    ["negative", "neutral", "positive"], seed=0)
    assert not [r for r in results if r.name.startswith("group_mix")]


def test_the_shift_markdown_shows_a_statistic_that_is_not_finite_as_a_dash():
    from tasks.render import shift_markdown
    from tasks.reports import ShiftAnalysis, parse_report

    report = {"verdict": "none", "reasons": [], "alpha": 0.05, "null_cutoffs": {}, "n_source": 10, "n_target": 10,
              "most_target_specific": [],
              "tests": [{"name": "mmd", "statistic": None, "p_value": None, "effect": None, "effect_name": "MMD^2",
                         "detail": {}, "cutoff": None, "flagged": False, "severe": False}]}
    assert "| mmd (MMD^2) | - | - | - | no |" in shift_markdown(parse_report(ShiftAnalysis, report, "the analysis"))
