"""tasks/shadow.py on constructed prediction logs: a calibrated production model, a shadow candidate that is the same
model, or the same model with its answers shuffled on most rows; the logs written as the service writes them."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import MonitorConfig, load_params
from tasks.errors import DataError
from tasks.estimate import expected_confusion
from tasks.monitoring import feedback_truth, logged_predictions
from tasks.render import shadow_markdown
from tasks.reports import ShadowReport
from tasks.serving import PredictionLog
from tasks.shadow import (NOT_ENOUGH, NOT_WORSE, WORSE, HoldoutProbabilities, compare_shadow, expected_confusions,
                          join_shadow, shadow_report)

REPO = Path(__file__).resolve().parents[2]
LABELS = ["negative", "neutral", "positive"]
PRODUCTION, CANDIDATE, SINCE = "regraft-classifier:a", "regraft-classifier:b", "2000-01-01T00:00:00+00:00"
CFG = MonitorConfig(metric="accuracy", max_drop=0.05, confidence=0.9, draws=200, min_effective_rows=30,
                    min_shadow_rows=100, canary_windows=3)


def calibrated(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a Dirichlet and labels drawn from them: a calibrated model."""
    proba = rng.dirichlet(np.full(len(LABELS), 0.4), size=n)
    return proba, np.array([rng.choice(len(LABELS), p=p) for p in proba])


def results(proba: np.ndarray, version: str) -> list[dict]:
    return [{"label": LABELS[int(row.argmax())], "probabilities": dict(zip(LABELS, map(float, row))),
             "model_version": version} for row in proba]


def write_logs(folder, texts: list[str], production: np.ndarray, candidate: np.ndarray, shadowed: np.ndarray,
               groups: list[dict | None] | None = None):
    """Production's log of every text (with the text, as serve.log_texts: text keeps it, and the group values its
    request gave) and the shadow log of the rows `shadowed` selects, under production's prediction ids, as
    tasks/serving.py writes them."""
    served, shadow = PredictionLog(folder / "predictions.jsonl", "text"), PredictionLog(folder / "shadow.jsonl", "hash")
    ids = served.append(texts, results(production, PRODUCTION), groups=groups)
    keep = np.flatnonzero(shadowed)
    if keep.size:
        shadow.append([texts[i] for i in keep], results(candidate[keep], CANDIDATE), [ids[i] for i in keep])
    else:
        shadow.path.touch()  # the service has not logged a shadow prediction yet
    return served.path, shadow.path


def compared(tmp_path, production, candidate, shadowed=None, truth=None, seed=0, groups=None):
    rng = np.random.default_rng(seed)
    holdout_proba, holdout_labels = calibrated(300, rng)
    texts = [f"served text {i}" for i in range(len(production))]
    shadowed = np.ones(len(texts), dtype=bool) if shadowed is None else shadowed
    served_path, shadow_path = write_logs(tmp_path, texts, production, candidate, shadowed, groups)
    joined, rows = join_shadow(logged_predictions(served_path, "none"), logged_predictions(shadow_path, "none"),
                               PRODUCTION, CANDIDATE, SINCE)
    feedback = None
    if truth is not None:
        feedback = pd.DataFrame({"text": texts, "label": [LABELS[i] for i in truth]})
    holdout = HoldoutProbabilities(holdout_labels, holdout_proba, holdout_proba)
    report = compare_shadow(joined, LABELS, CFG, holdout=holdout,
                            truth=feedback_truth(feedback, LABELS, "feedback.csv") if feedback is not None else None)
    return report, rows


def test_the_same_model_in_shadow_agrees_everywhere_and_is_not_worse(tmp_path):
    proba, _ = calibrated(400, np.random.default_rng(1))
    report, rows = compared(tmp_path, proba, proba)
    assert rows == {"served": 400, "joined": 400, "without_shadow": 0, "shadow_without_production": 0}
    assert report["agreement"]["share"] == 1.0 and report["agreement"]["interval"][1] == pytest.approx(1.0)
    assert np.trace(np.array(report["confusion"])) == 400
    assert report["difference"]["basis"] == "estimated"
    assert report["difference"]["estimated"]["macro_f1"]["interval"] == [0.0, 0.0]
    assert report["verdict"] == NOT_WORSE, report["reason"]
    assert report["estimated"]["production"]["estimate"] == report["estimated"]["candidate"]["estimate"]


