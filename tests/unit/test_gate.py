"""The gate, table-driven: every criterion PASS / FAIL / INCONCLUSIVE, and fail-closed on missing evidence."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import EvaluateConfig, GateConfig, load_params
from tasks.evaluate import bootstrap_table, evaluate_split, transfer_gain
from tasks.gate import FAIL, INCONCLUSIVE, NOT_APPLICABLE, PASS, Evidence, holm, judge, promotable
from tasks.reports import (BootstrapKey, Check, Decision, EvaluateReport, ShiftReport, Verdict, WeightedUnavailable,
                           read_report, write_report)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
LABELS = ["negative", "neutral", "positive"]
EVAL_CFG = EvaluateConfig(min_group_size=10, intersections=False, bootstrap=500, confidence=0.95, small_n=30,
                          ece_bins=10, seed=0)
LENIENT = {
    "alpha": 0.05,
    "floors": [{"split": "target_holdout", "metric": "accuracy", "min": 0.1}],
    "non_inferiority": {"metric": "accuracy", "delta": 0.5},
    "worst_group": {"metrics": ["accuracy"], "floor": 0.1},
    "disparity": {"metric": "accuracy", "max_gap": 0.9, "max_increase": 0.9},
    "forgetting": {"metric": "accuracy", "max_drop": 0.9, "weighting": "none", "min_effective_rows": 30},
    "baselines": {"metric": "accuracy", "margin": 0.9},
    "on_inconclusive": "reject",
    "decision_timeout_seconds": 60,
}


def predictions(y: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(accuracy * n) rows right, the rest wrong, in random order."""
    right = np.zeros(len(y), dtype=bool)
    right[: round(accuracy * len(y))] = True
    rng.shuffle(right)
    pred = np.where(right, y, (y + 1) % 3)
    proba = np.full((len(y), 3), 0.1)
    proba[np.arange(len(y)), pred] = 0.8
    return proba


# The baselines' accuracy in every group: both below the candidate's 0.709 on the target; BEATEN puts TF-IDF above it.
BASELINE_ACCURACY = {"tfidf": 0.65, "frozen_encoder": 0.60}
BEATEN = {"tfidf": 0.80, "frozen_encoder": 0.60}


def split_frame(groups: dict[str, tuple[int, float, float]], seed: int,
                baselines: dict[str, float] = BASELINE_ACCURACY) -> tuple[pd.DataFrame, dict]:
    """Rows per group with the candidate's and the champion's accuracy in that group, and the two baselines'."""
    rng, baseline_rng = np.random.default_rng(seed), np.random.default_rng(seed + 100)
    frames, probas = [], {}
    for group, (n, acc_candidate, acc_champion) in groups.items():
        y = rng.integers(0, 3, n)
        frames.append(pd.DataFrame({"label": [LABELS[i] for i in y], "condition": group}))
        probas.setdefault("candidate", []).append(predictions(y, acc_candidate, rng))
        probas.setdefault("champion", []).append(predictions(y, acc_champion, rng))
        for model, accuracy in baselines.items():
            probas.setdefault(model, []).append(predictions(y, accuracy, baseline_rng))
    return pd.concat(frames, ignore_index=True), {model: np.vstack(rows) for model, rows in probas.items()}


def shift_report(verdict: str = "moderate", on_severe: str = "warn", auc: float | None = 0.625) -> ShiftReport:
    """reports/shift.json with the verdict and the policy the gate reads, and the domain classifier's AUC that
    finetune's rule reads (None: not finite)."""
    return ShiftReport.model_validate(shift_json(verdict, on_severe, auc))


