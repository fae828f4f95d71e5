import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import Columns, SplitConfig
from tasks.errors import DataError
from tasks.ingest import clean_text, drop_repeats, normalise, read_table, read_with_columns, split_domains, split_holdout

pytestmark = pytest.mark.unit
COLUMNS = Columns(text="review", label="rating", groups=["condition"], time="date", id="uid")


def raw_frame(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({
        "uid": range(n),
        "review": [f"&quot;review&#039;s {i}&quot;" for i in range(n)],
        "rating": ["positive", "negative", "neutral", "positive"] * (n // 4),
        "condition": ["Acne", None, "Pain", "Acne"] * (n // 4),
        "date": pd.date_range("2013-06-01", periods=n, freq="30D").strftime("%B %d, %Y"),
    })


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("I&#039;ve been", "I've been"), ('"quoted"', 'quoted'), ('"x &amp; y"', "x & y"),
     ("  spaced  ", "spaced"), (3, 3), (None, None)],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_normalise_maps_to_schema():
    out = normalise(raw_frame(), COLUMNS, "f.csv", "%B %d, %Y")
    assert list(out.columns) == ["id", "text", "label", "condition", "timestamp"]
    assert out.loc[0, "text"] == "review's 0"
    assert out["id"].tolist()[:2] == ["0", "1"]
    assert str(out["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert out["condition"].isna().sum() == 10


def test_normalise_leaves_missing_and_mistyped_columns_to_validation():
    raw = raw_frame().drop(columns=["rating"]).assign(review=range(40))
    out = normalise(raw, COLUMNS.model_copy(update={"id": None}), "f.csv", None)
    assert "label" not in out
    assert out["text"].dtype == "int64"
    assert out["id"].iloc[3] == "f.csv:3"


def test_unparseable_dates_are_named():
    raw = raw_frame()
    raw.loc[5, "date"] = "last Tuesday"
    with pytest.raises(DataError, match=r"column 'date' has 1 values that are not dates.*last Tuesday"):
        normalise(raw, COLUMNS, "f.csv", "%B %d, %Y")


def test_split_by_time():
    frame = normalise(raw_frame(), COLUMNS, "f", "%B %d, %Y")
    cfg = SplitConfig(by="time", time_cutoff=dt.date(2015, 1, 1), holdout_fraction=0.2, seed=0)
    source, target = split_domains(frame, cfg, COLUMNS)
    assert len(source) + len(target) == len(frame)
    assert (source["timestamp"] < pd.Timestamp("2015-01-01", tz="UTC")).all()
    assert (target["timestamp"] >= pd.Timestamp("2015-01-01", tz="UTC")).all()


def test_split_by_column_rejects_unlisted_values():
    frame = normalise(raw_frame(), COLUMNS, "f", "%B %d, %Y")
    cfg = SplitConfig(by="column", column="condition", source_values=["Acne"], target_values=["Pain"],
                      holdout_fraction=0.2, seed=0)
    source, target = split_domains(frame.dropna(subset=["condition"]), cfg, COLUMNS)
    assert set(source["condition"]) == {"Acne"} and set(target["condition"]) == {"Pain"}
    with pytest.raises(DataError, match="neither split.source_values nor split.target_values"):
        split_domains(frame.fillna({"condition": "Flu"}), cfg, COLUMNS)


def test_holdout_split_is_stratified_and_seeded():
    frame = normalise(raw_frame(200), COLUMNS, "f", "%B %d, %Y")
    train, holdout = split_holdout(frame, 0.25, seed=3)
    again_train, _ = split_holdout(frame, 0.25, seed=3)
    other_train, _ = split_holdout(frame, 0.25, seed=4)
    assert len(holdout) == 50 and len(train) == 150
    assert not set(train["id"]) & set(holdout["id"])
    assert holdout["label"].value_counts().to_dict() == {"positive": 25, "negative": 12, "neutral": 13} or \
        holdout["label"].value_counts().to_dict() == {"positive": 25, "negative": 13, "neutral": 12}
    assert train["id"].tolist() == again_train["id"].tolist()
    assert train["id"].tolist() != other_train["id"].tolist()


@pytest.mark.parametrize("n", [0, 1, 3])
def test_holdout_split_survives_tiny_frames(n):
    frame = normalise(raw_frame(4).head(n), COLUMNS, "f", "%B %d, %Y")
    train, holdout = split_holdout(frame, 0.2, seed=0)
    assert len(train) + len(holdout) == n


def test_identical_texts_go_to_one_side_and_texts_of_both_domains_stay_in_train():
    """Real data repeats texts, sometimes with other labels: a holdout must never share a text with a train
    split, so ingest keeps every text on one side, and texts the other domain also has in train."""
    from tasks.ingest import holdout_splits

    frame = normalise(raw_frame(200), COLUMNS, "f", "%B %d, %Y")
    repeated = frame.iloc[:60].assign(id=lambda f: f["id"] + "-again",
                                      label=lambda f: f["label"].map({"positive": "negative", "negative": "neutral",
                                                                      "neutral": "positive"}))
    noisy = pd.concat([frame, repeated], ignore_index=True)
    train, holdout = split_holdout(noisy, 0.25, seed=3)
    assert not set(train["text"]) & set(holdout["text"])
    assert len(train) + len(holdout) == len(noisy) and abs(len(set(holdout["text"])) - 50) <= 1
    shared = frozenset(frame["text"].iloc[100:140])
    train, holdout = split_holdout(frame, 0.25, seed=3, train_only=shared)
    assert shared <= set(train["text"]) and len(holdout) == 50
    source, target = frame.iloc[:100], frame.iloc[100:]
    splits, shared_count = holdout_splits(pd.concat([source, target.iloc[:10].assign(id=lambda f: f["id"] + "-s")]),
                                          target, 0.25, seed=3)
    assert shared_count == 10
    trains = set(splits["source_train"]["text"]) | set(splits["target_train"]["text"])
    assert not trains & (set(splits["source_holdout"]["text"]) | set(splits["target_holdout"]["text"]))


def test_without_repeated_texts_the_split_is_the_plain_stratified_one():
    from sklearn.model_selection import train_test_split

    frame = normalise(raw_frame(200), COLUMNS, "f", "%B %d, %Y")
    _, holdout = split_holdout(frame, 0.25, seed=3)
    _, expected = train_test_split(range(200), test_size=50, random_state=3, stratify=frame["label"])
    assert sorted(holdout["id"]) == sorted(frame["id"].iloc[expected])


@pytest.mark.parametrize("spec,message", [
    ("text=review,label", "'label' is not KEY=COLUMN"),
    ("body=review", "unknown key 'body'"),
    ("label=rating", "must say which column holds the text"),
    ("text=review,text=other", "text is given twice"),
    ("text=review,groups=text", "collide with the normalised schema"),
])
def test_column_specs_that_make_no_sense_are_refused(spec, message):
    from tasks.errors import ConfigError
    from tasks.ingest import columns_for_file

    with pytest.raises(ConfigError, match=message):
        columns_for_file(raw_frame(4), COLUMNS, spec, Path("f.csv"))


def test_columns_come_from_the_flag_then_params_then_text_and_label():
    from tasks.ingest import columns_for_file

    raw = raw_frame(4)
    assert columns_for_file(raw, COLUMNS, None, Path("f.csv")) == (COLUMNS, "params.yaml (ingest.columns)")
    plain = raw.rename(columns={COLUMNS.text: "text", COLUMNS.label: "label"})
    columns, origin = columns_for_file(plain, COLUMNS, None, Path("f.csv"))
    assert (columns.text, columns.label, origin) == ("text", "label", "the columns named text and label")
    given, origin = columns_for_file(raw, COLUMNS, f"text={COLUMNS.text},label={COLUMNS.label}", Path("f.csv"))
    assert (given.text, given.groups, origin) == (COLUMNS.text, [], "--columns")
    with pytest.raises(DataError, match=r"--columns names \['nope'\], which the file does not have"):
        columns_for_file(raw, COLUMNS, "text=nope", Path("f.csv"))
    with pytest.raises(DataError, match="no 'review' column .* and no 'text' column; say which"):
        columns_for_file(raw.rename(columns={COLUMNS.text: "body"}), COLUMNS, None, Path("f.csv"))


def test_drop_repeats_keeps_first():
    frame = pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "x", "x"], "label": ["p", "p", "n"]})
    assert drop_repeats(frame)["id"].tolist() == ["a", "c"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_read_table_formats(tmp_path, suffix):
    frame = raw_frame(8)
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    back = read_table(path)
    assert back["review"].tolist() == frame["review"].tolist()
    assert len(back) == 8


def test_read_table_edge_cases(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert read_table(empty).empty
    latin = tmp_path / "latin.csv"
    latin.write_bytes("review,rating\ncaf\xe9 ok,positive\n".encode("latin-1"))
    assert read_table(latin)["review"].iloc[0] == "caf\ufffd ok"
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        read_table(tmp_path / "data.xlsx")


def test_a_list_or_mapping_where_a_text_or_label_belongs_is_refused_by_column_row_and_type(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text('{"review": "fine", "rating": "positive"}\n{"review": {"html": "<p>x</p>"}, "rating": "positive"}\n'
                    '{"review": ["a", "b"], "rating": "negative"}\n')
    with pytest.raises(DataError, match=r"nested.jsonl: column 'review' row 2 holds a dict, as do 1 other rows"):
        read_with_columns(path, COLUMNS, None, None)