def test_a_candidate_shuffled_on_most_rows_is_shown_worse_by_the_labels_that_came_back(tmp_path):
    rng = np.random.default_rng(2)
    proba, truth = calibrated(500, rng)
    candidate = proba.copy()
    shuffled = rng.random(len(proba)) < 0.7
    candidate[shuffled] = rng.permutation(proba[shuffled])
    report, _ = compared(tmp_path, proba, candidate, truth=truth)
    assert report["agreement"]["share"] < 0.7
    assert report["difference"]["basis"] == "realized"
    assert report["realized"]["candidate"]["accuracy"] < report["realized"]["production"]["accuracy"] - 0.2
    assert report["difference"]["realized"]["macro_f1"]["interval"][1] < -CFG.max_drop
    assert report["verdict"] == WORSE, report["reason"]


def test_texts_served_with_group_values_are_compared_per_group_and_worse_where_the_candidate_is(tmp_path):
    """Requests that carried group values: the report gives each value its rows, agreement and estimates (from
    min_shadow_rows texts), and realized metrics where labels came back; the candidate shuffled on one group only
    disagrees there. Texts without groups count overall only."""
    rng = np.random.default_rng(4)
    proba, truth = calibrated(600, rng)
    groups = [{"condition": "acne"} if i < 250 else {"condition": "pain"} if i < 500 else None for i in range(600)]
    candidate = proba.copy()
    candidate[250:500] = rng.permutation(proba[250:500])
    report, _ = compared(tmp_path, proba, candidate, truth=truth, groups=groups)
    acne, pain = report["groups"]["condition"]["acne"], report["groups"]["condition"]["pain"]
    assert acne["rows"] == 250 and pain["rows"] == 250 and set(report["groups"]) == {"condition"}
    assert acne["agreement"]["share"] == 1.0 and pain["agreement"]["share"] < 0.6
    assert acne["estimated"]["candidate"]["estimate"] == acne["estimated"]["production"]["estimate"]
    assert pain["realized"]["candidate"]["accuracy"] < pain["realized"]["production"]["accuracy"] - 0.2
    assert not any("per-group" in note for note in report["notes"])
    markdown = shadow_markdown(ShadowReport(stage="shadow", production_model=PRODUCTION, candidate=CANDIDATE,
                                            since=SINCE, logs={}, served={"served": 600, "joined": 600,
                                                                          "without_shadow": 0}, **report))
    assert "| condition = acne | 250 | 1.000" in markdown and "| condition = pain | 250 |" in markdown
    few = compared(tmp_path / "few", proba[:150], proba[:150], groups=[{"condition": "acne"}] * 50 + [None] * 100)[0]
    assert few["groups"]["condition"]["acne"]["estimated"] is None  # 50 texts < min_shadow_rows: no estimate
    plain, _ = compared(tmp_path / "plain", proba, proba)
    assert plain["groups"] is None and any("per-group" in note for note in plain["notes"])


def test_few_joined_rows_are_not_enough_evidence_yet(tmp_path):
    proba, _ = calibrated(20, np.random.default_rng(3))
    report, _ = compared(tmp_path, proba, proba)
    assert report["verdict"] == NOT_ENOUGH and "min_shadow_rows" in report["reason"]


def test_nothing_joined_yet_is_not_enough_evidence(tmp_path):
    proba, _ = calibrated(10, np.random.default_rng(4))
    report, rows = compared(tmp_path, proba, proba, shadowed=np.zeros(10, dtype=bool))
    assert rows["joined"] == 0 and rows["without_shadow"] == 10
    assert report["verdict"] == NOT_ENOUGH and report["agreement"] is None


def test_served_texts_the_candidate_shed_are_counted_and_left_out(tmp_path):
    proba, _ = calibrated(300, np.random.default_rng(5))
    shadowed = np.arange(300) % 3 != 0
    report, rows = compared(tmp_path, proba, proba, shadowed=shadowed)
    assert rows == {"served": 300, "joined": 200, "without_shadow": 100, "shadow_without_production": 0}
    assert report["rows"] == 200 and report["agreement"]["agreeing"] == 200


