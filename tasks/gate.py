"""Stage gate: a PASS / FAIL / INCONCLUSIVE verdict from the evaluation's evidence, one row per criterion.

Each check is three-way. For "value >= threshold": PASS when the evidence says the value is above
(one-sided p < alpha/2, i.e. the lower bound of the (1 - alpha) interval clears the threshold), FAIL
when it says the value is below (the upper bound misses it), INCONCLUSIVE otherwise. p-values come from
the bootstrap resamples (or, for a small group's accuracy, from the Wilson score test), and per-group
checks are Holm-corrected across groups x metrics. Fail-closed: missing or NaN evidence is a FAIL,
too little data to judge is INCONCLUSIVE; nothing missing ever passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import GateConfig
from tasks.evaluate import normal_sf, percentile_interval, wilson_interval
from tasks.reports import (FAIL, INCONCLUSIVE, NOT_APPLICABLE, PASS, BootstrapKey, Check, Comparison, Decision,
                           EvaluateReport, InsufficientGroup, ShiftReport, SplitReport, Verdict, WeightedUnavailable,
                           pair_name)


def bootstrap_p_values(samples: np.ndarray, threshold: float, direction: str) -> tuple[float, float] | None:
    """(p that the value meets the threshold is wrong, p that it violates it is wrong), by the bootstrap
    percentile duality with the add-one correction; None without resamples."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None
    worse = samples < threshold if direction == ">=" else samples > threshold
    better = samples > threshold if direction == ">=" else samples < threshold
    total = samples.size + 1
    return float((worse.sum() + 1) / total), float((better.sum() + 1) / total)


def score_test_p_values(rate: float, n: int, threshold: float, direction: str) -> tuple[float, float]:
    """The same two p-values for a proportion from the score test whose inversion is the Wilson interval."""
    threshold = min(max(threshold, 1e-9), 1 - 1e-9)
    z = (rate - threshold) / np.sqrt(threshold * (1 - threshold) / n)
    if direction == "<=":
        z = -z
    return normal_sf(z), normal_sf(-z)


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control, any dependence)."""
    m = len(p_values)
    order = np.argsort(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def interval_of(samples: np.ndarray | None, alpha: float) -> list[float | None]:
    """The two-sided (1 - alpha) percentile interval of a criterion's resamples."""
    return [None, None] if samples is None else percentile_interval(samples, 1 - alpha)


def decide(check: Check, alpha: float) -> Check:
    """Turn the two (possibly Holm-adjusted) p-values into PASS / FAIL / INCONCLUSIVE."""
    if check.p_meets is None or check.value is None or np.isnan(check.value):
        check.status = FAIL
        check.detail = check.detail or "missing evidence: no value or no resamples"
    elif check.p_meets < alpha / 2:
        check.status = PASS
    elif check.p_violates < alpha / 2:
        check.status = FAIL
    else:
        check.status = INCONCLUSIVE
    low, high = check.interval
    if check.threshold is not None and low is not None:
        check.margin = (low - check.threshold) if check.direction == ">=" else (check.threshold - high)
    return check


def threshold_check(name: str, value, samples: np.ndarray | None, threshold: float, direction: str,
                    alpha: float, detail: str = "") -> Check:
    """A check decided from bootstrap resamples."""
    check = Check(name=name, status=FAIL, value=None if value is None else float(value), threshold=threshold,
                  direction=direction, interval=interval_of(samples, alpha), detail=detail)
    p = None if samples is None else bootstrap_p_values(samples, threshold, direction)
    if p is not None:
        check.p_meets, check.p_violates = p
    return decide(check, alpha)


@dataclass
class Evidence:
    """What the gate reads: the evaluation report, its bootstrap table, the shift report."""

    evaluation: EvaluateReport | None
    bootstrap: pd.DataFrame | None
    shift: ShiftReport | None
    problems: list[str] = field(default_factory=list)  # unreadable or missing files, said plainly

    def samples(self, key: BootstrapKey) -> np.ndarray | None:
        column = key.to_str()
        if self.bootstrap is None or column not in self.bootstrap:
            return None
        return self.bootstrap[column].to_numpy(dtype=float)


