"""Stage shift: has the target distribution moved away from the source, by how much, and how?

Every test returns a statistic, a p-value and an effect size. A test *flags* a shift only when
p < alpha AND its effect exceeds a cut-off calibrated on source-vs-source random splits, so that
large samples do not flag trivial drift. Verdict: none | moderate | severe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats

from tasks.config import Params, ShiftConfig


@dataclass
class TestResult:
    __test__ = False  # not a pytest test class

    name: str
    statistic: float
    p_value: float
    effect: float
    effect_name: str
    detail: dict = field(default_factory=dict)
    cutoff: float | None = None
    flagged: bool = False
    severe: bool = False

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------- MMD


def median_bandwidth(pooled: torch.Tensor, rng: np.random.Generator, max_points: int = 1000) -> float:
    """Median pairwise Euclidean distance on a subsample (the median heuristic)."""
    idx = rng.choice(len(pooled), size=min(max_points, len(pooled)), replace=False)
    sample = pooled[torch.as_tensor(idx)]
    distances = torch.cdist(sample, sample)
    upper = distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)]
    return float(upper.median().clamp(min=1e-6))


def rbf(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2))


def mmd2_unbiased_from_kernel(kernel: torch.Tensor, is_x: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 for one or many labelings (rows of `is_x`, boolean, n_x True each)."""
    k = kernel.clone()
    k.fill_diagonal_(0.0)
    mask_x = is_x.to(k.dtype)
    mask_y = 1.0 - mask_x
    n_x = mask_x.sum(-1)
    n_y = mask_y.sum(-1)
    kx = mask_x @ k
    ky = mask_y @ k
    xx = (kx * mask_x).sum(-1) / (n_x * (n_x - 1))
    yy = (ky * mask_y).sum(-1) / (n_y * (n_y - 1))
    xy = (kx * mask_y).sum(-1) / (n_x * n_y)
    return xx + yy - 2 * xy


def mmd_permutation(x: torch.Tensor, y: torch.Tensor, permutations: int, seed: int) -> TestResult:
    """Quadratic-time unbiased MMD^2 with an RBF kernel and a permutation p-value."""
    rng = np.random.default_rng(seed)
    pooled = torch.cat([x, y]).double()
    sigma = median_bandwidth(pooled, rng)
    kernel = rbf(pooled, pooled, sigma)
    n = len(pooled)
    observed_labels = torch.zeros(n, dtype=torch.bool)
    observed_labels[: len(x)] = True
    labels = [observed_labels]
    for _ in range(permutations):
        perm = torch.as_tensor(rng.permutation(n))
        labels.append(observed_labels[perm])
    values = torch.cat([mmd2_unbiased_from_kernel(kernel, torch.stack(labels[i:i + 64])) for i in range(0, len(labels), 64)])
    observed = float(values[0])
    p_value = float((1 + (values[1:] >= values[0]).sum()) / (1 + permutations))
    return TestResult("mmd", observed, p_value, max(observed, 0.0), "MMD^2 (RBF, median bandwidth)",
                      {"bandwidth": sigma, "method": "permutation", "permutations": permutations,
                       "n_source": len(x), "n_target": len(y)})


def mmd_block(x: torch.Tensor, y: torch.Tensor, block: int, seed: int) -> TestResult:
    """Block MMD^2 (Zaremba et al., 2013): unbiased MMD^2 inside disjoint blocks, averaged; the mean of
    independent block values is asymptotically normal, so the p-value is one-sided normal. Cost grows
    linearly with n."""
    rng = np.random.default_rng(seed)
    n = min(len(x), len(y))
    xs = x[torch.as_tensor(rng.permutation(len(x))[:n])].double()
    ys = y[torch.as_tensor(rng.permutation(len(y))[:n])].double()
    sigma = median_bandwidth(torch.cat([xs, ys]), rng)
    values = []
    for start in range(0, n - block + 1, block):
        bx, by = xs[start:start + block], ys[start:start + block]
        pooled = torch.cat([bx, by])
        is_x = torch.zeros(len(pooled), dtype=torch.bool)
        is_x[:block] = True
        values.append(float(mmd2_unbiased_from_kernel(rbf(pooled, pooled, sigma), is_x[None])[0]))
    values = np.asarray(values)
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("inf")
    p_value = float(stats.norm.sf(mean / se)) if se > 0 else (0.0 if mean > 0 else 1.0)
    return TestResult("mmd", mean, p_value, max(mean, 0.0), "MMD^2 (RBF, median bandwidth)",
                      {"bandwidth": sigma, "method": "block", "block_size": block, "blocks": len(values),
                       "n_source": len(x), "n_target": len(y)})