def test_rows_of_other_models_or_before_the_shadow_started_are_not_joined(tmp_path):
    proba, _ = calibrated(10, np.random.default_rng(6))
    served_path, shadow_path = write_logs(tmp_path, [f"t{i}" for i in range(10)], proba, proba, np.ones(10, bool))
    production, shadowed = logged_predictions(served_path, "none"), logged_predictions(shadow_path, "none")
    assert join_shadow(production, shadowed, "another:tag", CANDIDATE, SINCE)[1]["served"] == 0
    assert join_shadow(production, shadowed, PRODUCTION, CANDIDATE, "2999-01-01T00:00:00+00:00")[1]["served"] == 0


def test_the_estimators_per_row_contributions_add_up_to_their_expected_confusion():
    proba, _ = calibrated(50, np.random.default_rng(7))
    correct = proba.max(axis=1)
    single = expected_confusions(correct[None, :], proba, np.ones((1, 50)))[0]
    assert np.allclose(single, expected_confusion(correct, proba))


LINE = {"time": "2026-12-02T18:00:00.000+00:00", "prediction_id": "p1", "label": "positive", "confidence": 0.9,
        "probabilities": {"negative": 0.05, "neutral": 0.05, "positive": 0.9}, "model_version": PRODUCTION,
        "text_sha256": "ab"}


@pytest.mark.parametrize("bad, problem", [
    ("not json at all", "not a JSON line"),
    (json.dumps([1, 2]), "not a JSON line"),
    (json.dumps({k: v for k, v in LINE.items() if k != "prediction_id"}), "prediction_id"),
    (json.dumps({**LINE, "probabilities": {"positive": "high"}}), "probabilities"),
    (json.dumps({**LINE, "probabilities": [0.1, 0.9]}), "probabilities"),
    (json.dumps({**LINE, "time": "yesterday"}), "time"),
    (json.dumps({**LINE, "groups": ["acne"]}), "groups"),
    (json.dumps({**LINE, "groups": {"condition": 3}}), "groups"),
])
def test_a_malformed_log_line_is_refused_with_its_file_and_line(tmp_path, bad, problem):
    path = tmp_path / "shadow.jsonl"
    path.write_text(json.dumps(LINE) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=problem) as refused:
        logged_predictions(path, "none")
    assert f"{path}:2:" in str(refused.value)


def test_probabilities_of_another_label_set_name_the_model_and_the_prediction(tmp_path):
    proba, _ = calibrated(5, np.random.default_rng(8))
    served_path, shadow_path = write_logs(tmp_path, [f"t{i}" for i in range(5)], proba, proba, np.ones(5, bool))
    joined, _ = join_shadow(logged_predictions(served_path, "none"), logged_predictions(shadow_path, "none"),
                            PRODUCTION, CANDIDATE, SINCE)
    joined["probabilities_candidate"] = [{"yes": 0.5, "no": 0.5}, *joined["probabilities_candidate"][1:]]
    holdout = HoldoutProbabilities(np.zeros(3, dtype=int), proba[:3], proba[:3])
    with pytest.raises(DataError, match=f"candidate's prediction {joined.loc[0, 'prediction_id']}"):
        compare_shadow(joined, LABELS, CFG, holdout=holdout)


def with_paths(tmp_path, shadow: dict | None):
    """The shipped params with the registry (naming `shadow`) and the logs in tmp_path."""
    params = load_params(REPO / "params.yaml")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"production": PRODUCTION, "models": {}, "history": [], "shadow": shadow}))
    serve = params.serve.model_copy(update={"prediction_log": tmp_path / "predictions.jsonl",
                                            "shadow_log": tmp_path / "shadow.jsonl"})
    return params.model_copy(update={"paths": params.paths.model_copy(update={"registry": registry}), "serve": serve})


@pytest.mark.parametrize("shadow, problem", [
    (None, "no shadow running"),
    ({"tag": CANDIDATE, "beside": PRODUCTION, "since": SINCE, "by": "me", "reason": "try"}, "no prediction log yet"),
])
def test_no_shadow_or_no_log_is_refused_naming_the_problem(tmp_path, shadow, problem):
    with pytest.raises(DataError, match=problem):
        shadow_report(with_paths(tmp_path, shadow))