def shift_json(verdict: str = "moderate", on_severe: str = "warn", auc: float | None = 0.625) -> dict:
    """reports/shift.json as the shift stage writes it, keys in its order (its per-row scores cut short)."""
    flagged = verdict != "none"
    reason = "classifier: AUC - 0.5 0.125 > null cut-off 0.0446 (p = 8.9e-12)" + " - severe" * (verdict == "severe")
    return {
        "verdict": verdict,
        "reasons": [reason] if flagged else ["no test found a shift larger than source-vs-source noise"],
        "alpha": 0.05,
        "tests": [
            {"name": "classifier", "statistic": auc, "p_value": 8.87e-12, "effect": None if auc is None else auc - 0.5,
             "effect_name": "AUC - 0.5", "detail": {"folds": 5, "auc": auc}, "cutoff": 0.0446, "flagged": flagged,
             "severe": verdict == "severe"},
            {"name": "label_shift", "statistic": 48.3, "p_value": 3.3e-11, "effect": 0.197,
             "effect_name": "total variation of class priors",
             "detail": {"labels": LABELS, "source_prior": [0.157, 0.089, 0.754],
                        "estimated_target_prior": [0.186, 0.144, 0.67],
                        "estimated_interval_95": [[0.101, 0.032, 0.613], [0.261, 0.218, 0.808]],
                        "method": "EM / maximum-likelihood label shift", "labelled_target_prior": [0.348, 0.095, 0.557],
                        "assumption_check": {"checked": True, "holds": True}, "identifiable": True},
             "cutoff": 0.1, "flagged": False, "severe": False}],
        "null_cutoffs": {"classifier": 0.0446, "label_shift": 0.1}, "n_source": 440, "n_target": 538,
        "most_target_specific": [{"text": "a review unlike the source's", "target_score": 0.97, "label": "negative"}],
        "domain_scores": {"source": [0.31, 0.42], "target": [0.97, 0.55]},
        "plots": ["reports/shift/embeddings_pca.png"], "stage": "shift", "on_severe": on_severe}


def build_evidence(champion: bool = True, shift: ShiftReport | None = None,
                   baselines: dict[str, float] = BASELINE_ACCURACY) -> Evidence:
    """Candidate: 0.9 in group A, 0.5 in B (gap 0.4), worse than the champion overall (0.85 flat) and on
    the source domain (0.70 vs 0.85); 18 rows in three small groups merged into "other"."""
    target, target_probas = split_frame({"A": (300, 0.9, 0.85), "B": (280, 0.5, 0.85), "C": (8, 0.75, 0.75),
                                         "D": (6, 0.83, 0.83), "E": (4, 0.75, 0.75)}, seed=1, baselines=baselines)
    source, source_probas = split_frame({"A": (200, 0.7, 0.85), "B": (200, 0.7, 0.85)}, seed=2, baselines=baselines)
    splits, samples = {}, {}
    for name, frame, probas in (("target_holdout", target, target_probas), ("source_holdout", source, source_probas)):
        if not champion:
            probas = {model: proba for model, proba in probas.items() if model != "champion"}
        splits[name], split_samples = evaluate_split(frame, probas, LABELS, ["condition"], EVAL_CFG, name)
        samples.update(split_samples)
    evaluation = EvaluateReport(
        labels=LABELS, champion="models/production" if champion else None,
        models={model: model for model in target_probas if champion or model != "champion"},
        bootstrap=EVAL_CFG.bootstrap, confidence=EVAL_CFG.confidence, splits=splits, transfer_gain=transfer_gain(splits),
        weighted=WeightedUnavailable(split="source_holdout_weighted", problem="no importance weights in this test"),
        bootstrap_file="reports/evaluate/bootstrap.parquet")
    return Evidence(evaluation=evaluation, bootstrap=bootstrap_table(samples),
                    shift=shift if shift is not None else shift_report())


@pytest.fixture(scope="module")
def evidence() -> Evidence:
    return build_evidence()


@pytest.fixture(scope="module")
def beaten_evidence() -> Evidence:
    """The same candidate with TF-IDF above it on the target (0.799 against 0.709)."""
    return build_evidence(baselines=BEATEN)


def gate_config(**changes) -> GateConfig:
    return GateConfig(**{**copy.deepcopy(LENIENT), **changes})


def criterion(verdict: Verdict, prefix: str) -> list[Check]:
    rows = [c for c in verdict.criteria if c.name.startswith(prefix)]
    assert rows, f"no criterion {prefix!r} in {[c.name for c in verdict.criteria]}"
    return rows


def status_of(rows: list[Check]) -> str:
    statuses = {r.status for r in rows}
    return FAIL if FAIL in statuses else INCONCLUSIVE if INCONCLUSIVE in statuses else PASS


