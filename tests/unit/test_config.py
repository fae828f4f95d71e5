from pathlib import Path

import pytest
import yaml

from tasks.config import apply_overrides, load_params, parse_override, parse_params, read_document, write_overrides
from tasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


@pytest.fixture
def document() -> dict:
    return read_document(REPO / "params.yaml")


def test_shipped_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.ingest.source == "demo"
    assert params.ingest.labels == ["negative", "neutral", "positive"]
    assert params.validate_.rows.holdout_min >= 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"ingest.split.holdout_fractoin": 0.2}, "ingest.split.holdout_fractoin: Extra inputs are not permitted"),
        ({"ingest.split.holdout_fraction": 1.5}, "ingest.split.holdout_fraction: Input should be less than 1"),
        ({"ingest.split.by": "random"}, "ingest.split.by: Input should be 'time', 'column' or 'files'"),
        ({"validate.min_rows_per_class": 0}, "validate.min_rows_per_class: Input should be greater than or equal to 1"),
        ({"ingest.split.time_cutoff": None}, "split.by=time needs split.time_cutoff"),
        ({"ingest.labels": ["a", "a"]}, "labels are listed twice"),
        ({"ingest.split.by": "files"}, "split.by=files needs source=files"),
        ({"ingest.columns.groups": ["label"]}, "collide with the normalised schema"),
        ({"validate.text_min_chars": 50000}, "text_min_chars is larger than text_max_chars"),
    ],
)
def test_bad_values_name_the_key(document, override, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(apply_overrides(document, override), "params.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("params.yaml: invalid configuration")


def test_missing_section_is_named(document):
    del document["validate"]
    with pytest.raises(ConfigError, match=r"validate: Field required"):
        parse_params(document)


def test_config_is_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        params.ingest.split.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [("ingest.split.seed=7", "ingest.split.seed", 7), ("a.b=true", "a.b", True),
     ("ingest.labels=[x, y]", "ingest.labels", ["x", "y"]), ("a=2015-01-01", "a", "2015-01-01"), ("a=", "a", "")],
)
def test_parse_override(text, key, value):
    parsed_key, parsed = parse_override(text)
    assert parsed_key == key
    assert parsed == value or str(parsed) == value


@pytest.mark.parametrize("text", ["noequals", "=3"])
def test_parse_override_rejects(text):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override(text)


def test_write_overrides_keeps_comments_and_validates(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    write_overrides(path, {"ingest.split.seed": 7})
    text = path.read_text()
    assert "# The one configuration of regraft." in text
    assert yaml.safe_load(text)["ingest"]["split"]["seed"] == 7
    before = path.read_text()
    with pytest.raises(ConfigError, match="ingest.split.sed"):
        write_overrides(path, {"ingest.split.sed": 1})
    assert path.read_text() == before


def test_missing_params_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_training_threads_follow_omp_num_threads_when_set(monkeypatch):
    import os

    from tasks.devices import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads(processes=1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(processes=1) == len(os.sched_getaffinity(0))
    assert default_threads(processes=10_000) == 1
