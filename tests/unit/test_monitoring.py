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