def judge(evidence: Evidence, cfg: GateConfig, small_n: int) -> Verdict:
    """The verdict: every criterion's checks, the overall status, and what could not be judged."""
    checks: list[Check] = []
    notes: list[str] = []
    if evidence.problems or evidence.evaluation is None or evidence.bootstrap is None:
        checks.append(Check(name="evidence", status=FAIL,
                            detail="; ".join(evidence.problems) or "no evaluation report or bootstrap table"))
        checks.append(shift_check(evidence.shift))
        return verdict_from(checks, notes, champion=False, insufficient=[])
    evaluation = evidence.evaluation
    champion = evaluation.champion is not None
    if not champion:
        notes.append("No champion in production yet: only the absolute criteria apply "
                     "(floors, worst group, disparity gap, shift); non-inferiority, forgetting and the "
                     "disparity increase are not applicable.")

    for floor in cfg.floors:
        split = evaluation.splits.get(floor.split)
        candidate = None if split is None else split.models.get("candidate")
        checks.append(threshold_check(
            f"floor: {floor.split} {floor.metric}", None if candidate is None else candidate.overall.metric(floor.metric),
            evidence.samples(BootstrapKey.overall(floor.split, "candidate", floor.metric)), floor.min, ">=", cfg.alpha,
            detail="" if candidate is not None else f"no candidate metrics for {floor.split} in the evaluation report"))

    ni = cfg.non_inferiority
    if champion:
        key = BootstrapKey.overall("target_holdout", pair_name("candidate", "champion"), ni.metric)
        checks.append(threshold_check(f"non-inferiority to champion: target_holdout {ni.metric}",
                                      _estimate(evaluation.comparison(key)), evidence.samples(key),
                                      -ni.delta, ">=", cfg.alpha, detail="candidate - champion"))
        checks.append(forgetting_check(evidence, cfg))
    else:
        for name in (f"non-inferiority to champion: target_holdout {ni.metric}", forgetting_name(cfg.forgetting)):
            checks.append(Check(name=name, status=NOT_APPLICABLE, detail="no champion in production"))

    baselines = baseline_checks(evidence, cfg)
    checks += baselines
    notes += baseline_notes(baselines, evaluation.splits.get("target_holdout"), cfg.baselines.metric)

    group_checks, insufficient = worst_group_checks(evidence, cfg, small_n)
    checks += group_checks
    checks += disparity_checks(evidence, cfg, champion)
    checks.append(shift_check(evidence.shift))
    return verdict_from(checks, notes, champion, insufficient)


def forgetting_name(fg) -> str:
    return f"forgetting: source_holdout{'_weighted' if fg.weighting == 'importance' else ''} {fg.metric}"


def forgetting_check(evidence: Evidence, cfg: GateConfig) -> Check:
    """candidate - champion on the source domain, raw or importance-weighted; weighted evidence too thin to judge
    (effective rows below the floor) is INCONCLUSIVE, missing weighted evidence a FAIL."""
    fg, name = cfg.forgetting, forgetting_name(cfg.forgetting)
    versus_champion = pair_name("candidate", "champion")
    if fg.weighting == "none":
        key = BootstrapKey.overall("source_holdout", versus_champion, fg.metric)
        return threshold_check(name, _estimate(evidence.evaluation.comparison(key)), evidence.samples(key),
                               -fg.max_drop, ">=", cfg.alpha, detail="candidate - champion on the source domain")
    weighted = evidence.evaluation.weighted
    if isinstance(weighted, WeightedUnavailable):
        return Check(name=name, status=FAIL, detail="no importance-weighted evaluation of the source holdout: "
                     + weighted.problem)
    ess = weighted.effective_sample_size
    if ess < fg.min_effective_rows:
        return Check(name=name, status=INCONCLUSIVE, value=None, threshold=-fg.max_drop, direction=">=",
                     detail=f"the importance weights leave {ess:.1f} effective source rows (< {fg.min_effective_rows:g}): "
                            "too few to judge forgetting on what the target still needs")
    key = BootstrapKey.overall(weighted.split, versus_champion, fg.metric)
    return threshold_check(name, _estimate(weighted.comparison(key)), evidence.samples(key), -fg.max_drop, ">=",
                           cfg.alpha, detail=f"candidate - champion on the source domain weighted to the target "
                                             f"({ess:.0f} effective rows)")