# Observed values of the evidence above: target accuracy 0.709 [0.679, 0.741], candidate - champion
# -0.139 [-0.181, -0.097], group B 0.50 [0.45, 0.56], gap 0.40 [0.34, 0.47], gap increase over the champion
# 0.33 [0.12, 0.41], source accuracy candidate - champion -0.15 [-0.20, -0.09], candidate - TF-IDF (BEATEN)
# -0.090 [-0.134, -0.047], candidate - frozen encoder +0.109 [0.064, 0.162].
CASES = [
    ("floor:", {"floors": [{"split": "target_holdout", "metric": "accuracy", "min": 0.6}]}, PASS),
    ("floor:", {"floors": [{"split": "target_holdout", "metric": "accuracy", "min": 0.9}]}, FAIL),
    ("floor:", {"floors": [{"split": "target_holdout", "metric": "accuracy", "min": 0.71}]}, INCONCLUSIVE),
    ("floor:", {"floors": [{"split": "source_holdout", "metric": "macro_f1", "min": 0.9}]}, FAIL),
    ("non-inferiority", {"non_inferiority": {"metric": "accuracy", "delta": 0.3}}, PASS),
    ("non-inferiority", {"non_inferiority": {"metric": "accuracy", "delta": 0.0}}, FAIL),
    ("non-inferiority", {"non_inferiority": {"metric": "accuracy", "delta": 0.14}}, INCONCLUSIVE),
    ("worst group", {"worst_group": {"metrics": ["accuracy"], "floor": 0.3}}, PASS),
    ("worst group", {"worst_group": {"metrics": ["accuracy", "macro_f1"], "floor": 0.7}}, FAIL),
    ("worst group", {"worst_group": {"metrics": ["accuracy"], "floor": 0.5}}, INCONCLUSIVE),
    ("disparity: condition accuracy gap", {"disparity": {"metric": "accuracy", "max_gap": 0.6, "max_increase": 0.9}}, PASS),
    ("disparity: condition accuracy gap", {"disparity": {"metric": "accuracy", "max_gap": 0.1, "max_increase": 0.9}}, FAIL),
    ("disparity: condition accuracy gap", {"disparity": {"metric": "accuracy", "max_gap": 0.4, "max_increase": 0.9}}, INCONCLUSIVE),
    ("disparity: condition accuracy gap vs champion", {"disparity": {"metric": "accuracy", "max_gap": 0.9, "max_increase": 0.6}}, PASS),
    ("disparity: condition accuracy gap vs champion", {"disparity": {"metric": "accuracy", "max_gap": 0.9, "max_increase": 0.0}}, FAIL),
    ("disparity: condition accuracy gap vs champion", {"disparity": {"metric": "accuracy", "max_gap": 0.9, "max_increase": 0.33}}, INCONCLUSIVE),
    ("forgetting", {"forgetting": {"metric": "accuracy", "max_drop": 0.4, "weighting": "none", "min_effective_rows": 30}}, PASS),
    ("forgetting", {"forgetting": {"metric": "accuracy", "max_drop": 0.0, "weighting": "none", "min_effective_rows": 30}}, FAIL),
    ("forgetting", {"forgetting": {"metric": "accuracy", "max_drop": 0.15, "weighting": "none", "min_effective_rows": 30}}, INCONCLUSIVE),
    ("baseline:", {"baselines": {"metric": "accuracy", "margin": 0.0}}, PASS),  # above both baselines
]


@pytest.mark.parametrize("margin,expected,reason", [
    (0.0, FAIL, "candidate - TF-IDF"),            # the interval shows it worse beyond the margin
    (0.09, INCONCLUSIVE, "candidate - TF-IDF"),   # the interval cannot tell
    (0.3, INCONCLUSIVE, "the simple baseline scores higher"),  # within the margin, but below: never a silent PASS
    (0.9, INCONCLUSIVE, "the simple baseline scores higher"),
])
def test_a_candidate_below_a_baseline_never_passes(beaten_evidence, margin, expected, reason):
    verdict = judge(beaten_evidence, gate_config(baselines={"metric": "accuracy", "margin": margin}), small_n=30)
    row = criterion(verdict, "baseline: candidate vs tfidf")[0]
    assert row.status == expected and reason in row.detail, row
    assert criterion(verdict, "baseline: candidate vs frozen_encoder")[0].status == PASS
    assert verdict.verdict == expected


