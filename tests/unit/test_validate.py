"""The validation suite on tiny frames, run through real Great Expectations checkpoints."""

import json

import numpy as np
import pandas as pd
import pytest

from tasks.config import Columns, RowBounds, ValidateConfig
from tasks.render import validate_markdown
from tasks.validate import validate_splits

pytestmark = pytest.mark.unit
LABELS = ["negative", "neutral", "positive"]
COLUMNS = Columns(text="review", label="rating", groups=["condition"], time="date", id="uid")
CFG = ValidateConfig(text_min_chars=3, text_max_chars=500, min_rows_per_class=2, max_group_null_fraction=0.2,
                     max_label_conflict_fraction=0.05,
                     rows=RowBounds(train_min=6, holdout_min=3, max=1000), examples=3)


def split_frame(prefix: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"{prefix}{i}" for i in range(n)],
        "text": [f"{prefix} review number {i}" for i in range(n)],
        "label": [LABELS[i % 3] for i in range(n)],
        "condition": ["Acne", "Pain"] * (n // 2),
        "timestamp": pd.Series(pd.date_range("2016-01-01", periods=n, tz="UTC")).astype("datetime64[ns, UTC]"),
    })


def good_splits() -> dict[str, pd.DataFrame]:
    return {"source_train": split_frame("st", 12), "source_holdout": split_frame("sh", 6),
            "target_train": split_frame("tt", 12), "target_holdout": split_frame("th", 6)}


def corrupt(case: str, splits: dict[str, pd.DataFrame]) -> None:
    frame = splits["target_train"]
    if case == "missing column":
        splits["target_train"] = frame.drop(columns=["text"])
    elif case == "wrong type":
        splits["target_train"] = frame.assign(text=np.arange(len(frame)))
    elif case == "empty file":
        splits["target_train"] = frame.iloc[0:0]
    elif case == "all-null labels":
        splits["target_train"] = frame.assign(label=pd.Series([None] * len(frame), dtype="str"))
    elif case == "unknown label":
        frame.loc[2, "label"] = "great"
    elif case == "not UTF-8":
        frame.loc[1, "text"] = "caf\ufffd review"
    elif case == "duplicate rows":
        splits["target_train"] = pd.concat([frame, frame.iloc[[0]].assign(id="dup")], ignore_index=True)
    elif case == "label conflict":
        other = next(label for label in LABELS if label != frame.loc[0, "label"])
        splits["target_train"] = pd.concat([frame, frame.iloc[[0]].assign(id="conflict", label=other)], ignore_index=True)
    elif case == "holdout/train overlap":
        splits["target_holdout"].loc[0, "text"] = splits["source_train"].loc[4, "text"]


BAD_CASES = {
    "missing column": "target_train: column 'text' is missing (input column 'review')",
    "wrong type": "target_train: column 'text' has type int64; expected str",
    "empty file": "target_train: has 0 rows; expected 6 to 1000",
    "all-null labels": "target_train: column 'label' has 12 missing values",
    "unknown label": "target_train: column 'label' has 1 values outside the configured labels; e.g. [{'id': 'tt2', 'value': 'great'}]",
    "not UTF-8": "target_train: 1 texts contain bytes that are not valid UTF-8",
    "duplicate rows": "target_train: 2 rows are duplicates (same text and label)",
    "label conflict": "target_train: label conflict: 2 rows (15.4%; allowed 5.0%) have a text that also appears with "
                      "another label; e.g. [{'id': 'tt0', 'label': 'negative', 'text': 'tt review number 0'}",
    "holdout/train overlap": "target_holdout: 1 texts also appear in a train split (train/holdout leakage); e.g. [{'id': 'th0'",
}


def run(splits, tmp_path):
    return validate_splits(splits, CFG, COLUMNS, LABELS, gx_dir=tmp_path / "gx", docs_dir=tmp_path / "docs")


def test_clean_splits_pass_and_build_data_docs(tmp_path):
    report = run(good_splits(), tmp_path)
    assert report.success, report.failures
    assert report.failures == []
    assert (tmp_path / "docs" / "index.html").is_file()
    assert all(e.success for e in report.expectations)
    assert {e.split for e in report.expectations} == set(good_splits())
    json.dumps(report.model_dump())  # the report must be plain JSON
    assert "Validation passed" in validate_markdown(report)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_with_a_plain_message(tmp_path, case):
    splits = good_splits()
    corrupt(case, splits)
    report = run(splits, tmp_path)
    assert not report.success
    assert any(BAD_CASES[case] in m for m in report.failures), report.failures
    failed_splits = {name for name, s in report.splits.items() if not s.success}
    assert failed_splits == {BAD_CASES[case].split(":")[0]}


def test_rare_class_and_null_groups(tmp_path):
    splits = good_splits()
    frame = splits["target_train"]
    frame.loc[frame["label"] == "neutral", "label"] = "negative"
    frame.loc[frame.index[:1], "label"] = "neutral"
    splits["source_train"] = splits["source_train"].assign(label="positive")
    splits["target_holdout"].loc[[0, 1, 2], "condition"] = None
    report = run(splits, tmp_path)
    messages = "\n".join(report.failures)
    assert "source_train: labels ['negative', 'neutral'] have no rows" in messages
    assert "target_holdout: column 'condition' has 3 missing values (50.0%; allowed 20.0%)" in messages
    assert "target_train: 1 rows belong to a label with fewer than 2 rows; e.g. [{'id': 'tt0', 'label': 'neutral'" in messages