# The simple models evaluate trains beside the candidate: a transformer that does not beat them does not earn its cost.
BASELINES = {"tfidf": "TF-IDF + logistic regression", "frozen_encoder": "the frozen encoder + logistic regression"}


def baseline_checks(evidence: Evidence, cfg: GateConfig) -> list[Check]:
    """The candidate against each simple baseline on target_holdout, Holm-corrected as one family: worse by more
    than `gate.baselines.margin` fails; a baseline missing from the evaluation fails (fail closed)."""
    metric, margin = cfg.baselines.metric, cfg.baselines.margin
    checks = []
    for model, description in BASELINES.items():
        key = BootstrapKey.overall("target_holdout", pair_name("candidate", model), metric)
        entry = evidence.evaluation.comparison(key)
        checks.append(threshold_check(
            f"baseline: candidate vs {model} target_holdout {metric}", _estimate(entry),
            evidence.samples(key), -margin, ">=", cfg.alpha,
            detail=f"candidate - {description}" if entry else f"no comparison with {description} in the evaluation"))
    return [baseline_scores_higher(check) for check in holm_decide(checks, cfg.alpha)]


BASELINE_SCORES_HIGHER = "the simple baseline scores higher"


def baseline_scores_higher(check: Check) -> Check:
    """A candidate whose point estimate is below a simple baseline's is never a silent PASS, whatever the margin: the
    margin bounds how much worse the evidence may allow, not a licence to serve a model that scores lower."""
    if check.status != PASS or check.value is None or check.value >= 0:
        return check
    check.status = INCONCLUSIVE
    check.detail = f"{BASELINE_SCORES_HIGHER} ({check.detail}: {check.value:+.4f}); within the margin, so not a FAIL"
    return check


def baseline_notes(checks: list[Check], split: SplitReport | None, metric: str) -> list[str]:
    """Said plainly when a simple baseline beats the candidate, or may."""
    notes = []
    for check, (model, description) in zip(checks, BASELINES.items()):
        if check.value is None or check.status not in (FAIL, INCONCLUSIVE) or check.value >= 0:
            continue
        scores = {name: _overall_score(split, name, metric) for name in ("candidate", model)}
        low, high = check.interval
        score = "" if None in scores.values() else f"{scores[model]:.3f} against {scores['candidate']:.3f}; "
        evidence = (f"{score}difference {check.value:+.3f}" + ("" if low is None else f" [{low:+.3f}, {high:+.3f}]")
                    + f", margin {-check.threshold:.3f}")
        if check.status == FAIL:
            notes.append(f"A simple baseline wins: {description} beats the candidate on target_holdout {metric} "
                         f"({evidence}). The fine-tuned model does not earn its cost here: serve the baseline, or "
                         "give training more data, epochs or another strategy.")
        else:
            notes.append(f"A simple baseline may win: {description} scores higher than the candidate on "
                         f"target_holdout {metric} ({evidence}), and the evidence cannot rule out that it is better "
                         "by more than the margin.")
    return notes


