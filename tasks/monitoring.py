"""Watching serving traffic: the service's prediction log as target data, and the production model's own training
data (the exact bytes, found in the DVC cache by the md5 in its lineage) as source. Shift tests compare the two;
the model's holdout rows (from the cache the same way) let tasks/estimate.py say how well it does on the traffic
before labels arrive; labels that arrive later (`regraft feedback`) are scored against the estimate made for the
same traffic, in paths.performance_history."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DVC_DIR, Params
from tasks.errors import DataError
from tasks.files import text_sha256, write_atomically
from tasks.reports import ShiftWatchReport, parse_report, write_report

TRAIN_SPLITS = ("source_train", "target_train")
HOLDOUT_SPLITS = ("source_holdout", "target_holdout")


def json_lines(path: Path, missing: str) -> list[dict]:
    """Every line of a JSON-lines file as a dict; a line that is not one is refused with its number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: not a JSON line")
            rows.append(row)
    return rows


def read_prediction_log(path: Path, max_rows: int) -> pd.DataFrame:
    """The most recent `max_rows` served texts (`id`, `text`, `timestamp`), oldest first."""
    rows = json_lines(path, "no prediction log yet; serve the production model first (regraft serve)")
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


def recorded_split(entry: dict, name: str, splits: dict[str, Path], cache: Path) -> pd.DataFrame:
    """One split as a packaged model saw it, read from the DVC cache by the md5 in its lineage."""
    md5 = (entry.get("data_md5") or {}).get(str(splits[name]))
    if not md5:
        raise DataError(f"the model's lineage has no md5 for {splits[name]} (was it packaged without a dvc.lock?)")
    path = dvc_cache_file(cache, md5)
    if not path.is_file():
        raise DataError(f"{splits[name]} (md5 {md5}) is not in the DVC cache {cache}; `dvc pull` it first")
    return pd.read_parquet(path)


def training_data(entry: dict, splits: dict[str, Path], cache: Path) -> pd.DataFrame:
    """The train splits a packaged model learned from."""
    return pd.concat([recorded_split(entry, name, splits, cache) for name in TRAIN_SPLITS], ignore_index=True)


def watch_traffic(params: Params, max_rows: int) -> ShiftWatchReport:
    """Run the shift tests on (production training data, recent served texts) and estimate the production model's
    performance on those texts; write reports/shift-watch.json and add the estimate to the performance history."""
    from tasks.registry import read_record
    from tasks.serving import production_tag
    from tasks.shift import analyse_shift, without_bulk

    tag = production_tag(params.paths.registry)
    entry = read_record(params.paths.registry)["models"][tag]
    splits = params.paths.splits.model_dump()
    cache = DVC_DIR / "cache"
    source = training_data(entry, splits, cache)
    target = read_prediction_log(params.serve.prediction_log, max_rows)
    report = without_bulk(analyse_shift(source, target, params))
    report.update({"stage": "shift-watch", "production_model": tag, "served_rows": len(target),
                   "log": str(params.serve.prediction_log)})
    holdouts = {name: recorded_split(entry, name, splits, cache) for name in HOLDOUT_SPLITS}
    report["performance"] = served_performance(params, holdouts, target)
    report["performance"]["window"] = window_of(target)
    report = parse_report(ShiftWatchReport, report, "the shift-watch report")
    write_report(params.report_file("shift-watch"), report)
    write_history(params.paths.performance_history,
                  read_history(params.paths.performance_history) + [estimate_record(report)])
    return report


