"""Watching serving traffic for shift: the service's prediction log as target data, and the production
model's own training data (the exact bytes, found in the DVC cache by the md5 in its lineage) as source."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tasks.config import Params
from tasks.errors import DataError
from tasks.files import write_json

TRAIN_SPLITS = ("source_train", "target_train")


def read_prediction_log(path: Path, max_rows: int) -> pd.DataFrame:
    """The most recent `max_rows` served texts (`id`, `text`, `timestamp`), oldest first."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no prediction log yet; serve the production model first (regraft serve)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}:{number}: not a JSON line") from None
    frame = pd.DataFrame(rows[-max_rows:])
    if frame.empty:
        raise DataError(f"{path}: the prediction log is empty")
    if "text" not in frame:
        raise DataError(f"{path}: the log keeps only hashes of the texts (serve.log_texts: hash); set "
                        "serve.log_texts: text to watch serving traffic for shift")
    frame = frame.dropna(subset=["text"]).reset_index(drop=True)
    return pd.DataFrame({"id": [f"served:{i}" for i in range(len(frame))], "text": frame["text"].astype("str"),
                         "timestamp": pd.to_datetime(frame["time"], utc=True)})


def dvc_cache_file(cache: Path, md5: str) -> Path:
    """Where DVC 3 keeps a file by its md5."""
    return Path(cache) / "files" / "md5" / md5[:2] / md5[2:]


def training_data(entry: dict, splits: dict[str, Path], cache: Path) -> pd.DataFrame:
    """The train splits a packaged model learned from, read from the DVC cache by their recorded md5."""
    frames = []
    recorded = entry.get("data_md5") or {}
    for name in TRAIN_SPLITS:
        md5 = recorded.get(str(splits[name]))
        if not md5:
            raise DataError(f"the production model's lineage has no md5 for {splits[name]}")
        path = dvc_cache_file(cache, md5)
        if not path.is_file():
            raise DataError(f"{splits[name]} (md5 {md5}) is not in the DVC cache {cache}; `dvc pull` it first")
        frames.append(pd.read_parquet(path))
    return pd.concat(frames, ignore_index=True)


def watch_traffic(params: Params, max_rows: int) -> dict:
    """Run the shift tests on (production training data, recent served texts); write reports/shift-watch.json."""
    from tasks.registry import read_record
    from tasks.serving import production_tag
    from tasks.shift import analyse_shift, without_bulk

    tag = production_tag(params.paths.registry)
    entry = read_record(params.paths.registry)["models"][tag]
    splits = params.paths.splits.model_dump()
    source = training_data(entry, splits, Path(".dvc") / "cache")
    target = read_prediction_log(params.serve.prediction_log, max_rows)
    report = without_bulk(analyse_shift(source, target, params))
    report.update({"stage": "shift-watch", "production_model": tag, "served_rows": len(target),
                   "log": str(params.serve.prediction_log)})
    write_json(params.report_file("shift-watch"), report)
    return report