def mmd_test(x: torch.Tensor, y: torch.Tensor, cfg: ShiftConfig, seed: int) -> TestResult:
    if len(x) + len(y) <= cfg.mmd_quadratic_max:
        return mmd_permutation(x, y, cfg.permutations, seed)
    return mmd_block(x, y, cfg.mmd_block_size, seed)


# ----------------------------------------------------------------------------- classifier two-sample test


# Problems x rows (x outputs) that fit_logistic's callers solve at once: float64 tensors of 16 MB each.
CHUNK_ELEMENTS = 2_000_000


@dataclass
class LogisticModels:
    """Logistic regressions fit by `fit_logistic`, one per problem, each on features standardised with its own
    training rows' mean and standard deviation."""

    weight: torch.Tensor  # (problems, features, outputs), on standardised features
    bias: torch.Tensor  # (problems, outputs)
    mean: torch.Tensor  # (problems, features)
    std: torch.Tensor  # (problems, features)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(problems, rows, outputs): every problem's logits for every row of `features`."""
        with torch.no_grad():
            return standardised_logits(features.double(), self.weight, self.bias, self.mean, self.std)


def standardised_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                        std: torch.Tensor) -> torch.Tensor:
    """((x - mean_b) / std_b) @ weight_b + bias_b for every problem b, as one matrix product over all problems
    (no standardised copy of x per problem)."""
    problems, dims, outputs = weight.shape
    scaled = weight / std[:, :, None]
    offset = bias - torch.einsum("bd,bdk->bk", mean / std, weight)
    flat = x @ scaled.transpose(0, 1).reshape(dims, problems * outputs)
    return flat.reshape(len(x), problems, outputs).transpose(0, 1) + offset[:, None, :]


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor,
                 weight_decay: float = 1e-3, iterations: int = 100, classes: int | None = None) -> LogisticModels:
    """L2-regularised logistic regressions, one per row of `row_weights`, all on the same feature rows: problem b
    weighs row i by row_weights[b, i] (0 leaves it out, as a cross-validation fold does; a count repeats it, as a
    bootstrap resample does), standardises the features with its own rows' weighted mean and (unbiased) standard
    deviation, and minimises its weighted mean log-loss + weight_decay * |W|^2. Boolean labels: one sigmoid output;
    integer labels: a softmax over `classes` (default: max + 1; a class no row has gets a logit too).

    The problems are independent, so they are solved together (`batched_lbfgs`): the 200 bootstrap refits and the
    100 null-split folds of the shift stage were 300 small L-BFGS runs, most of its time."""
    x = features.double()
    weights = row_weights.double()
    problems, dims = len(weights), x.shape[1]
    outputs = (classes or int(labels.max()) + 1) if labels.dtype == torch.long else 1
    total = weights.sum(1, keepdim=True)
    mean = weights @ x / total
    variance = (weights @ (x * x) / total - mean**2).clamp(min=0) * total / (total - 1).clamp(min=1)
    std = variance.sqrt().clamp(min=1e-6)
    targets = labels.expand(problems, len(x))

    def losses(theta: torch.Tensor) -> torch.Tensor:
        weight = theta[:, : dims * outputs].reshape(problems, dims, outputs)
        logits = standardised_logits(x, weight, theta[:, dims * outputs:], mean, std)
        if outputs == 1:
            rows = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., 0], targets.double(),
                                                                        reduction="none")
        else:
            rows = torch.nn.functional.cross_entropy(logits.reshape(-1, outputs), targets.reshape(-1),
                                                     reduction="none").reshape(problems, -1)
        return (rows * weights).sum(1) / total[:, 0] + weight_decay * weight.pow(2).sum((1, 2))

    theta = batched_lbfgs(losses, torch.zeros(problems, (dims + 1) * outputs, dtype=torch.float64), iterations)
    return LogisticModels(theta[:, : dims * outputs].reshape(problems, dims, outputs), theta[:, dims * outputs:],
                          mean, std)