def worst_group_checks(evidence: Evidence, cfg: GateConfig,
                       small_n: int) -> tuple[list[Check], list[InsufficientGroup]]:
    """Every judged group x metric against the floor, Holm-corrected as one family."""
    wg = cfg.worst_group
    split = evidence.evaluation.splits.get("target_holdout")
    configured = [] if split is None else split.configured_columns()
    candidate_groups = _candidate_groups(split)
    checks: list[Check] = []
    insufficient: list[InsufficientGroup] = []
    for column in configured:
        info = split.group_columns.get(column)
        breakdown = candidate_groups.get(column)
        if info is None or breakdown is None:
            checks.append(Check(name=f"worst group: {column}", status=FAIL,
                                detail=f"group column {column!r} is missing from the evaluation"))
            continue
        for group, n in info.merged_into_other.items():
            insufficient.append(InsufficientGroup(column=column, group=group, n=n, detail=(
                f"fewer than {info.min_group_size} rows: merged into \"other\"")))
        for group, size in info.sizes.items():
            if group not in info.eligible:
                insufficient.append(InsufficientGroup(column=column, group=group, n=size, detail=(
                    f"fewer than {info.min_group_size} rows: not judged on its own")))
        for group in info.eligible:
            entry = breakdown.groups.get(group)
            for metric in wg.metrics:
                name = f"worst group: {column}={group} {metric}"
                value = None if entry is None else entry.metric(metric)
                if entry is None or value is None:
                    checks.append(Check(name=name, status=FAIL, threshold=wg.floor,
                                        detail=f"group {group!r} or its {metric} is missing from the evaluation"))
                    continue
                n = entry.n
                if metric == "accuracy" and n < small_n:
                    check = Check(name=name, status=FAIL, value=float(value), threshold=wg.floor,
                                  interval=_wilson(value, n, cfg.alpha), detail=f"n={n}, Wilson score test")
                    check.p_meets, check.p_violates = score_test_p_values(value, n, wg.floor, ">=")
                else:
                    samples = evidence.samples(BootstrapKey.of_group("target_holdout", "candidate", column, group,
                                                                     metric))
                    check = Check(name=name, status=FAIL, value=float(value), threshold=wg.floor,
                                  interval=interval_of(samples, cfg.alpha), detail=f"n={n}, bootstrap")
                    p = None if samples is None else bootstrap_p_values(samples, wg.floor, ">=")
                    if p is not None:
                        check.p_meets, check.p_violates = p
                checks.append(check)
    if configured and not checks:
        checks.append(Check(name="worst group", status=INCONCLUSIVE,
                            detail="no group has enough rows to be judged (evaluate.min_group_size)"))
    return holm_decide(checks, cfg.alpha), insufficient


def disparity_checks(evidence: Evidence, cfg: GateConfig, champion: bool) -> list[Check]:
    """Largest between-group gap of the candidate, and its increase over the champion's, per group column."""
    d = cfg.disparity
    split = evidence.evaluation.splits.get("target_holdout")
    candidate_groups = _candidate_groups(split)
    checks: list[Check] = []
    for column in [] if split is None else split.configured_columns():
        breakdown = candidate_groups.get(column)
        entry = None if breakdown is None else breakdown.disparity.get(d.metric)
        if entry is None:
            checks.append(Check(name=f"disparity: {column} {d.metric} gap", status=FAIL,
                                detail=f"group column {column!r} is missing from the evaluation"))
            continue
        if entry.groups < 2:
            checks.append(Check(name=f"disparity: {column} {d.metric} gap", status=INCONCLUSIVE,
                                detail=f"{entry.groups} group(s) large enough to compare; a gap needs two"))
            continue
        checks.append(threshold_check(
            f"disparity: {column} {d.metric} gap", entry.gap,
            evidence.samples(BootstrapKey.gap("target_holdout", "candidate", column, d.metric)), d.max_gap, "<=",
            cfg.alpha, detail=f"worst group {entry.worst_group} ({entry.worst_value:.3f}), ratio {entry.ratio or 0:.3f}"))
        if champion:
            key = BootstrapKey.gap("target_holdout", pair_name("candidate", "champion"), column, d.metric)
            checks.append(threshold_check(
                f"disparity: {column} {d.metric} gap vs champion", _estimate(split.comparison(key)),
                evidence.samples(key), d.max_increase, "<=", cfg.alpha, detail="candidate gap - champion gap"))
    return holm_decide(checks, cfg.alpha)


def holm_decide(checks: list[Check], alpha: float) -> list[Check]:
    """Holm-adjust both p-value families over the checks that have them, then decide each."""
    testable = [c for c in checks if c.p_meets is not None]
    if testable:
        for c, meets, violates in zip(testable, holm([c.p_meets for c in testable]), holm([c.p_violates for c in testable])):
            c.p_meets, c.p_violates = meets, violates
    return [decide(c, alpha) if c.p_meets is not None else c for c in checks]


