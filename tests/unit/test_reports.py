"""The typed reports: what is written is read back the same, a file that does not fit its model is refused with the
file and the field named, and the key of a bootstrap statistic has one string form, parsed back the same."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import EXIT_BAD_INPUT, CheckFailed, ReportError
from tasks.evaluate import bootstrap_table, weighted_split
from tasks.gate import decide_on_verdict, judge
from tasks.files import write_json
from tasks.render import render_report
from tasks.reports import (BootstrapKey, Decision, EvaluateReport, FinetuneReport, IngestReport, PackageReport,
                           ShiftReport, Verdict, pair_name, parse_report, read_report, write_report)
from tests.unit.test_gate import EVAL_CFG, LABELS, build_evidence, gate_config, shift_json, split_frame
from tests.unit.test_model_card import FINETUNE_JSON

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reports() -> dict:
    """An evaluation as the evaluate stage builds it (both holdouts, groups, a weighted source holdout), the gate's
    verdict on it and the decision on that verdict."""
    evidence = build_evidence()
    source, probas = split_frame({"A": (200, 0.7, 0.85), "B": (200, 0.7, 0.85)}, seed=2)
    y = source["label"].map({label: i for i, label in enumerate(LABELS)}).to_numpy()
    weighted, _ = weighted_split(y, probas, np.ones(len(y)), LABELS, EVAL_CFG, "source_holdout_weighted")
    evaluation = evidence.evaluation.model_copy(update={"weighted": weighted.model_copy(
        update={"rows_without_weight": 2})})
    verdict = judge(evidence, gate_config(), small_n=30)
    return {"evaluate": evaluation, "verdict": verdict, "decision": decide_on_verdict(verdict, "0" * 64, "reject"),
            "finetune": FinetuneReport.model_validate(FINETUNE_JSON), "shift": ShiftReport.model_validate(shift_json()),
            "ingest": IngestReport.model_validate(INGEST_JSON), "package": PackageReport.model_validate(PACKAGE_JSON)}


# reports/ingest.json and reports/package.json as the stages write them, keys in their order.
INGEST_JSON = {
    "stage": "ingest", "inputs": [{"path": "inputs/reviews.csv", "sha256": "3f" * 32}],
    "split": {"by": "time", "time_cutoff": "2015-01-01", "column": None, "source_values": [], "target_values": [],
              "holdout_fraction": 0.2, "seed": 42},
    "duplicates_dropped": 1, "texts_in_both_domains": 0,
    "splits": {"source_train": {"rows": 352, "labels": {"negative": 55, "neutral": 31, "positive": 266},
                                "time_range": ["2008-02-25", "2014-12-30"], "groups": {"condition": 100}},
               "target_holdout": {"rows": 108, "labels": {"negative": 38, "neutral": 10, "positive": 60},
                                  "time_range": None, "groups": {}}},
}
PACKAGE_JSON = {
    "stage": "package", "model": "regraft-classifier:5kuwmixok26vuax4", "bento": "regraft:5llonchok26vuax4",
    "verdict": "PASS", "smoke_test": {"url": "http://127.0.0.1:43029", "examples": 32, "mismatches": 0,
                                      "model_version": "regraft-classifier:5kuwmixok26vuax4", "seconds": 10.8},
    "registry": "registry/registry.json",
    "remote": {"url": "/srv/remote/regraft-models", "model": {"key": "models/regraft-classifier/5kuwmixok26vuax4.tar",
                                                              "sha256": "3d" * 32, "bytes": 92600320}},
    "lineage": {"data_md5": {"data/target_holdout.parquet": "b5" * 16}, "git_commit": None,
                "params": {"train": {"strategy": "auto"}}, "metrics": None,
                "verdict": {"verdict": "PASS", "failed": [], "inconclusive": []}},
    "promote": "regraft promote regraft-classifier:5kuwmixok26vuax4",
}


@pytest.mark.parametrize("name", ["evaluate", "verdict", "decision", "finetune", "shift", "ingest", "package"])
def test_a_report_reads_back_as_it_was_written(tmp_path, reports, name):
    report = reports[name]
    path = tmp_path / f"{name}.json"
    write_report(path, report)
    assert read_report(path, type(report)) == report
    # Written again from what was read, the bytes are the same: the verdict's sha256 does not move.
    again = tmp_path / f"{name}.again.json"
    write_report(again, read_report(path, type(report)))
    assert again.read_bytes() == path.read_bytes()


def test_the_evaluation_keeps_the_keys_dvc_and_readers_of_the_json_use(tmp_path, reports):
    path = tmp_path / "evaluate.json"
    write_report(path, reports["evaluate"])
    data = json.loads(path.read_text())
    target = data["splits"]["target_holdout"]
    assert set(target["models"]) == {"candidate", "champion", "tfidf", "frozen_encoder"}
    assert target["models"]["candidate"]["overall"]["intervals"]["accuracy_wilson"][0] is not None
    difference = target["comparisons"]["candidate-champion"]["overall|macro_f1"]
    assert difference["interval"][0] <= difference["estimate"] <= difference["interval"][1]
    assert data["transfer_gain"]["metric"] == "macro_f1"
    assert data["weighted"]["split"] == "source_holdout_weighted" and data["weighted"]["rows_without_weight"] == 2
    assert "problem" not in data["weighted"]  # the other shape of `weighted` adds none of its keys


def finetune_without_options() -> dict:
    """A finetune report of the other shapes: strategy by rule (no evidence), too few rows to calibrate or to pool the
    lexical model, one process."""
    data = copy.deepcopy(FINETUNE_JSON)
    del data["rank_weight_sha256"]
    served_as = "the encoder (full) alone (8 validation rows: too few to choose among models)"
    data.update(strategy="full", reason="configured: train.strategy=full", strategy_evidence=[],
                negative_transfer_predicted=None, resumed_from_step=120,
                served_model={"encoder": "full", "lexical_weight": 0.0, "cheap": False, "served_as": served_as},
                calibration={"temperature": 1.0, "note": "8 validation rows: too few to calibrate"},
                lexical_companion={"encoder": "full", "weight": 0.0, "served_as": served_as})
    return data


WRITTEN_BEFORE = [("finetune", FinetuneReport, FINETUNE_JSON), ("finetune", FinetuneReport, finetune_without_options()),
                  ("shift", ShiftReport, shift_json("severe", "block")), ("ingest", IngestReport, INGEST_JSON),
                  ("package", PackageReport, PACKAGE_JSON)]


@pytest.mark.parametrize("name,kind,data", WRITTEN_BEFORE,
                         ids=["finetune-auto", "finetune-configured", "shift", "ingest", "package"])
def test_a_stage_report_is_the_file_the_stage_wrote_before_it_was_typed(tmp_path, name, kind, data):
    """Typing the keys that readers use moves, adds and drops none: the bytes are what write_json made of the plain
    dict, so `dvc metrics` and every reader of the JSON see the same file; and its Markdown renders from it."""
    typed, plain = tmp_path / "typed.json", tmp_path / "plain.json"
    report = kind.model_validate(data)
    write_report(typed, report)
    write_json(plain, data)
    assert typed.read_bytes() == plain.read_bytes()
    assert read_report(typed, kind) == report
    assert render_report(name, json.loads(typed.read_text())).startswith("# ")


def test_a_finetune_report_says_what_its_readers_use(reports):
    report = reports["finetune"]
    tfidf, lora = report.strategy_evidence
    assert tfidf.cross_fitted.rows == 120 and lora.cross_fitted is None
    assert lora.paired[0] == "tfidf" and lora.paired[1].estimate == 0.05 and lora.paired[1].interval == [-0.07, 0.18]
    assert [(step.below, step.to, step.taken) for step in report.lexical_companion.evidence_ladder.steps] == [
        ("tfidf", "feature_extraction", True), ("feature_extraction", "lora", False)]
    assert report.served_model.cheap and report.calibration.method == "temperature scaling on the validation rows"
    assert report.calibration.note is None  # an optional key the stage did not give: None here, no key in the file
    assert report.model_extra == {"rank_weight_sha256": ["e" * 64, "e" * 64]}  # kept, though no reader uses it


def test_keys_a_reader_does_not_use_are_kept(tmp_path, reports):
    data = reports["decision"].model_dump()
    data["reviewed_in"] = "a later version's field"
    path = tmp_path / "decision.json"
    path.write_text(json.dumps(data))
    write_report(path, read_report(path, Decision))
    assert json.loads(path.read_text())["reviewed_in"] == "a later version's field"


def set_path(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) else data[part]
    if value is KeyError:
        del data[last]
    else:
        data[int(last) if isinstance(data, list) else last] = value


MISFITS = [
    ("verdict", "criteria.0.status", "MAYBE", "criteria.0.status: Input should be 'PASS', 'FAIL', 'INCONCLUSIVE' or "
                                              "'N/A' (got 'MAYBE')"),
    ("verdict", "verdict", KeyError, "verdict: Field required"),
    ("verdict", "insufficient_data.0.n", "three", "insufficient_data.0.n: Input should be a valid integer"),
    ("evaluate", "splits.target_holdout.n", "many", "splits.target_holdout.n: Input should be a valid integer"),
    ("evaluate", "splits.target_holdout.models.candidate.overall.accuracy", KeyError,
     "splits.target_holdout.models.candidate.overall.accuracy: Field required"),
    ("evaluate", "splits.source_holdout.comparisons.candidate-champion.overall|accuracy.interval", [0.1],
     "splits.source_holdout.comparisons.candidate-champion.overall|accuracy.interval: List should have at least 2"),
    ("decision", "approved", "yes please", "approved: Input should be a valid boolean, unable to interpret input "
                                           "(got 'yes please')"),
    ("decision", "verdict_sha256", KeyError, "verdict_sha256: Field required"),
    ("finetune", "train_rows", "many", "train_rows: Input should be a valid integer"),
    ("finetune", "served_model.cheap", "maybe", "served_model.cheap: Input should be a valid boolean"),
    ("finetune", "calibration.temperature", KeyError, "calibration.temperature: Field required"),
    ("finetune", "strategy_evidence.1.minus_tfidf.interval", [0.1],
     "strategy_evidence.1.minus_tfidf.interval: List should have at least 2"),
    ("finetune", "lexical_companion.evidence_ladder.steps.0.from", KeyError,
     "lexical_companion.evidence_ladder.steps.0.from: Field required"),
    ("shift", "verdict", "huge", "verdict: Input should be 'none', 'moderate' or 'severe' (got 'huge')"),
    ("shift", "on_severe", KeyError, "on_severe: Field required"),
    ("shift", "tests.0.flagged", "perhaps", "tests.0.flagged: Input should be a valid boolean"),
    ("shift", "tests.1.detail.source_prior", KeyError, "tests.1.detail.source_prior: Field required"),
    ("ingest", "splits.source_train.rows", "many", "splits.source_train.rows: Input should be a valid integer"),
    ("package", "smoke_test.examples", KeyError, "smoke_test.examples: Field required"),
]


@pytest.mark.parametrize("name,field,value,said", MISFITS, ids=[f"{m[0]}-{m[1]}" for m in MISFITS])
def test_a_report_that_does_not_fit_its_model_is_refused_with_the_file_and_the_field(tmp_path, reports, name, field,
                                                                                      value, said):
    data = copy.deepcopy(reports[name].model_dump())
    set_path(data, field, value)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError) as refused:
        read_report(path, type(reports[name]))
    assert str(refused.value).startswith(f"{path}: not a valid {type(reports[name]).__name__}: ")
    assert said in str(refused.value)
    assert refused.value.exit_code == EXIT_BAD_INPUT  # the CLI and the stages print it as one line, exit 2


@pytest.mark.parametrize("content,said", [(None, "not found"), ("{\"verdict\": ", "unreadable"),
                                          ("[1, 2]", "the whole report: Input should be a valid dictionary")])
def test_a_missing_or_unreadable_report_is_refused_with_its_name(tmp_path, content, said):
    path = tmp_path / "verdict.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReportError, match=f"^{path}: .*{said}"):
        read_report(path, Verdict)


def test_a_report_changed_into_a_misfit_is_not_written(tmp_path, reports):
    decision = reports["decision"].model_copy()
    decision.approved = "perhaps"  # attribute assignments are not checked when made
    path = tmp_path / "decision.json"
    with pytest.raises(ReportError, match="approved: Input should be a valid boolean"):
        write_report(path, decision)
    assert not path.exists()


def test_a_report_read_as_json_is_checked_with_its_source_named():
    with pytest.raises(ReportError, match="^the evaluate report: not a valid EvaluateReport: .*splits: Field required"):
        parse_report(EvaluateReport, {"labels": []}, "the evaluate report")


def test_the_decide_stage_refuses_a_malformed_verdict_as_a_failed_check(tmp_path, monkeypatch, reports):
    from pipelines.decide import main
    from tasks.config import load_params

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    params = load_params(tmp_path / "params.yaml")
    data = reports["verdict"].model_dump()
    del data["criteria"]
    params.paths.verdict.parent.mkdir(parents=True, exist_ok=True)
    params.paths.verdict.write_text(json.dumps(data))
    with pytest.raises(CheckFailed, match=f"no readable verdict \\({params.paths.verdict}: .*criteria: Field required"):
        main(params)
    assert not params.paths.decision.exists()


KEYS = [
    BootstrapKey.overall("target_holdout", "candidate", "macro_f1"),
    BootstrapKey.overall("source_holdout_weighted", pair_name("candidate", "champion"), "accuracy"),
    BootstrapKey.of_group("target_holdout", "candidate", "condition", "Depression", "accuracy"),
    BootstrapKey.of_group("target_holdout", "tfidf", "condition x site", "Pain & s1", "macro_f1"),
    BootstrapKey.of_group("target_holdout", "candidate", "rating", "a=b", "accuracy"),  # "=" inside a group name
    BootstrapKey.gap("target_holdout", pair_name("candidate", "frozen_encoder"), "condition", "accuracy"),
]


@pytest.mark.parametrize("key", KEYS, ids=[key.to_str() for key in KEYS])
def test_a_bootstrap_key_reads_back_from_its_string_form(key):
    assert BootstrapKey.from_str(key.to_str()) == key


def test_a_bootstrap_key_says_what_it_names():
    paired_gap = BootstrapKey.gap("target_holdout", "candidate-champion", "condition", "accuracy")
    assert paired_gap.to_str() == "target_holdout|candidate-champion|condition|gap:accuracy"
    assert paired_gap.comparison_name == "condition|gap:accuracy"
    assert paired_gap.pair == ("candidate", "champion") and paired_gap.gap_metric == "accuracy"
    assert paired_gap.group is None and paired_gap.for_model("candidate").pair is None
    in_group = BootstrapKey.of_group("t", "candidate", "rating", "a=b", "macro_f1")
    assert in_group.group == ("rating", "a=b") and in_group.gap_metric is None
    assert BootstrapKey.overall("t", "candidate", "accuracy").to_str() == "t|candidate|overall|accuracy"


@pytest.mark.parametrize("text", ["t|candidate|overall", "t|candidate|overall|accuracy|extra", ""])
def test_a_string_that_is_not_a_bootstrap_key_is_refused(text):
    with pytest.raises(ValueError, match="is not a bootstrap key"):
        BootstrapKey.from_str(text)


def test_every_column_of_the_bootstrap_table_is_a_key_of_the_resamples():
    evidence = build_evidence(champion=False)
    assert all(evidence.samples(BootstrapKey.from_str(column)) is not None for column in evidence.bootstrap)
    samples = {BootstrapKey.from_str(column): evidence.bootstrap[column].to_numpy() for column in evidence.bootstrap}
    assert list(bootstrap_table(samples).columns) == list(evidence.bootstrap.columns)