def test_the_summary_shows_the_verdict_the_counts_and_both_differences(tmp_path):
    rng = np.random.default_rng(9)
    proba, truth = calibrated(300, rng)
    report, rows = compared(tmp_path, proba, proba, truth=truth)
    report.update({"candidate": CANDIDATE, "production_model": PRODUCTION, "since": SINCE, "served": rows,
                   "logs": {"production": "predictions.jsonl", "shadow": "shadow.jsonl"}})
    text = shadow_markdown(ShadowReport.model_validate(report))
    assert text.startswith(f"# Shadow {CANDIDATE} beside {PRODUCTION}: {NOT_WORSE}")
    assert "300 texts, 300 predicted by both" in text and "no per-group comparison" in text
    assert "estimated macro-F1, candidate minus production: +0.000" in text and "realized macro-F1" in text
    json.dumps(report)  # what --json prints and reports/shadow.json holds
    empty = {**report, "agreement": None, "estimated": None, "verdict": NOT_ENOUGH}
    assert NOT_ENOUGH in shadow_markdown(ShadowReport.model_validate(empty))


@pytest.mark.parametrize("verdict, code", [(NOT_WORSE, 0), (NOT_ENOUGH, 0), (WORSE, 1)])
def test_the_shadow_command_prints_the_report_and_exits_by_its_verdict(tmp_path, monkeypatch, capsys, verdict, code):
    """`regraft shadow [--json]` on the typed report that tasks.shadow.shadow_report returns: the JSON is the
    report's, and a candidate shown worse exits 1."""
    import argparse

    from flows.cli_data import command_shadow

    rng = np.random.default_rng(9)
    proba, truth = calibrated(300, rng)
    report, rows = compared(tmp_path, proba, proba, truth=truth)
    report.update({"candidate": CANDIDATE, "production_model": PRODUCTION, "since": SINCE, "served": rows,
                   "logs": {"production": "predictions.jsonl", "shadow": "shadow.jsonl"}, "verdict": verdict})
    monkeypatch.setattr("tasks.shadow.shadow_report", lambda *args: ShadowReport.model_validate(report))
    monkeypatch.setattr("tasks.config.load_params", lambda path: None)
    for as_json in (True, False):
        args = argparse.Namespace(feedback=None, columns=None, json=as_json)
        assert command_shadow(args, tmp_path) == code
        shown = capsys.readouterr().out
        assert (json.loads(shown)["verdict"] if as_json else shown.split("\n")[0].split(": ")[-1]) == verdict


@pytest.mark.parametrize("outcome,change,event", [
    ("rolled back", {"action": "canary-rolled-back", "tag": "c:1", "beside": "p:1", "reason": "shown worse: x"},
     "regraft.canary.rolled-back"),
    ("promoted", {"action": "promote", "tag": "c:1", "previous": "p:1", "reason": "canary: not worse"},
     "regraft.canary.promoted"),
    ("continues", None, None),
])
def test_each_shift_watch_judges_the_running_canary_and_tells_a_rollback_or_promotion(monkeypatch, outcome, change,
                                                                                      event):
    """flows/operations.py: a shift-watch run is a window of the running canary; what the judgement did (rolled back,
    promoted) is emitted as its event, naming the canary; a window that changes nothing emits nothing, and one that
    cannot be judged is logged without failing the watch."""
    from types import SimpleNamespace

    from flows import operations
    from tasks.errors import DataError
    from tasks.promotion import CanaryJudgement

    sent, judged = [], []
    report = SimpleNamespace(candidate="c:1", production_model="p:1", verdict="worse", reason="realized ...")
    window = {"action": "canary-window", "tag": "c:1", "verdict": "worse", "reason": "x", "passed": 1, "windows": 3}
    monkeypatch.setattr("tasks.registry.read_record", lambda path: {"canary": {"tag": "c:1"}})
    monkeypatch.setattr("tasks.registry.canary_of", lambda record: record["canary"])
    monkeypatch.setattr("tasks.render.shadow_markdown", lambda report: "# canary")
    monkeypatch.setattr("tasks.promotion.judge_canary_window",
                        lambda params, by: judged.append(by) or CanaryJudgement(outcome, report, {}, window, change))
    monkeypatch.setattr(operations, "create_markdown_artifact", lambda **kwargs: None)
    monkeypatch.setattr(operations, "notify", lambda name, subject, summary, verdict, **details:
                        sent.append((name, subject, details["tag"])))
    monkeypatch.setattr(operations, "get_run_logger", lambda: SimpleNamespace(warning=lambda *a: sent.append(a[0])))
    params = SimpleNamespace(paths=SimpleNamespace(registry="registry.json"))
    assert operations.judge_running_canary(params) == outcome and judged == ["shift-watch"]
    assert sent == ([(event, "model.c:1", "c:1")] if event else [])

    def no_logs(params, by):
        raise DataError("no prediction log yet")

    monkeypatch.setattr("tasks.promotion.judge_canary_window", no_logs)
    assert operations.judge_running_canary(params) == "not judged: no prediction log yet"
    monkeypatch.setattr("tasks.registry.read_record", lambda path: {"canary": None})
    assert operations.judge_running_canary(params) is None  # no canary: nothing judged