def shift_check(shift: ShiftReport | None) -> Check:
    """The shift stage's decision must not be to block (missing report: fail closed)."""
    if shift is None:
        return Check(name="shift", status=FAIL, detail="no shift report (reports/shift.json) to read")
    blocked = shift.verdict == "severe" and shift.on_severe == "block"
    return Check(name="shift", status=FAIL if blocked else PASS,
                 detail=f"verdict {shift.verdict}, on_severe={shift.on_severe}"
                        + (": severe shift blocks promotion" if blocked else ""))


def verdict_from(checks: list[Check], notes: list[str], champion: bool,
                 insufficient: list[InsufficientGroup]) -> Verdict:
    statuses = {c.status for c in checks}
    verdict = FAIL if FAIL in statuses else INCONCLUSIVE if INCONCLUSIVE in statuses else PASS
    return Verdict(
        verdict=verdict,
        champion=champion,
        criteria=checks,
        failed=[c.name for c in checks if c.status == FAIL],
        inconclusive=[c.name for c in checks if c.status == INCONCLUSIVE],
        insufficient_data=insufficient,
        notes=notes,
    )


def decide_on_verdict(verdict: Verdict, verdict_sha256: str, on_inconclusive: str,
                      answer: dict | None = None) -> Decision:
    """The decision on a verdict, as its own record: PASS and FAIL decide themselves; an INCONCLUSIVE
    verdict takes a person's answer when one was given for exactly this verdict, else gate.on_inconclusive."""
    import datetime as dt

    name = verdict.verdict
    if name == INCONCLUSIVE and answer is not None:
        approved, by, reason = answer["approved"], answer["by"], answer["reason"]
    elif name == INCONCLUSIVE:
        approved, by = on_inconclusive == "approve", "policy"
        reason = f"gate.on_inconclusive={on_inconclusive} (nobody answered)"
    else:
        approved, by = name == PASS, "gate"
        reason = "every criterion passed" if approved else f"gate {name}: " + ", ".join(verdict.failed or ["no verdict"])
    return Decision(verdict=name, verdict_sha256=verdict_sha256, approved=bool(approved) and name in (PASS, INCONCLUSIVE),
                    by=by, reason=reason, undecided=list(verdict.inconclusive),
                    at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def answer_file(folder: Path, verdict_sha256: str) -> Path:
    """Where a person's answer to one INCONCLUSIVE verdict is kept: keyed by the verdict's bytes, so an
    answer can never approve a different verdict."""
    return Path(folder) / f"{verdict_sha256}.json"


def read_answer(path: Path) -> dict | None:
    """A person's answer ({approved, by, reason}), or None when nobody answered; a malformed file is refused."""
    import json

    from tasks.errors import DataError

    if not path.is_file():
        return None
    try:
        answer = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(answer.get("approved"), bool) and isinstance(answer.get("by"), str)
                and isinstance(answer.get("reason"), str)):
            raise ValueError("needs approved (true/false), by and reason")
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{path}: not a valid answer to the gate ({exc})") from None
    return answer


def promotable(verdict: str | None, approved: bool) -> bool:
    """PASS, or INCONCLUSIVE approved by a recorded decision; anything else, including nothing, is not."""
    return verdict == PASS or (verdict == INCONCLUSIVE and approved is True)


def _estimate(comparison: Comparison | None) -> float | None:
    """A comparison's point estimate; None when the evaluation has no such comparison (a check then fails closed)."""
    return None if comparison is None else comparison.estimate


def _overall_score(split: SplitReport | None, model: str, metric: str) -> float | None:
    result = None if split is None else split.models.get(model)
    return None if result is None else result.overall.metric(metric)


def _candidate_groups(split: SplitReport | None) -> dict:
    """The candidate's per-group breakdowns by column; empty when the split or the candidate is missing."""
    candidate = None if split is None else split.models.get("candidate")
    return {} if candidate is None else candidate.groups


def _wilson(rate: float, n: int, alpha: float) -> list[float | None]:
    return wilson_interval(rate * n, n, 1 - alpha)