def batched_lbfgs(losses: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, iterations: int,
                  history: int = 10, tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9) -> torch.Tensor:
    """Minimise independent smooth problems at once: row b of `theta` is problem b's parameters and losses(theta)[b]
    its loss. L-BFGS per problem (its own curvature pairs, its own backtracking step under the Armijo condition), one
    evaluation of every loss per trial step; a problem stops when its largest gradient or step falls below the
    tolerances (torch.optim.LBFGS's defaults), when 30 halvings of its step found no decrease, or after `iterations`
    steps (then short of the tolerances). Unlike torch's, no test of the loss's change: it stopped the unit test's
    three-class fits with gradients still near 1e-5."""

    def value_and_grad(at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = at.detach().requires_grad_(True)
        values = losses(at)
        (grad,) = torch.autograd.grad(values.sum(), at)
        return values.detach(), grad

    value, grad = value_and_grad(theta)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / s.y or 0 to skip the pair)
    scale = torch.clamp(1.0 / grad.abs().sum(1), max=1.0)  # the first step's length, as torch's L-BFGS
    active = grad.abs().amax(1) > tolerance_grad
    for _ in range(iterations):
        if not active.any():
            break
        direction = -grad
        alphas = []
        for s, y, rho in reversed(steps):
            alpha = rho * (s * direction).sum(1)
            direction = direction - alpha[:, None] * y
            alphas.append(alpha)
        direction = direction * scale[:, None]
        for (s, y, rho), alpha in zip(steps, reversed(alphas)):
            beta = rho * (y * direction).sum(1)
            direction = direction + (alpha - beta)[:, None] * s
        slope = (grad * direction).sum(1)
        uphill = slope >= 0  # a bad curvature estimate: fall back to steepest descent
        direction = torch.where(uphill[:, None], -grad * scale[:, None], direction)
        slope = torch.where(uphill, (grad * direction).sum(1), slope)
        direction = direction * active[:, None]
        length = torch.ones_like(value)
        for _ in range(30):
            new_value, new_grad = value_and_grad(theta + length[:, None] * direction)
            accepted = (new_value <= value + 1e-4 * length * slope) | ~active
            if accepted.all():
                break
            length = torch.where(accepted, length, length / 2)
        # A problem whose step never passed (its decrease below the loss's rounding) stays where it is and stops.
        moved = accepted & active
        step = torch.where(moved, length, 0.0)[:, None] * direction
        change = torch.where(moved[:, None], new_grad - grad, 0.0)
        curvature = (step * change).sum(1)
        useful = curvature > 1e-10
        steps.append((step, change, torch.where(useful, 1.0 / curvature.clamp(min=1e-10), 0.0)))
        steps = steps[-history:]
        scale = torch.where(useful, curvature / (change * change).sum(1).clamp(min=1e-300), scale)
        theta = theta + step
        value = torch.where(moved, new_value, value)
        grad = torch.where(moved[:, None], new_grad, grad)
        active &= moved & (grad.abs().amax(1) > tolerance_grad) & (step.abs().amax(1) > tolerance_change)
    return theta


def auc_and_p(scores: np.ndarray, is_target: np.ndarray) -> tuple[float, float]:
    """ROC AUC via Mann-Whitney U, and its one-sided p-value against AUC = 0.5 (normal approximation)."""
    n1, n0 = int(is_target.sum()), int((~is_target).sum())
    ranks = stats.rankdata(scores)
    u = ranks[is_target].sum() - n1 * (n1 + 1) / 2
    auc = u / (n1 * n0)
    sd = math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    return float(auc), float(stats.norm.sf((auc - 0.5) / sd))


def classifier_test(x: torch.Tensor, y: torch.Tensor, folds: int, seed: int) -> tuple[TestResult, np.ndarray]:
    """Domain classifier on the embeddings; out-of-fold probabilities of 'target' for every row."""
    features = torch.cat([x, y])
    is_target = np.r_[np.zeros(len(x), dtype=bool), np.ones(len(y), dtype=bool)]
    fold_of = fold_assignment(is_target, folds, seed)
    scores = out_of_fold_scores(features, is_target[None], fold_of[None], folds)[0]
    return classifier_result(scores, is_target, folds), scores