def served_performance(params: Params, holdouts: dict[str, pd.DataFrame], served: pd.DataFrame) -> dict:
    """The production model's estimated accuracy and macro-F1 on the served texts, learned from its labelled holdout
    rows, with the domain classifier's importance weights (holdout vs served); and whether it has dropped by more
    than monitor.max_drop."""
    import torch

    from tasks.baselines import classifier_probabilities
    from tasks.estimate import estimate_performance, performance_drop
    from tasks.models import mean_pooled_embeddings
    from tasks.registry import production_problems
    from tasks.shift import classifier_test, importance_weights

    problems = production_problems(params.paths.registry, params.paths.champion)
    if problems:
        raise DataError("the production model's files cannot be estimated: " + "; ".join(problems))
    labels, max_length, cfg = params.ingest.labels, params.model.max_length, params.monitor
    index = {label: i for i, label in enumerate(labels)}
    validation = {name: frame[frame["label"].astype("str").isin(index)] for name, frame in holdouts.items()}
    texts = {name: frame["text"].astype("str").tolist() for name, frame in validation.items() if len(frame)}
    if not texts:
        raise DataError("the production model's holdout splits have no labelled rows to estimate from")
    texts["served"] = served["text"].astype("str").tolist()
    probas = classifier_probabilities(params.paths.champion, texts, labels, max_length, "production model")
    # Per split, in split order: evaluate embedded the same lists, so these come from the cache.
    embedded = {name: mean_pooled_embeddings(params.model.base, rows, max_length, params.paths.embeddings)
                for name, rows in texts.items()}
    holdout_names = [name for name in texts if name != "served"]
    val_emb = torch.cat([embedded[name] for name in holdout_names])
    _, scores = classifier_test(val_emb, embedded["served"], params.shift.classifier_folds, params.shift.seed)
    weights = importance_weights(scores[: len(val_emb)], len(val_emb), len(texts["served"]))
    val_labels = np.concatenate([validation[name]["label"].astype("str").map(index).to_numpy() for name in holdout_names])
    estimate = estimate_performance(np.vstack([probas[name] for name in holdout_names]), val_labels, probas["served"],
                                    weights, confidence=cfg.confidence, draws=cfg.draws,
                                    min_effective_rows=cfg.min_effective_rows, seed=params.shift.seed)
    estimate["validation"] = {name: len(validation[name]) for name in holdout_names}
    estimate["drop"] = performance_drop(estimate, cfg.max_drop, cfg.metric)
    return estimate


def window_of(served: pd.DataFrame) -> dict:
    """The served time span an estimate covers: labels that arrive later for texts served in it are its truth."""
    return {"from": served["timestamp"].min().isoformat(), "to": served["timestamp"].max().isoformat()}


def estimate_record(report: ShiftWatchReport) -> dict:
    """One line of the performance history: what shift-watch estimated, for which model and traffic."""
    performance = report.performance
    return {"kind": "estimate", "id": uuid.uuid4().hex, "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "production_model": report.production_model, "window": performance.window,
            "served_rows": report.served_rows, "verdict": performance.verdict,
            "validated": {m: performance.validated[m] for m in ("accuracy", "macro_f1")},
            "estimated": {m: {"estimate": e.estimate, "interval": e.interval} for m, e in performance.estimate.items()},
            "degraded": performance.drop.degraded}


def read_history(path: Path) -> list[dict]:
    """The performance history, oldest first (none yet: empty)."""
    return json_lines(path, "no history") if Path(path).is_file() else []