@pytest.mark.parametrize("prefix,changes,expected", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_each_criterion_passes_fails_or_is_inconclusive(evidence, prefix, changes, expected):
    verdict = judge(evidence, gate_config(**changes), small_n=30)
    assert status_of(criterion(verdict, prefix)) == expected, criterion(verdict, prefix)
    # Every other criterion is lenient, so the verdict is this criterion's status.
    assert verdict.verdict == expected
    assert promotable(verdict.verdict, approved=False) is (expected == PASS)


def test_lenient_gate_passes_and_lists_small_groups_as_insufficient_data(evidence):
    verdict = judge(evidence, gate_config(), small_n=30)
    assert verdict.verdict == PASS
    assert {(r.group, r.n) for r in verdict.insufficient_data} == {("C", 8), ("D", 6), ("E", 4)}
    names = [c.name for c in verdict.criteria]
    assert "worst group: condition=other accuracy" in names  # 18 merged rows are judged together
    other = next(c for c in verdict.criteria if c.name == "worst group: condition=other accuracy")
    assert "Wilson" in other.detail


@pytest.mark.parametrize("shift,expected", [
    (("severe", "warn"), PASS),
    (("severe", "block"), FAIL),
    (("none", "block"), PASS),
    (None, FAIL),  # no readable shift report: fail closed
])
def test_shift_criterion(shift, expected):
    evidence = build_evidence()
    evidence.shift = shift_report(*shift) if shift else None
    verdict = judge(evidence, gate_config(), small_n=30)
    assert criterion(verdict, "shift")[0].status == expected


def test_no_champion_applies_only_absolute_criteria():
    verdict = judge(build_evidence(champion=False), gate_config(), small_n=30)
    assert verdict.verdict == PASS and verdict.champion is False
    assert criterion(verdict, "non-inferiority")[0].status == NOT_APPLICABLE
    assert criterion(verdict, "forgetting")[0].status == NOT_APPLICABLE
    assert not [c for c in verdict.criteria if c.name.endswith("vs champion")]
    assert "only the absolute criteria apply" in verdict.notes[0]


def damaged(evidence: Evidence, damage) -> Evidence:
    broken = Evidence(copy.deepcopy(evidence.evaluation), evidence.bootstrap.copy(), evidence.shift.model_copy())
    damage(broken)
    return broken


def drop_group_column(e: Evidence):
    split = e.evaluation.splits["target_holdout"]
    del split.group_columns["condition"]
    split.missing_group_columns = ["condition"]


def drop_group(e: Evidence):
    del e.evaluation.splits["target_holdout"].models["candidate"].groups["condition"].groups["B"]


def nan_metric(e: Evidence):
    e.evaluation.splits["target_holdout"].models["candidate"].overall.accuracy = None


def nan_resamples(e: Evidence):
    e.bootstrap[BootstrapKey.overall("target_holdout", "candidate", "accuracy").to_str()] = np.nan


def drop_resamples(e: Evidence):
    e.bootstrap = e.bootstrap.drop(columns=[BootstrapKey.overall("target_holdout", "candidate-champion", "accuracy").to_str()])


FAIL_CLOSED = [
    ("missing group column", drop_group_column, "worst group: condition"),
    ("missing group", drop_group, "worst group: condition=B accuracy"),
    ("NaN metric", nan_metric, "floor: target_holdout accuracy"),
    ("NaN resamples", nan_resamples, "floor: target_holdout accuracy"),
    ("missing resamples", drop_resamples, "non-inferiority"),
]


@pytest.mark.parametrize("case,damage,failed", FAIL_CLOSED, ids=[c[0] for c in FAIL_CLOSED])
def test_missing_or_nan_evidence_fails_closed(evidence, case, damage, failed):
    verdict = judge(damaged(evidence, damage), gate_config(), small_n=30)
    assert verdict.verdict == FAIL
    assert any(name.startswith(failed) for name in verdict.failed), verdict.failed


def test_missing_evaluation_fails_closed():
    verdict = judge(Evidence(None, None, shift_report("none"), problems=["reports/evaluate.json: not found"]),
                    gate_config(), small_n=30)
    assert verdict.verdict == FAIL and verdict.failed == ["evidence"]
    assert "reports/evaluate.json: not found" in verdict.criteria[0].detail


def test_groups_too_small_to_judge_are_inconclusive_not_passed(evidence):
    tiny = EvaluateConfig(**{**EVAL_CFG.model_dump(), "min_group_size": 10_000})
    frame, probas = split_frame({"A": (30, 0.9, 0.9), "B": (30, 0.9, 0.9)}, seed=3)
    evaluation = copy.deepcopy(evidence.evaluation)
    evaluation.splits["target_holdout"], samples = evaluate_split(frame, probas, LABELS, ["condition"], tiny, "target_holdout")
    bootstrap = evidence.bootstrap.copy()
    for key, value in samples.items():
        bootstrap[key.to_str()] = value
    verdict = judge(Evidence(evaluation, bootstrap, shift_report("none")), gate_config(), small_n=30)
    assert criterion(verdict, "worst group")[0].status == INCONCLUSIVE
    assert criterion(verdict, "disparity")[0].status == INCONCLUSIVE
    assert verdict.verdict == INCONCLUSIVE


def test_holm_matches_statsmodels():
    # Reference: statsmodels 0.15 `multipletests(p, method="holm")[1]` (not a dependency of regraft).
    assert holm([0.01, 0.04, 0.03, 0.005, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])


# ----------------------------------------------------------------------------- the stage runner


@pytest.fixture
def gate_workspace(tmp_path, monkeypatch, evidence):
    """A folder with params.yaml and the reports the gate reads, as the DVC stage sees them."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    reports = tmp_path / "reports"
    (reports / "evaluate").mkdir(parents=True)
    evidence.bootstrap.to_parquet(reports / "evaluate" / "bootstrap.parquet")
    write_report(reports / "evaluate.json", evidence.evaluation)
    write_report(reports / "shift.json", evidence.shift)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_gate(workspace: Path, **gate) -> tuple[int, Verdict]:
    from pipelines.gate import main
    from tasks.config import write_overrides

    write_overrides(workspace / "params.yaml", {f"gate.{k}": v for k, v in {**LENIENT, **gate}.items()})
    code = main(load_params(workspace / "params.yaml"))
    return code, read_report(workspace / "reports" / "verdict.json", Verdict)


def test_stage_exits_zero_on_pass_and_one_on_fail(gate_workspace, capsys):
    code, verdict = run_gate(gate_workspace)
    assert code == 0 and verdict.verdict == PASS
    code, verdict = run_gate(gate_workspace, worst_group={"metrics": ["accuracy"], "floor": 0.7})
    assert code == 1 and verdict.verdict == FAIL
    assert "worst group: condition=B accuracy" in capsys.readouterr().err


def run_decide(workspace: Path, answer: dict | None = None, **gate) -> tuple[int, Decision]:
    """The decide stage on the verdict in the workspace, with a person's answer filed for it when given."""
    from pipelines.decide import main
    from tasks.config import write_overrides
    from tasks.files import sha256_of, write_json
    from tasks.gate import answer_file

    if gate:
        write_overrides(workspace / "params.yaml", {f"gate.{k}": v for k, v in gate.items()})
    params = load_params(workspace / "params.yaml")
    if answer is not None:
        write_json(answer_file(params.paths.gate_answers, sha256_of(params.paths.verdict)), answer)
    code = main(params)
    return code, read_report(params.paths.decision, Decision)


UNDECIDED = {"worst_group": {"metrics": ["accuracy"], "floor": 0.5}}


@pytest.mark.parametrize("policy,code", [("reject", 1), ("approve", 0)])
def test_inconclusive_with_nobody_to_ask_follows_the_policy(gate_workspace, policy, code):
    returned, verdict = run_gate(gate_workspace, **UNDECIDED)
    assert returned == 0 and verdict.verdict == INCONCLUSIVE and "decision" not in verdict.model_dump()
    before = (gate_workspace / "reports" / "verdict.json").read_bytes()
    returned, decision = run_decide(gate_workspace, on_inconclusive=policy)
    assert returned == code and decision.approved is (policy == "approve") and decision.by == "policy"
    assert decision.undecided == verdict.inconclusive
    assert promotable(verdict.verdict, decision.approved) is (policy == "approve")
    # The verdict is the gate's alone: deciding never rewrites it.
    assert (gate_workspace / "reports" / "verdict.json").read_bytes() == before


def test_a_persons_answer_decides_only_the_verdict_it_was_given_for(gate_workspace):
    run_gate(gate_workspace, **UNDECIDED)
    code, decision = run_decide(gate_workspace, answer={"approved": True, "by": "ana", "reason": "groups checked"},
                                on_inconclusive="reject")
    assert code == 0 and decision.approved is True and decision.by == "ana"
    # A new verdict (other evidence) is not covered by that answer: the policy decides again.
    run_gate(gate_workspace, worst_group={"metrics": ["accuracy"], "floor": 0.51})
    code, decision = run_decide(gate_workspace)
    assert code == 1 and decision.by == "policy"


def test_pass_and_fail_decide_themselves(gate_workspace):
    run_gate(gate_workspace)
    timeless = [run_decide(gate_workspace)[1].model_copy(update={"at": ""}) for _ in range(2)]
    assert timeless[0] == timeless[1]
    code, decision = run_decide(gate_workspace, answer={"approved": False, "by": "x", "reason": "ignored"})
    assert code == 0 and decision.approved is True and decision.by == "gate"
    run_gate(gate_workspace, worst_group={"metrics": ["accuracy"], "floor": 0.7})
    code, decision = run_decide(gate_workspace, answer={"approved": True, "by": "x", "reason": "ignored"})
    assert code == 1 and decision.approved is False and decision.by == "gate"


def test_a_malformed_answer_is_refused(gate_workspace):
    from tasks.errors import DataError

    run_gate(gate_workspace, **UNDECIDED)
    with pytest.raises(DataError, match="not a valid answer to the gate"):
        run_decide(gate_workspace, answer={"approved": "yes please", "by": "x", "reason": "r"})


def test_missing_evaluation_file_writes_a_failing_verdict(gate_workspace):
    (gate_workspace / "reports" / "evaluate.json").unlink()
    code, verdict = run_gate(gate_workspace)
    assert code == 1 and verdict.verdict == FAIL
    assert "evaluate.json: not found" in verdict.criteria[0].detail


@pytest.mark.parametrize("margin,said", [(0.0, "A simple baseline wins: TF-IDF + logistic regression beats the candidate"),
                                         (0.09, "A simple baseline may win: TF-IDF + logistic regression scores higher")])
def test_a_baseline_that_wins_is_said_plainly(beaten_evidence, margin, said):
    verdict = judge(beaten_evidence, gate_config(baselines={"metric": "accuracy", "margin": margin}), small_n=30)
    notes = [n for n in verdict.notes if "baseline" in n]
    assert len(notes) == 1 and notes[0].startswith(said), notes  # the frozen encoder is behind: not mentioned
    assert "(0.799 against 0.709; difference -0.090 [-0.134, -0.047]" in notes[0]


def test_a_missing_baseline_fails_closed(evidence):
    bare = copy.deepcopy(evidence)
    del bare.evaluation.splits["target_holdout"].comparisons["candidate-tfidf"]
    verdict = judge(bare, gate_config(), small_n=30)
    row = criterion(verdict, "baseline: candidate vs tfidf")[0]
    assert row.status == FAIL and "no comparison with TF-IDF" in row.detail and verdict.verdict == FAIL


def with_weighted_source(evidence: Evidence, weights: np.ndarray | None) -> Evidence:
    """The evidence plus evaluate's importance-weighted source holdout (None: evaluate wrote no weighted entry)."""
    from tasks.evaluate import weighted_split

    broken = Evidence(copy.deepcopy(evidence.evaluation), evidence.bootstrap.copy(), evidence.shift.model_copy())
    if weights is None:
        broken.evaluation.weighted = WeightedUnavailable(split="source_holdout_weighted",
                                                         problem="no importance weights in x")
        return broken
    source, probas = split_frame({"A": (200, 0.7, 0.85), "B": (200, 0.7, 0.85)}, seed=2)
    y = source["label"].map({label: i for i, label in enumerate(LABELS)}).to_numpy()
    broken.evaluation.weighted, samples = weighted_split(y, probas, weights, LABELS, EVAL_CFG, "source_holdout_weighted")
    broken.bootstrap = pd.concat([broken.bootstrap, bootstrap_table(samples)], axis=1)
    return broken


@pytest.mark.parametrize("weights,max_drop,expected", [
    (np.ones(400), 0.4, PASS),
    (np.ones(400), 0.0, FAIL),
    (np.r_[np.full(5, 100.0), np.full(395, 0.01)], 0.4, INCONCLUSIVE),  # ~5 effective rows: too few to judge
    (None, 0.4, FAIL),  # configured, but evaluate has no weighted evidence: fail closed
])
def test_forgetting_on_the_importance_weighted_source_holdout(evidence, weights, max_drop, expected):
    forgetting = {"metric": "accuracy", "max_drop": max_drop, "weighting": "importance", "min_effective_rows": 30}
    verdict = judge(with_weighted_source(evidence, weights), gate_config(forgetting=forgetting), small_n=30)
    [row] = criterion(verdict, "forgetting: source_holdout_weighted accuracy")
    assert row.status == expected, row
