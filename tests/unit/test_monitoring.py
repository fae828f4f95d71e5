"""Serving traffic as target data, and the production model's training data from the DVC cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.errors import DataError
from tasks.monitoring import dvc_cache_file, read_prediction_log, training_data

pytestmark = pytest.mark.unit


def write_log(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_the_most_recent_texts(tmp_path):
    rows = [{"time": f"2026-01-01T00:00:{i:02d}+00:00", "text": f"t{i}", "label": "positive"} for i in range(10)]
    frame = read_prediction_log(write_log(tmp_path / "log.jsonl", rows), max_rows=3)
    assert frame["text"].tolist() == ["t7", "t8", "t9"] and frame["id"].is_unique


@pytest.mark.parametrize("rows,message", [
    ([{"time": "2026-01-01T00:00:00+00:00", "text_sha256": "ab"}], "serve.log_texts: text"),
    ([], "the prediction log is empty"),
])
def test_unusable_logs_are_explained(tmp_path, rows, message):
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        read_prediction_log(write_log(tmp_path / "log.jsonl", rows), 100)


def test_a_broken_line_is_named(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"time": "2026-01-01T00:00:00+00:00", "text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"log.jsonl:2: not a JSON line"):
        read_prediction_log(path, 100)


def test_missing_log_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="no prediction log yet"):
        read_prediction_log(tmp_path / "none.jsonl", 10)


def test_training_data_comes_from_the_dvc_cache_by_md5(tmp_path):
    splits = {"source_train": Path("data/source_train.parquet"), "target_train": Path("data/target_train.parquet")}
    entry = {"data_md5": {}}
    for name, text in (("source_train", "old"), ("target_train", "new")):
        staging = tmp_path / f"{name}.parquet"
        pd.DataFrame({"id": [name], "text": [text], "label": ["positive"]}).to_parquet(staging)
        md5 = hashlib.md5(staging.read_bytes()).hexdigest()
        cached = dvc_cache_file(tmp_path / "cache", md5)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(cached)
        entry["data_md5"][str(splits[name])] = md5
    assert training_data(entry, splits, tmp_path / "cache")["text"].tolist() == ["old", "new"]
    entry["data_md5"]["data/target_train.parquet"] = "0" * 32
    with pytest.raises(DataError, match="is not in the DVC cache"):
        training_data(entry, splits, tmp_path / "cache")


# ----------------------------------------------------------------------------- labels that arrive later


def served(project: Path, texts: list[str], predicted: list[str], model: str, second: int = 0) -> None:
    """Prediction-log lines the way the service writes them with serve.log_texts: hash."""
    log = project / ".regraft" / "predictions.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        for i, (text, label) in enumerate(zip(texts, predicted)):
            handle.write(json.dumps({"time": f"2026-01-01T00:00:{second + i:02d}+00:00", "label": label,
                                     "confidence": 0.9, "model_version": model,
                                     "text_sha256": hashlib.sha256(text.encode()).hexdigest()}) + "\n")


def estimated(window: tuple[int, int], model: str = "m:1", accuracy: float = 0.8) -> dict:
    return {"kind": "estimate", "id": f"e{window[0]}", "time": "2026-01-01T01:00:00+00:00", "production_model": model,
            "window": {"from": f"2026-01-01T00:00:{window[0]:02d}+00:00", "to": f"2026-01-01T00:00:{window[1]:02d}+00:00"},
            "served_rows": 10, "verdict": "ESTIMATED", "validated": {"accuracy": 0.9, "macro_f1": 0.8},
            "estimated": {"accuracy": {"estimate": accuracy, "interval": [accuracy - 0.1, accuracy + 0.1]},
                          "macro_f1": {"estimate": 0.7, "interval": [0.6, 0.8]}},
            "degraded": False}


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """A project that served 10 texts with model m:1 (6 right), and one estimate for them in the history."""
    from tasks.config import load_params
    from tasks.monitoring import write_history

    monkeypatch.chdir(tmp_path)
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    texts = [f"text {i}" for i in range(10)]
    served(tmp_path, texts, ["positive"] * 10, "m:1")
    write_history(params.paths.performance_history, [estimated((0, 9))])
    truth = pd.DataFrame({"text": texts, "label": ["positive"] * 6 + ["negative"] * 4})
    return params, truth


def test_feedback_is_scored_against_the_estimate_for_the_same_traffic(watched):
    from tasks.monitoring import read_history, record_feedback

    params, truth = watched
    [row] = record_feedback(params, truth, "labels.csv")
    assert row["estimate_id"] == "e0" and row["labelled_rows"] == 10
    assert row["realized"]["accuracy"] == pytest.approx(0.6)
    assert row["error"]["accuracy"] == pytest.approx(0.2)
    assert read_history(params.paths.performance_history)[-1] == row


def test_feedback_counts_only_the_estimated_model_and_window(watched):
    from tasks.monitoring import record_feedback, write_history

    params, truth = watched
    served(Path.cwd(), ["late"], ["negative"], "m:1", second=30)  # after the window
    write_history(params.paths.performance_history, [estimated((0, 9)), estimated((20, 40), model="m:2")])
    rows = record_feedback(params, pd.concat([truth, pd.DataFrame({"text": ["late"], "label": ["negative"]})]), "f")
    assert [(r["estimate_id"], r["labelled_rows"]) for r in rows] == [("e0", 10)]


@pytest.mark.parametrize("frame,message", [
    (pd.DataFrame({"text": ["text 1"], "label": ["great"]}), r"labels \['great'\] are not in ingest.labels"),
    (pd.DataFrame({"text": ["never served"], "label": ["positive"]}), "none of its 1 texts is in the prediction log"),
])
def test_bad_feedback_is_refused_and_the_history_kept(watched, frame, message):
    from tasks.monitoring import record_feedback

    params, _ = watched
    before = params.paths.performance_history.read_bytes()
    with pytest.raises(DataError, match=message):
        record_feedback(params, frame, "labels.csv")
    assert params.paths.performance_history.read_bytes() == before


def test_feedback_outside_every_window_says_to_run_shift_watch(watched):
    from tasks.monitoring import record_feedback, write_history

    params, truth = watched
    write_history(params.paths.performance_history, [estimated((30, 40))])
    with pytest.raises(DataError, match="outside every estimated window"):
        record_feedback(params, truth, "labels.csv")


def test_regraft_feedback_reads_any_columns_and_refuses_bad_labels_once(watched):
    """The command on a user's file: its own column names through --columns; labels outside ingest.labels are
    refused with exit code 2, one message, and the history left as it was."""
    import shutil
    import subprocess
    import sys

    params, truth = watched
    repo = Path(__file__).resolve().parents[2]
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(repo / name, Path.cwd() / name)
    truth.rename(columns={"text": "comment", "label": "verdict"}).to_csv("labels.csv", index=False)
    regraft = str(Path(sys.executable).parent / "regraft")
    done = subprocess.run([regraft, "feedback", "labels.csv", "--columns", "text=comment,label=verdict"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "accuracy estimated 0.800 [0.700, 0.900], realized 0.600 on 10 labelled served texts" in done.stdout
    before = params.paths.performance_history.read_bytes()
    truth.assign(label="great").to_csv("bad.csv", index=False)
    bad = subprocess.run([regraft, "feedback", "bad.csv"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "Traceback" not in bad.stderr
    assert "labels ['great'] are not in ingest.labels" in bad.stderr
    assert params.paths.performance_history.read_bytes() == before