def write_history(path: Path, rows: list[dict]) -> None:
    """The file is rewritten whole and renamed, so a crash leaves the old history or the new one."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def served_predictions(path: Path) -> pd.DataFrame:
    """Every logged prediction: time, text sha256 (logged, or computed from a logged text), label, model version."""
    rows = json_lines(path, "no prediction log; nothing was served to compare labels with")
    frame = pd.DataFrame(rows)
    frame["text_sha256"] = [logged_text_sha256(row) for row in rows]
    missing = [c for c in ("time", "label", "model_version") if c not in frame]
    if missing:
        raise DataError(f"{path}: prediction log lines lack {missing}")
    frame["time"] = pd.to_datetime(frame["time"], utc=True, errors="coerce")
    return frame.dropna(subset=["text_sha256", "time"])


LOGGED_FIELDS = {"prediction_id": str, "label": str, "probabilities": dict, "model_version": str, "time": str}


def logged_predictions(path: Path, missing: str) -> pd.DataFrame:
    """Every line of a prediction log (production's or the shadow candidate's) with the fields a comparison reads,
    each checked: the logs come from serving hosts, so a line that lacks a field or holds the wrong type is refused
    with the file and line named. Columns: LOGGED_FIELDS, `time` parsed, and `text_sha256` (logged, or computed from
    a logged text; None when neither is there) and `groups` (the text's group values, None where the request gave
    none)."""
    rows = json_lines(path, missing)
    for number, row in enumerate(rows, start=1):
        wrong = [name for name, kind in LOGGED_FIELDS.items() if not isinstance(row.get(name), kind)]
        probabilities = row.get("probabilities")
        if not wrong and not all(isinstance(p, (int, float)) and not isinstance(p, bool)
                                 for p in probabilities.values()):
            wrong = ["probabilities"]
        groups = row.get("groups")
        if not wrong and groups is not None and not (
                isinstance(groups, dict) and all(isinstance(v, str) for v in groups.values())):
            wrong = ["groups"]
        if wrong:
            raise DataError(f"{path}:{number}: {', '.join(wrong)} missing or not of the logged type")
    frame = pd.DataFrame({name: [row[name] for row in rows] for name in LOGGED_FIELDS})
    frame["groups"] = [row.get("groups") for row in rows]  # the request's group values, where it gave them
    frame["time"] = pd.to_datetime(frame["time"], utc=True, errors="coerce", format="ISO8601")
    if frame["time"].isna().any():
        raise DataError(f"{path}:{int(frame['time'].isna().to_numpy().argmax()) + 1}: time is not an ISO timestamp")
    frame["text_sha256"] = [logged_text_sha256(row) for row in rows]
    return frame


def logged_text_sha256(row: dict) -> str | None:
    """A logged prediction's text sha256: logged (serve.log_texts: hash), else computed from the logged text."""
    if isinstance(row.get("text_sha256"), str):
        return row["text_sha256"]
    return text_sha256(row["text"]) if isinstance(row.get("text"), str) else None


def feedback_truth(feedback: pd.DataFrame, labels: list[str], origin: str) -> pd.DataFrame:
    """Labels that arrived for served texts, by text sha256 (the last label of a text wins), checked against
    ingest.labels: what `regraft feedback` and `regraft shadow --feedback` join to the logged predictions."""
    unknown = sorted(set(feedback["label"].astype("str")) - set(labels))
    if unknown:
        raise DataError(f"{origin}: labels {unknown[:5]} are not in ingest.labels {labels}")
    return pd.DataFrame({"text_sha256": feedback["text"].astype("str").map(text_sha256),
                         "truth": feedback["label"].astype("str")}).drop_duplicates("text_sha256", keep="last")


def record_feedback(params: Params, feedback: pd.DataFrame, origin: str) -> list[dict]:
    """Labels that arrived for served texts: the production model's realized accuracy and macro-F1 on them, per
    estimate whose window and model they match, recorded next to that estimate. Returns the new records."""
    from tasks.estimate import measured_performance

    labels = params.ingest.labels
    index = {label: i for i, label in enumerate(labels)}
    truth = feedback_truth(feedback, labels, origin)
    served = served_predictions(params.serve.prediction_log).merge(truth, on="text_sha256")
    if served.empty:
        raise DataError(f"{origin}: none of its {len(truth)} texts is in the prediction log "
                        f"{params.serve.prediction_log}")
    history = read_history(params.paths.performance_history)
    records = []
    for estimate in (row for row in history if row.get("kind") == "estimate"):
        start, end = (pd.Timestamp(estimate["window"][side]) for side in ("from", "to"))
        # A logged label outside ingest.labels came from another label set: not this estimate's model.
        rows = served[(served["time"] >= start) & (served["time"] <= end) & served["label"].astype("str").isin(index)
                      & (served["model_version"] == estimate["production_model"])]
        if rows.empty:
            continue
        realized = measured_performance(rows["label"].astype("str").map(index).to_numpy(),
                                        rows["truth"].map(index).to_numpy(), len(labels), params.monitor.confidence)
        records.append({"kind": "realized", "estimate_id": estimate["id"],
                        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "labelled_rows": len(rows),
                        "realized": {m: realized[m] for m in ("accuracy", "macro_f1")},
                        "realized_accuracy_interval": realized["accuracy_interval"],
                        "estimated": estimate["estimated"],
                        "error": {m: estimate["estimated"][m]["estimate"] - realized[m] for m in ("accuracy", "macro_f1")},
                        "source": origin})
    if not records:
        raise DataError(f"{origin}: its texts were served, but outside every estimated window in "
                        f"{params.paths.performance_history}; run shift-watch first")
    write_history(params.paths.performance_history, history + records)
    return records