def test_each_shift_watch_shows_the_running_shadows_comparison_as_an_artifact(monkeypatch):
    """flows/operations.py: with a shadow running, a shift-watch run publishes its comparison (a shadow only reports:
    nothing is rolled back or promoted); no shadow: nothing; a comparison that cannot be made yet is logged."""
    from types import SimpleNamespace

    from flows import operations
    from tasks.errors import DataError

    published, logged = [], []
    monkeypatch.setattr("tasks.registry.read_record", lambda path: {"shadow": {"tag": "c:1"}})
    monkeypatch.setattr("tasks.shadow.shadow_report", lambda params, write: SimpleNamespace(verdict="not worse"))
    monkeypatch.setattr("tasks.render.shadow_markdown", lambda report: f"# shadow {report.verdict}")
    monkeypatch.setattr(operations, "create_markdown_artifact", lambda **kwargs: published.append(kwargs))
    monkeypatch.setattr(operations, "get_run_logger", lambda: SimpleNamespace(warning=lambda *a: logged.append(a)))
    params = SimpleNamespace(paths=SimpleNamespace(registry="registry.json"))
    operations.publish_running_shadow(params)
    assert [(p["key"], p["markdown"]) for p in published] == [("shadow-report", "# shadow not worse")]

    def no_logs(params, write):
        raise DataError("no prediction log yet")

    monkeypatch.setattr("tasks.shadow.shadow_report", no_logs)
    operations.publish_running_shadow(params)
    assert len(published) == 1 and "no prediction log yet" in str(logged[0])
    monkeypatch.setattr("tasks.registry.read_record", lambda path: {"shadow": None})
    operations.publish_running_shadow(params)
    assert len(published) == 1


def test_a_canarys_own_answers_keep_their_groups_and_many_group_values_are_pooled(tmp_path):
    """In a canary the group values are on the row of the model that answered: texts the canary answered are
    compared in their group too. Past the 20 most served values of a column, the rest are pooled."""
    rng = np.random.default_rng(5)
    proba, _ = calibrated(300, rng)
    texts = [f"canary text {i}" for i in range(300)]
    groups = [{"condition": f"c{i % 30:02d}"} for i in range(300)]
    answered = PredictionLog(tmp_path / "predictions.jsonl", "hash")
    ids = answered.append(texts[:150], results(proba[:150], PRODUCTION), groups=groups[:150])
    ids += answered.append(texts[150:], results(proba[150:], CANDIDATE), groups=groups[150:])  # the canary's share
    off_path = PredictionLog(tmp_path / "shadow.jsonl", "hash")  # each model on the other's texts, no groups
    off_path.append(texts[:150], results(proba[:150], CANDIDATE), ids[:150])
    off_path.append(texts[150:], results(proba[150:], PRODUCTION), ids[150:])
    both = pd.concat([logged_predictions(tmp_path / "predictions.jsonl", "none"),
                      logged_predictions(tmp_path / "shadow.jsonl", "none")], ignore_index=True)
    joined, _ = join_shadow(both, both, PRODUCTION, CANDIDATE, SINCE)
    # Every text, either model answering it, with its group values (before: only production's answers had them).
    assert len(joined) == 300 and joined["groups"].map(lambda g: isinstance(g, dict)).all()
    report = compare_shadow(joined, LABELS, CFG, holdout=None)
    by_value = report["groups"]["condition"]
    assert len(by_value) == 21 and by_value["(other values)"]["rows"] == 300 - 20 * 10