def fold_assignment(is_target: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's cross-validation fold, stratified by domain."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(is_target), dtype=int)
    for domain in (False, True):
        rows = np.flatnonzero(is_target == domain)
        fold_of[rng.permutation(rows)] = np.arange(len(rows)) % folds
    return fold_of


def out_of_fold_scores(features: torch.Tensor, is_target: np.ndarray, fold_of: np.ndarray, folds: int) -> np.ndarray:
    """Domain classifiers for several labellings of the same rows (`is_target` and `fold_of` are (labellings, rows)),
    every fold of every labelling fit together: (labellings, rows) probabilities of 'target', each row scored by its
    labelling's model for the fold that left it out."""
    labellings, rows = is_target.shape
    chunk = max(1, CHUNK_ELEMENTS // (folds * rows))  # labellings fit together: tensors of a few tens of MB
    scores = []
    for start in range(0, labellings, chunk):
        part, part_folds = is_target[start:start + chunk], fold_of[start:start + chunk]
        in_training = part_folds[:, None, :] != np.arange(folds)[None, :, None]  # (labellings, folds, rows)
        models = fit_logistic(features, torch.as_tensor(np.repeat(part, folds, axis=0)),
                              torch.as_tensor(in_training.reshape(len(part) * folds, rows)))
        probs = torch.sigmoid(models.logits(features)[..., 0]).numpy().reshape(len(part), folds, rows)
        scores.append(np.take_along_axis(probs, part_folds[:, None, :], axis=1)[:, 0])
    return np.concatenate(scores)


def classifier_result(scores: np.ndarray, is_target: np.ndarray, folds: int) -> TestResult:
    auc, p_value = auc_and_p(scores, is_target)
    return TestResult("classifier", auc, p_value, max(auc - 0.5, 0.0), "AUC - 0.5", {"folds": folds, "auc": auc})


def importance_weights(source_scores: np.ndarray, n_source: int, n_target: int, clip: float = 20.0) -> np.ndarray:
    """Density ratio p_target(x) / p_source(x) per source row from the domain classifier's odds,
    normalised to mean 1: `evaluate` can weigh source rows to look like the target."""
    p = np.clip(source_scores, 1e-6, 1 - 1e-6)
    ratio = np.minimum(p / (1 - p) * (n_source / n_target), clip)
    return ratio / ratio.mean()


# ----------------------------------------------------------------------------- black-box shift detection


def bbsd_test(source_probs: np.ndarray, target_probs: np.ndarray) -> TestResult:
    """Per-class two-sample KS tests on a model's softmax outputs, Bonferroni-corrected."""
    classes = source_probs.shape[1]
    per_class = [stats.ks_2samp(source_probs[:, c], target_probs[:, c]) for c in range(classes)]
    raw = np.array([r.pvalue for r in per_class])
    statistic = max(float(r.statistic) for r in per_class)
    p_value = float(min(1.0, raw.min() * classes))
    return TestResult("bbsd", statistic, p_value, statistic, "largest KS statistic over classes",
                      {"per_class_ks": [float(r.statistic) for r in per_class], "per_class_p": raw.tolist()})


# ----------------------------------------------------------------------------- label shift


def mlls_priors(target_probs: np.ndarray, source_prior: np.ndarray, iterations: int = 500,
                tolerance: float = 1e-7) -> np.ndarray:
    """Maximum-likelihood label shift (Saerens et al., 2002): EM that re-weights a source-calibrated
    classifier's posteriors on the target until the implied class priors are stable."""
    q = source_prior.copy()
    ratio_base = np.clip(source_prior, 1e-12, None)
    for _ in range(iterations):
        adjusted = target_probs * (q / ratio_base)
        adjusted /= np.clip(adjusted.sum(1, keepdims=True), 1e-12, None)
        updated = adjusted.mean(0)
        if np.abs(updated - q).max() < tolerance:
            return updated
        q = updated
    return q


def label_shift_test(source_labels: np.ndarray, target_probs: np.ndarray | None, target_labels: np.ndarray | None,
                     labels: list[str], bootstrap: int, seed: int,
                     refit: Callable[[np.ndarray], np.ndarray] | None = None) -> TestResult:
    """Target class priors estimated without target labels (EM on a source classifier's posteriors),
    with bootstrap intervals (`refit(source_resamples)` refits the classifier on each resample of the source rows, a
    (draws, rows) array, and returns each refit's posteriors on every target row, so the interval carries the
    classifier's own uncertainty too); where target labels exist, a chi-squared test of the label mix against
    the source's. Effect: total variation distance between source and target priors."""
    k = len(labels)
    rng = np.random.default_rng(seed)
    source_prior = np.bincount(source_labels, minlength=k) / len(source_labels)
    detail: dict = {"labels": labels, "source_prior": source_prior.tolist()}
    if target_probs is None:
        return labelled_mix_test(source_labels, target_labels, k, detail)
    estimate = mlls_priors(target_probs, source_prior)
    resamples = [(rng.integers(0, len(source_labels), len(source_labels)),
                  rng.integers(0, len(target_probs), len(target_probs))) for _ in range(bootstrap)]
    # Refits in chunks that keep each chunk's (draws, rows, classes) tensors to a few tens of MB.
    chunk = max(1, CHUNK_ELEMENTS // ((len(source_labels) + len(target_probs)) * k))
    draws = []
    for start in range(0, bootstrap, chunk):
        part = resamples[start:start + chunk]
        refits = refit(np.stack([s for s, _ in part])) if refit is not None else None
        for i, (s, t) in enumerate(part):
            probs = refits[i][t] if refits is not None else target_probs[t]
            draws.append(mlls_priors(probs, np.bincount(source_labels[s], minlength=k) / len(s)))
    draws = np.array(draws)
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    detail |= {
        "estimated_target_prior": estimate.tolist(),
        "estimated_interval_95": [low.tolist(), high.tolist()],
        "method": "EM / maximum-likelihood label shift on a logistic-regression classifier fit on the source; "
                  "percentile bootstrap intervals",
    }
    if target_labels is not None and len(target_labels):
        return labelled_mix_test(source_labels, target_labels, k, detail)
    # Unlabelled target: how often does a bootstrap estimate fall on the other side of the source prior?
    tv = 0.5 * float(np.abs(estimate - source_prior).sum())
    moved = np.sign(estimate - source_prior)
    p_value = float(np.max([(np.sign(draws[:, c] - source_prior[c]) != moved[c]).mean() for c in range(k)]))
    return TestResult("label_shift", tv, max(p_value * 2, 1.0 / (bootstrap + 1)), tv,
                      "total variation of class priors", detail)


def check_label_shift_assumption(source: "Sample", target: "Sample", label: TestResult, cutoff: float | None,
                                 cfg: ShiftConfig, seed: int) -> dict:
    """Pure label shift means p(x | y) is the same in both domains: then the source, resampled to the estimated
    target class priors, looks like the target, and a domain classifier between the two does no better than
    between two halves of the source (`cutoff`). When it clearly does better, p(x | y) moved too and the target
    priors are not identifiable from unlabelled data; the EM estimate is withdrawn."""
    ratio = np.asarray(label.detail["estimated_target_prior"]) / np.clip(label.detail["source_prior"], 1e-12, None)
    weight = ratio[source.labels]
    keep = np.flatnonzero(np.random.default_rng(seed).random(len(source)) < weight / weight.max())  # no repeats
    if len(keep) < 20 or cutoff is None:
        return {"checked": False, "holds": None, "reason": "too few source rows after reweighting to check"}
    result, _ = classifier_test(source.embeddings[torch.as_tensor(keep)], target.embeddings, cfg.classifier_folds, seed)
    excess = max(result.statistic - 0.5, 0.0)
    holds = not (result.p_value < cfg.alpha and excess > 2 * cutoff)
    return {"checked": True, "holds": holds, "auc_after_reweighting": result.statistic, "p_value": result.p_value,
            "null_cutoff": cutoff, "source_rows_used": int(len(keep)),
            "method": "domain classifier between the source resampled to the estimated class priors and the target"}


def withdraw_label_shift_estimate(label: TestResult, check: dict) -> TestResult:
    """The label-shift result once its assumption failed: no estimated priors, and no evidence of label shift
    from them (a labelled target keeps its own chi-squared test, which needs no assumption)."""
    detail = {k: v for k, v in label.detail.items() if k not in ("estimated_target_prior", "estimated_interval_95")}
    detail["identifiable"] = False
    detail["note"] = (f"not identifiable under this shift: after reweighting the source to the estimated class priors, "
                      f"a domain classifier still separates it from the target (AUC {check['auc_after_reweighting']:.2f}), "
                      "so the texts of each class changed too, not only the class mix")
    if "labelled_target_prior" in detail:
        return TestResult(label.name, label.statistic, label.p_value, label.effect, label.effect_name, detail)
    return TestResult(label.name, 0.0, 1.0, 0.0, label.effect_name, detail)


def labelled_mix_test(source_labels: np.ndarray, target_labels: np.ndarray, k: int, detail: dict) -> TestResult:
    """Chi-squared test of the labelled class mix, source against target."""
    counts = np.vstack([np.bincount(source_labels, minlength=k), np.bincount(target_labels, minlength=k)])
    counts = counts[:, counts.sum(0) > 0]
    chi2, p_value, *_ = stats.chi2_contingency(counts)
    source_prior = np.bincount(source_labels, minlength=k) / len(source_labels)
    target_prior = np.bincount(target_labels, minlength=k) / len(target_labels)
    detail = detail | {"labelled_target_prior": target_prior.tolist()}
    tv = 0.5 * float(np.abs(target_prior - source_prior).sum())
    return TestResult("label_shift", float(chi2), float(p_value), tv, "total variation of class priors", detail)


# ----------------------------------------------------------------------------- metadata


# ----------------------------------------------------------------------------- metadata


def group_mix_test(source: pd.Series, target: pd.Series, min_count: int = 5) -> TestResult:
    """Chi-squared test of a group column's mix; values rarer than `min_count` share one 'other' cell."""
    values = pd.concat([source, target]).fillna("<missing>").astype("str")
    counts = values.value_counts()
    keep = set(counts[counts >= min_count].index)
    cells = values.where(values.isin(keep), "other").to_numpy()
    domain = np.r_[np.zeros(len(source)), np.ones(len(target))]
    table = pd.crosstab(domain, cells).to_numpy()
    if table.shape[1] < 2:
        return TestResult(f"group_mix:{source.name}", 0.0, 1.0, 0.0, "Cramer's V", {"categories": int(table.shape[1])})
    chi2, p_value, *_ = stats.chi2_contingency(table)
    v = math.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    return TestResult(f"group_mix:{source.name}", float(chi2), float(p_value), v, "Cramer's V",
                      {"categories": int(table.shape[1])})


# ----------------------------------------------------------------------------- decision


def decide(results: list[TestResult], cutoffs: dict[str, float], cfg: ShiftConfig) -> tuple[str, list[str]]:
    """Flag a test when p < alpha and effect > its null cut-off; severe when the effect is
    `severe_ratio` times the cut-off. The verdict is the worst flag."""
    reasons = []
    for r in results:
        r.cutoff = cutoffs.get(r.name.split(":")[0])
        if r.cutoff is None:
            continue
        r.flagged = r.p_value < cfg.alpha and r.effect > r.cutoff
        r.severe = r.flagged and r.effect >= cfg.severe_ratio * r.cutoff
        if r.flagged:
            reasons.append(f"{r.name}: {r.effect_name} {r.effect:.3g} > null cut-off {r.cutoff:.3g} "
                           f"(p = {r.p_value:.2g}){' - severe' if r.severe else ''}")
    if any(r.severe for r in results):
        return "severe", reasons
    if any(r.flagged for r in results):
        return "moderate", reasons
    return "none", reasons or ["no test found a shift larger than source-vs-source noise"]


# ----------------------------------------------------------------------------- per-row inputs


@dataclass
class Sample:
    """Everything the tests need, per row, so that any subset (a null split) is cheap to test."""

    embeddings: torch.Tensor
    lengths: np.ndarray
    pieces_per_word: np.ndarray
    groups: dict[str, np.ndarray]
    labels: np.ndarray | None  # class index, or None when unlabelled
    class_probs: np.ndarray | None = None  # P(class | x) from a classifier fit on the source (label shift)
    probs: np.ndarray | None = None  # the champion's softmax outputs (black-box shift detection)

    def take(self, idx: np.ndarray) -> Sample:
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Sample(self.embeddings[torch.as_tensor(idx)], self.lengths[idx], self.pieces_per_word[idx],
                      {k: v[idx] for k, v in self.groups.items()}, pick(self.labels), pick(self.class_probs),
                      pick(self.probs))

    def __len__(self) -> int:
        return len(self.lengths)


def text_profile(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """Characters, subword pieces per word, and the unknown-token share of a list of texts."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = np.array([len(t) for t in texts], dtype=float)
    pieces = np.array([len(ids) / max(len(t.split()), 1) for ids, t in zip(encoded, texts, strict=True)])
    total = sum(len(ids) for ids in encoded)
    unknown = sum(sum(1 for i in ids if i == tokenizer.unk_token_id) for ids in encoded)
    return lengths, pieces, unknown / max(total, 1)


def distribution_tests(source: Sample, target: Sample, cfg: ShiftConfig, labels: list[str], seed: int,
                       permutations: int | None = None, with_intervals: bool = True,
                       classifier: tuple[TestResult, np.ndarray] | None = None) -> tuple[list[TestResult], np.ndarray]:
    """Every test on one pair of samples; also returns the domain classifier's out-of-fold scores (`classifier`: its
    result and scores, already computed)."""
    mmd_cfg = cfg if permutations is None else cfg.model_copy(update={"permutations": max(permutations, 19)})
    results = [mmd_test(source.embeddings, target.embeddings, mmd_cfg, seed)]
    classifier, scores = classifier or classifier_test(source.embeddings, target.embeddings, cfg.classifier_folds,
                                                       seed)
    results.append(classifier)
    if source.labels is not None and (target.class_probs is not None or target.labels is not None):
        refit = None
        if target.class_probs is not None:
            def refit(source_resamples: np.ndarray) -> np.ndarray:
                return source_classifier_probabilities(source.embeddings, source.labels, target.embeddings,
                                                       source_resamples, classes=len(labels))
        results.append(label_shift_test(source.labels, target.class_probs, target.labels, labels,
                                        cfg.bootstrap if with_intervals else 50, seed, refit))
    if source.probs is not None and target.probs is not None:
        results.append(bbsd_test(source.probs, target.probs))
    ks = stats.ks_2samp(source.lengths, target.lengths)
    results.append(TestResult("text_length", float(ks.statistic), float(ks.pvalue), float(ks.statistic),
                              "KS statistic", {"source_median_chars": float(np.median(source.lengths)),
                                               "target_median_chars": float(np.median(target.lengths))}))
    ks = stats.ks_2samp(source.pieces_per_word, target.pieces_per_word)
    results.append(TestResult("vocabulary", float(ks.statistic), float(ks.pvalue), float(ks.statistic),
                              "KS statistic of subword pieces per word",
                              {"source_pieces_per_word": float(source.pieces_per_word.mean()),
                               "target_pieces_per_word": float(target.pieces_per_word.mean())}))
    # A group column can only be compared where both sides have it (served traffic has none).
    for name in [g for g in source.groups if g in target.groups]:
        results.append(group_mix_test(pd.Series(source.groups[name], name=name),
                                      pd.Series(target.groups[name], name=name)))
    return results, scores


def calibrate(source: Sample, cfg: ShiftConfig, labels: list[str]) -> dict[str, float]:
    """Each test's effect cut-off: the `null_quantile` of its effect over random halves of the source,
    where by construction there is no shift."""
    rng = np.random.default_rng(cfg.seed + 1)
    pool = rng.permutation(len(source))[: cfg.calibration_rows]
    orders = [rng.permutation(pool) for _ in range(cfg.null_splits)]
    seeds = [cfg.seed + 100 + r for r in range(cfg.null_splits)]
    classifiers = null_classifier_tests(source.embeddings, pool, orders, cfg.classifier_folds, seeds)
    effects: dict[str, list[float]] = {}
    for order, seed, classifier in zip(orders, seeds, classifiers, strict=True):
        half = len(order) // 2
        results, _ = distribution_tests(source.take(order[:half]), source.take(order[half:]), cfg, labels,
                                        seed=seed, permutations=0, with_intervals=False, classifier=classifier)
        for result in results:
            effects.setdefault(result.name.split(":")[0], []).append(result.effect)
    return {name: float(np.quantile(values, cfg.null_quantile)) for name, values in effects.items()}


def null_classifier_tests(embeddings: torch.Tensor, pool: np.ndarray, orders: list[np.ndarray], folds: int,
                          seeds: list[int]) -> list[tuple[TestResult, np.ndarray]]:
    """classifier_test(first half of order, second half, folds, seed) for every order of the same pool of rows, all
    fit together on the pool: the same rows, labels and folds as one call per order, with the rows in the pool's
    order (so the same minimisers, up to rounding and batched_lbfgs's tolerances)."""
    position = np.empty(int(pool.max()) + 1, dtype=int)
    position[pool] = np.arange(len(pool))
    is_target, fold_of = np.zeros((len(orders), len(pool)), dtype=bool), np.zeros((len(orders), len(pool)), dtype=int)
    in_order = []
    for r, (order, seed) in enumerate(zip(orders, seeds, strict=True)):
        split = np.arange(len(order)) >= len(order) // 2
        at = position[order]
        is_target[r, at], fold_of[r, at] = split, fold_assignment(split, folds, seed)
        in_order.append(at)
    scores = out_of_fold_scores(embeddings[torch.as_tensor(pool)], is_target, fold_of, folds)
    return [(classifier_result(scores[r][at], is_target[r][at], folds), scores[r][at]) for r, at in enumerate(in_order)]


def detect_shift(source: Sample, target: Sample, cfg: ShiftConfig, labels: list[str],
                 source_text: list[str] | None = None, target_text: list[str] | None = None) -> dict:
    """All tests, the calibrated decision, the most target-specific examples and source importance weights."""
    results, scores = distribution_tests(source, target, cfg, labels, seed=cfg.seed)
    cutoffs = calibrate(source, cfg, labels)
    for i, result in enumerate(results):
        if result.name == "label_shift" and "estimated_target_prior" in result.detail:
            check = check_label_shift_assumption(source, target, result, cutoffs.get("classifier"), cfg, cfg.seed)
            result.detail["assumption_check"] = check
            if check["holds"] is False:
                results[i] = withdraw_label_shift_estimate(result, check)  # keeps the detail, check included
            else:
                result.detail["identifiable"] = check["holds"]
    verdict, reasons = decide(results, cutoffs, cfg)
    target_scores = scores[len(source):]
    top = np.argsort(-target_scores)[: cfg.top_examples]
    examples = [{"text": (target_text[i][:300] if target_text else None), "target_score": float(target_scores[i]),
                 "label": (labels[target.labels[i]] if target.labels is not None else None)} for i in top]
    return {
        "verdict": verdict,
        "reasons": reasons,
        "alpha": cfg.alpha,
        "tests": [r.as_dict() for r in results],
        "null_cutoffs": cutoffs,
        "n_source": len(source),
        "n_target": len(target),
        "most_target_specific": examples,
        "source_importance_weights": importance_weights(scores[: len(source)], len(source), len(target)).tolist(),
        "domain_scores": {"source": scores[: len(source)].tolist(), "target": target_scores.tolist()},
    }


def source_classifier_probabilities(source_embeddings: torch.Tensor, source_labels: np.ndarray,
                                    target_embeddings: torch.Tensor, resamples: np.ndarray | None = None,
                                    weight_decay: float = 1e-2, classes: int | None = None) -> np.ndarray:
    """P(class | x) on the target from a regularised logistic regression fit on the labelled source: the input of
    the EM label-shift estimate. (rows, classes); with `resamples` (draws, source rows) of source row indices, one
    classifier per resample, fit together: (draws, rows, classes)."""
    draws = np.arange(len(source_embeddings))[None, :] if resamples is None else resamples
    counts = torch.stack([torch.bincount(torch.as_tensor(draw), minlength=len(source_embeddings)) for draw in draws])
    models = fit_logistic(source_embeddings, torch.tensor(source_labels, dtype=torch.long), counts,
                          weight_decay=weight_decay, classes=classes)
    probs = torch.softmax(models.logits(target_embeddings), dim=-1).numpy()
    return probs[0] if resamples is None else probs


def build_sample(frame: pd.DataFrame, embeddings: torch.Tensor, tokenizer, groups: list[str],
                 labels: list[str]) -> Sample:
    """Per-row inputs of one domain; labels are optional (None when the column is absent or empty)."""
    texts = frame["text"].astype("str").tolist()
    lengths, pieces, _ = text_profile(tokenizer, texts)
    label_index = None
    if "label" in frame and frame["label"].notna().all() and frame["label"].isin(labels).all():
        label_index = frame["label"].map({l: i for i, l in enumerate(labels)}).to_numpy(dtype=np.int64)
    return Sample(embeddings=embeddings, lengths=lengths, pieces_per_word=pieces,
                  groups={g: frame[g].astype("str").where(frame[g].notna(), "<missing>").to_numpy()
                          for g in groups if g in frame},
                  labels=label_index)


# ----------------------------------------------------------------------------- the whole analysis


def cap_rows(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    return frame if len(frame) <= limit else frame.sample(n=limit, random_state=seed).reset_index(drop=True)


def analyse_shift(source: pd.DataFrame, target: pd.DataFrame, params: Params) -> dict:
    """Embed both domains with the base encoder (cached), build the per-row inputs, run every test: the
    shift stage, `regraft shift` and shift-watch all measure shift through this."""
    from tasks.models import load_tokenizer, load_trained_classifier, mean_pooled_embeddings, predict_proba

    cfg, labels = params.shift, params.ingest.labels
    source = cap_rows(source.reset_index(drop=True), cfg.max_rows, cfg.seed)
    target = cap_rows(target.reset_index(drop=True), cfg.max_rows, cfg.seed)
    base, max_length = params.model.base, params.model.max_length
    cache = params.paths.embeddings
    tokenizer = load_tokenizer(base)
    source_emb = mean_pooled_embeddings(base, source["text"].astype("str").tolist(), max_length, cache)
    target_emb = mean_pooled_embeddings(base, target["text"].astype("str").tolist(), max_length, cache)
    groups = params.ingest.columns.groups
    source_sample = build_sample(source, source_emb, tokenizer, groups, labels)
    target_sample = build_sample(target, target_emb, tokenizer, groups, labels)
    if source_sample.labels is not None:
        target_sample.class_probs = source_classifier_probabilities(source_emb, source_sample.labels, target_emb,
                                                                    classes=len(labels))
    champion = params.paths.champion
    if (champion / "config.json").is_file():
        # Black-box shift detection on the production model's outputs.
        model = load_trained_classifier(champion, labels, "production")
        champion_tokenizer = load_tokenizer(champion)
        source_sample.probs = predict_proba(model, champion_tokenizer, source["text"].tolist(), max_length).numpy()
        target_sample.probs = predict_proba(model, champion_tokenizer, target["text"].tolist(), max_length).numpy()
    report = detect_shift(source_sample, target_sample, cfg, labels,
                          source["text"].astype("str").tolist(), target["text"].astype("str").tolist())
    report["source_ids"] = source["id"].astype("str").tolist() if "id" in source else None
    report["embeddings_2d"] = project_2d(source_emb.numpy(), target_emb.numpy())
    return report


def project_2d(source: np.ndarray, target: np.ndarray, limit: int = 2000) -> dict:
    """PCA of the pooled embeddings to two dimensions, for the scatter plot."""
    pooled = np.vstack([source[:limit], target[:limit]])
    centred = pooled - pooled.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T
    return {"source": points[: min(limit, len(source))].tolist(), "target": points[min(limit, len(source)):].tolist()}


# Per-row arrays that the shift stage turns into plots and weights; other readers drop them.
BULKY = ("embeddings_2d", "domain_scores", "source_importance_weights", "source_ids")


def without_bulk(report: dict) -> dict:
    """The report without its per-row arrays, for the terminal and for shift-watch."""
    return {key: value for key, value in report.items() if key not in BULKY}
