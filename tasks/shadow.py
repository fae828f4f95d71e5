"""The shadow candidate against the production model on the same served texts (`regraft shadow`): production's
prediction log and the shadow log joined by prediction_id; agreement, the confusion of the two models' labels, each
model's label-free estimate (tasks/estimate.py `estimate_performance` with monitor's settings, as shift-watch calls
it, less the importance weights: those need the served texts, which a log may keep only as hashes, and estimate.py
averages their point into no estimate) and, when labels came back for served texts, realized metrics; and a
three-way verdict on the candidate's macro-F1 minus production's.

Why the difference gets its own, paired interval: both models answered the same texts, so most of what varies from
one window of traffic to the next (which texts came, how hard they were) moves both estimates together. Two separate
intervals would count that twice and could not tell a small difference from none; resampling the joined rows once
per draw, for both models at once, leaves it out. Label-free, each row's contribution is what the estimator adds for
it (expected confusion: its calibrated probability of being right, and which class otherwise; ATC: whether its
confidence clears the threshold fitted on validation rows, refitted on one shared validation resample per draw), and
the difference interval spans both methods' intervals, as `combine` does for one model, since neither method's bias
is known. Unlike estimate.py's intervals, no coin is tossed for each row's correctness: what is estimated is the
models' performance on the traffic, of which the served rows are a sample, and independent tosses for the two models
would add noise that a shared truth does not have (where they agree they are right or wrong together). With labels,
each row's realized correctness is resampled instead: no estimator's assumption is left, so enough labelled rows
decide the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import DVC_DIR, MonitorConfig, Params
from tasks.errors import DataError
from tasks.estimate import (POINT_METHODS, MethodEstimate, atc_threshold, combine, estimate_performance,
                            measured_performance, wrong_class_distribution)
from tasks.evaluate import confusion_counts, metrics_from_confusion, percentile_interval, wilson_interval
from tasks.reports import ShadowReport, parse_report, write_report
from tasks.monitoring import HOLDOUT_SPLITS, feedback_truth, logged_predictions, recorded_split

NOT_WORSE, WORSE, NOT_ENOUGH = "not worse", "worse", "not enough evidence yet"
ROLES = ("production", "candidate")
VERDICT_METRIC = "macro_f1"
NO_GROUPS = ("no served text carried group values (POST /predict items {\"text\": ..., \"groups\": {...}}): no "
             "per-group comparison")


@dataclass(frozen=True)
class HoldoutProbabilities:
    """Both models' class probabilities on the same labelled validation rows: what the label-free estimators learn
    from."""

    labels: np.ndarray        # class index per row
    production: np.ndarray    # (rows, classes)
    candidate: np.ndarray


def in_window(frame: pd.DataFrame, since: str, until: str | None = None) -> pd.Series:
    """Rows logged from `since` on (and before `until`, when given)."""
    inside = frame["time"] >= pd.Timestamp(since)
    return inside & (frame["time"] < pd.Timestamp(until)) if until else inside


def join_shadow(production: pd.DataFrame, shadowed: pd.DataFrame, production_tag: str, candidate_tag: str,
                since: str, until: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Production's rows served while the shadow ran (from `since`, before `until`), each beside the candidate's row
    with its prediction_id. Production rows without one (shed, failed or still queued) are counted and left out."""
    served = production[(production["model_version"] == production_tag)
                        & in_window(production, since, until)].drop_duplicates("prediction_id", keep="last")
    candidate = shadowed[shadowed["model_version"] == candidate_tag].drop_duplicates("prediction_id", keep="last")
    joined = served.merge(candidate[["prediction_id", "label", "probabilities", "text_sha256", "groups"]],
                          on="prediction_id", suffixes=("_production", "_candidate"))
    joined["text_sha256"] = joined["text_sha256_production"].fillna(joined["text_sha256_candidate"])
    # The group values are on the row of the model that answered (a canary's texts: the candidate's).
    joined["groups"] = [theirs if not isinstance(ours, dict) else ours
                        for ours, theirs in zip(joined["groups_production"], joined["groups_candidate"])]
    rows = {"served": len(served), "joined": len(joined), "without_shadow": len(served) - len(joined),
            "shadow_without_production": int((~candidate["prediction_id"].isin(served["prediction_id"])).sum())}
    return joined.reset_index(drop=True), rows


def probability_matrix(rows: pd.Series, labels: list[str], role: str) -> np.ndarray:
    """(rows, classes) in ingest.labels order; a row of another label set names the model and the prediction."""
    expected = set(labels)
    for prediction_id, probabilities in rows.items():
        if set(probabilities) != expected:
            raise DataError(f"the {role}'s prediction {prediction_id} has probabilities for {sorted(probabilities)}, "
                            f"not ingest.labels {labels}")
    matrix = [[probabilities[label] for label in labels] for probabilities in rows]
    return np.array(matrix, dtype=float).reshape(-1, len(labels))


def expected_confusions(correct: np.ndarray, proba: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(draws, k, k) expected confusion of each resample: served row i taken counts[d, i] times, right with
    probability correct[d, i] and otherwise of a class drawn from the model's other probabilities (tasks/estimate.py
    `expected_confusion`, for many resamples at once)."""
    k = proba.shape[1]
    predicted = proba.argmax(axis=1)
    others = wrong_class_distribution(proba, predicted)
    right, wrong = counts * correct, counts * (1 - correct)
    confusion = np.zeros((len(counts), k, k))
    for p in range(k):
        chose = predicted == p
        confusion[:, :, p] = wrong[:, chose] @ others[chose]
        confusion[:, p, p] += right[:, chose].sum(axis=1)
    return confusion


def row_correctness(method: str, val_proba: np.ndarray, val_labels: np.ndarray, served_proba: np.ndarray,
                    val_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each served row's probability of being right under `method`: on all validation rows, and per draw (ATC's
    threshold refitted on the draw's validation resample, the same rows for both models)."""
    confidence = served_proba.max(axis=1)
    if method == "expected_confusion":
        return confidence, confidence[None, :]
    val_confidence, val_correct = val_proba.max(axis=1), val_proba.argmax(axis=1) == val_labels
    threshold = atc_threshold(val_confidence, val_correct)
    thresholds = np.array([atc_threshold(val_confidence[r], val_correct[r]) for r in val_rows])
    return (confidence > threshold).astype(float), (confidence[None, :] > thresholds[:, None]).astype(float)


def estimated_difference(holdout: HoldoutProbabilities, served: dict[str, np.ndarray], cfg: MonitorConfig,
                         seed: int) -> dict:
    """The candidate's estimated accuracy and macro-F1 minus production's, per method and combined, with paired
    intervals (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n = len(served["production"])
    counts = rng.multinomial(n, np.full(n, 1 / n), size=cfg.draws).astype(float)
    val_rows = rng.integers(0, len(holdout.labels), size=(cfg.draws, len(holdout.labels)))
    methods = []
    for method in POINT_METHODS:
        point, drawn = {}, {}
        for role in ROLES:
            proba = served[role]
            correct, correct_drawn = row_correctness(method, getattr(holdout, role), holdout.labels, proba, val_rows)
            point[role] = metrics_from_confusion(expected_confusions(correct[None, :], proba, np.ones((1, n))))
            drawn[role] = metrics_from_confusion(expected_confusions(correct_drawn, proba, counts))
        gap = {metric: (float(point["candidate"][metric][0] - point["production"][metric][0]),
                        percentile_interval(drawn["candidate"][metric] - drawn["production"][metric], cfg.confidence))
               for metric in ("accuracy", "macro_f1")}
        methods.append(MethodEstimate(method, gap["accuracy"][0], gap["accuracy"][1], gap["macro_f1"][0],
                                      gap["macro_f1"][1]))
    return {**{metric: combine(methods, metric) for metric in ("accuracy", "macro_f1")},
            "methods": {m.method: {"accuracy": m.accuracy, "accuracy_interval": m.accuracy_interval,
                                   "macro_f1": m.macro_f1, "macro_f1_interval": m.macro_f1_interval} for m in methods}}


def realized_difference(truth: np.ndarray, predicted: dict[str, np.ndarray], k: int, cfg: MonitorConfig,
                        seed: int) -> dict:
    """The candidate's realized accuracy and macro-F1 minus production's on labelled served texts, with a paired
    bootstrap over those texts."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(truth), size=(cfg.draws, len(truth)))
    point = {role: metrics_from_confusion(confusion_counts(truth, predicted[role], k)) for role in ROLES}
    drawn = {role: metrics_from_confusion(confusion_counts(truth[rows], predicted[role][rows], k)) for role in ROLES}
    return {metric: {"estimate": float(point["candidate"][metric] - point["production"][metric]),
                     "interval": percentile_interval(drawn["candidate"][metric] - drawn["production"][metric],
                                                     cfg.confidence)}
            for metric in ("accuracy", "macro_f1")}


def shadow_verdict(interval: list[float | None] | None, rows: int, cfg: MonitorConfig) -> tuple[str, str]:
    """Three-way, like the gate: shown not worse, shown worse (by more than monitor.max_drop), or neither yet."""
    if rows < cfg.min_shadow_rows:
        return NOT_ENOUGH, f"{rows} rows (< monitor.min_shadow_rows {cfg.min_shadow_rows})"
    if not interval or None in interval:
        return NOT_ENOUGH, "no interval for the difference"
    low, high = interval
    if low > -cfg.max_drop:
        return NOT_WORSE, f"the interval lies above -{cfg.max_drop:g} (monitor.max_drop)"
    if high < -cfg.max_drop:
        return WORSE, f"the interval lies below -{cfg.max_drop:g} (monitor.max_drop)"
    return NOT_ENOUGH, f"the interval contains -{cfg.max_drop:g} (monitor.max_drop)"


def compare_shadow(joined: pd.DataFrame, labels: list[str], cfg: MonitorConfig, *,
                   holdout: HoldoutProbabilities | None, truth: pd.DataFrame | None = None, seed: int = 0,
                   no_estimate: str | None = None) -> dict:
    """The comparison on the joined rows (join_shadow): agreement with its Wilson interval, the confusion of the two
    models' labels, each model's label-free estimate and the paired difference, realized metrics on the rows `truth`
    (feedback_truth) labels, and the verdict: on realized macro-F1 with at least monitor.min_shadow_rows labelled
    rows, else on estimated macro-F1. Without `holdout` (no labelled rows to estimate from: `no_estimate` says why)
    only labels can decide; without enough of them the evidence is not enough yet."""
    k, index = len(labels), {label: i for i, label in enumerate(labels)}
    report = {"rows": len(joined), "labels": labels, "confidence": cfg.confidence, "max_drop": cfg.max_drop,
              "min_rows": cfg.min_shadow_rows, "groups": None, "notes": [NO_GROUPS], "agreement": None,
              "confusion": None, "estimated": None, "realized": None,
              "difference": {"metric": VERDICT_METRIC, "basis": None, "estimated": None, "realized": None}}
    if joined.empty:
        report["verdict"], report["reason"] = NOT_ENOUGH, "no served text has the candidate's prediction yet"
        return report
    served = {role: probability_matrix(joined.set_index("prediction_id")[f"probabilities_{role}"], labels, role)
              for role in ROLES}
    predicted = {role: served[role].argmax(axis=1) for role in ROLES}
    report["agreement"] = agreement(predicted, cfg)
    # Rows: production's label; columns: the candidate's.
    report["confusion"] = confusion_counts(predicted["production"], predicted["candidate"], k).astype(int).tolist()
    difference, interval, rows = report["difference"], None, len(joined)
    if holdout is not None:
        report["estimated"] = estimates(holdout, served, cfg, seed)
        difference["estimated"] = estimated_difference(holdout, served, cfg, seed)
        difference["basis"], interval = "estimated", difference["estimated"][VERDICT_METRIC]["interval"]
    else:
        report["notes"].append(f"no label-free estimate ({no_estimate}): only labels for served texts "
                               f"(--feedback, at least {cfg.min_shadow_rows}) can decide")
    labelled = joined["text_sha256"].map(truth.set_index("text_sha256")["truth"]) if truth is not None else None
    if labelled is not None and labelled.notna().any():
        known = labelled.notna().to_numpy()
        true = labelled[known].map(index).to_numpy()
        report["realized"] = realized(predicted, known, true, k, cfg)
        difference["realized"] = realized_difference(true, {role: predicted[role][known] for role in ROLES}, k, cfg,
                                                     seed)
        if known.sum() >= cfg.min_shadow_rows:  # labels leave no estimator's assumption: they decide
            difference["basis"], rows = "realized", int(known.sum())
            interval = difference["realized"][VERDICT_METRIC]["interval"]
    elif truth is not None:
        report["notes"].append("none of the feedback's texts is among the joined served texts")
    report["groups"] = compare_by_group(joined, served, predicted, labelled, index, cfg, holdout, seed)
    if report["groups"] is not None:
        report["notes"].remove(NO_GROUPS)
    if difference["basis"] is None:
        report["verdict"] = NOT_ENOUGH
        report["reason"] = f"no label-free estimate and labels for fewer than {cfg.min_shadow_rows} of the texts"
        return report
    report["verdict"], why = shadow_verdict(interval, rows, cfg)
    report["reason"] = f"{difference['basis']} macro-F1 difference on {rows} rows: {why}"
    return report


def agreement(predicted: dict[str, np.ndarray], cfg: MonitorConfig) -> dict:
    """How often the two models give the same label, with its Wilson interval."""
    rows, agreeing = len(predicted["production"]), int((predicted["production"] == predicted["candidate"]).sum())
    return {"share": agreeing / rows, "agreeing": agreeing, "interval": wilson_interval(agreeing, rows, cfg.confidence)}


def estimates(holdout: HoldoutProbabilities, served: dict[str, np.ndarray], cfg: MonitorConfig, seed: int) -> dict:
    """Each model's label-free estimate on its served probabilities, learned from its holdout rows."""
    return {role: estimate_performance(getattr(holdout, role), holdout.labels, served[role], confidence=cfg.confidence,
                                       draws=cfg.draws, min_effective_rows=cfg.min_effective_rows, seed=seed)
            for role in ROLES}


def realized(predicted: dict[str, np.ndarray], known: np.ndarray, true: np.ndarray, k: int, cfg: MonitorConfig) -> dict:
    """Each model's metrics on the `known` rows, whose labels are `true`."""
    return {role: measured_performance(predicted[role][known], true, k, cfg.confidence) for role in ROLES}


MAX_GROUP_VALUES = 20
OTHER_VALUES = "(other values)"


def compare_by_group(joined: pd.DataFrame, served: dict[str, np.ndarray], predicted: dict[str, np.ndarray],
                     labelled: pd.Series | None, index: dict[str, int], cfg: MonitorConfig,
                     holdout: HoldoutProbabilities | None, seed: int) -> dict | None:
    """Per group column and value, on the joined texts whose request gave it: rows, agreement with its Wilson
    interval, each model's label-free estimate (from monitor.min_shadow_rows rows, with a holdout) and realized
    metrics on the labelled ones. The verdict stays the overall one: a group's rows are fewer, its intervals wider.
    None when no text carried group values."""
    if "groups" not in joined or joined["groups"].isna().all():
        return None
    k, by_group = len(index), {}
    values = joined["groups"].map(lambda groups: groups if isinstance(groups, dict) else {})
    for column in sorted({column for groups in values for column in groups}):
        of_column = values.map(lambda groups: groups.get(column))
        # Clients send the values: the most served MAX_GROUP_VALUES are shown, the rest pooled, so a report stays
        # bounded whatever they send.
        counts = of_column.value_counts()
        shown = sorted(counts.index[:MAX_GROUP_VALUES])
        pooled = of_column.notna() & ~of_column.isin(shown)
        for value in shown + ([OTHER_VALUES] if pooled.any() else []):
            rows = (pooled if value == OTHER_VALUES else of_column == value).to_numpy()
            in_group = {role: predicted[role][rows] for role in ROLES}
            entry = {"rows": int(rows.sum()), "agreement": agreement(in_group, cfg), "estimated": None,
                     "realized": None}
            if holdout is not None and rows.sum() >= cfg.min_shadow_rows:
                entry["estimated"] = estimates(holdout, {role: served[role][rows] for role in ROLES}, cfg, seed)
            if labelled is not None:
                known = rows & labelled.notna().to_numpy()
                if known.any():
                    entry["realized"] = realized(predicted, known, labelled[known].map(index).to_numpy(), k, cfg)
            by_group.setdefault(column, {})[str(value)] = entry
    return by_group


def holdout_probabilities(params: Params, record: dict, candidate: str) -> HoldoutProbabilities:
    """Both models' probabilities on the candidate's recorded holdout rows: the newest labelled data, which neither
    model trained on (production's own holdout may have become training data for the candidate); the same rows for
    both, so the estimates are paired there too."""
    from tasks.baselines import classifier_probabilities
    from tasks.promotion import stored_model_dir
    from tasks.registry import production_problems
    from tasks.remote import model_remote

    labels, splits = params.ingest.labels, params.paths.splits.model_dump()
    try:
        entry = record["models"][candidate]
        frames = [recorded_split(entry, name, splits, DVC_DIR / "cache") for name in HOLDOUT_SPLITS]
    except DataError as exc:
        raise DataError(f"{candidate}: no holdout rows to estimate both models from: {exc}") from None
    holdout = pd.concat(frames, ignore_index=True)
    holdout = holdout[holdout["label"].astype("str").isin(labels)]
    if holdout.empty:
        raise DataError(f"{candidate}: its holdout splits have no labelled rows to estimate from")
    problems = production_problems(params.paths.registry, params.paths.champion)
    if problems:
        raise DataError("the production model's files cannot be estimated: " + "; ".join(problems))
    texts = {"holdout": holdout["text"].astype("str").tolist()}
    folders = {"production": params.paths.champion,
               "candidate": stored_model_dir(params, candidate, model_remote(params))}
    proba = {role: classifier_probabilities(folder, texts, labels, params.model.max_length, f"{role} model")["holdout"]
             for role, folder in folders.items()}
    index = {label: i for i, label in enumerate(labels)}
    return HoldoutProbabilities(holdout["label"].astype("str").map(index).to_numpy(), **proba)


def shadow_report(params: Params, feedback: pd.DataFrame | None = None, origin: str = "",
                  write: bool = True) -> ShadowReport:
    """Compare the running shadow candidate with production on the traffic both predicted, and write
    reports/shadow.json and .html (unless `write` is False). `feedback`: labelled served texts (the file given to
    `regraft feedback`)."""
    from tasks.registry import read_record

    record = read_record(params.paths.registry)
    shadow = record.get("shadow")
    if not shadow:
        raise DataError(f"{params.paths.registry}: no shadow running; start one with `regraft promote TAG --shadow`")
    production = logged_predictions(params.serve.prediction_log, "no prediction log yet; serve with `regraft serve`")
    shadowed = logged_predictions(params.serve.shadow_log, "no shadow prediction log yet; serve traffic while the "
                                  "shadow runs (`regraft serve`)")
    joined, rows = join_shadow(production, shadowed, shadow["beside"], shadow["tag"], shadow["since"])
    return compared_report("shadow", params, record, shadow, joined, rows, feedback, origin, write)


@dataclass(frozen=True)
class CanaryWindow:
    """Which canary a window judged (its tag and start) and which served texts: logged from `start` to `until`."""

    tag: str
    since: str
    start: str
    until: str


def canary_report(params: Params, feedback: pd.DataFrame | None = None,
                  origin: str = "") -> tuple[ShadowReport, CanaryWindow]:
    """Compare the running canary with production on the texts both predicted (each answered by one, the other
    predicting it off the response path: the two logs together) that were served since its last judged window, and
    write reports/canary.json. Each window judges new texts only, so no text counts towards two windows."""
    import datetime as dt

    from tasks.registry import canary_of, read_record

    # Taken before reading: lines logged later are the next window's.
    until = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    record = read_record(params.paths.registry)
    canary = canary_of(record)
    if not canary:
        raise DataError(f"{params.paths.registry}: no canary running; start one with `regraft promote TAG --canary "
                        "FRACTION`")
    window = CanaryWindow(canary["tag"], canary["since"], canary.get("judged_until") or canary["since"], until)
    answered = logged_predictions(params.serve.prediction_log, "no prediction log yet; serve with `regraft serve`")
    logs = [answered]
    if Path(params.serve.shadow_log).is_file():  # absent until the first text predicted off the response path
        logs.append(logged_predictions(params.serve.shadow_log, ""))
    both = pd.concat(logs, ignore_index=True)
    joined, _ = join_shadow(both, both, canary["beside"], canary["tag"], window.start, until)
    window_rows = answered[answered["model_version"].isin([canary["beside"], canary["tag"]])
                           & in_window(answered, window.start, until)]
    rows = {"served": int(window_rows["prediction_id"].nunique()),
            "answered_by_candidate": int((window_rows["model_version"] == canary["tag"]).sum()),
            "joined": len(joined), "without_shadow": int(window_rows["prediction_id"].nunique()) - len(joined)}
    report = compared_report("canary", params, record, {**canary, "since": window.start}, joined, rows, feedback,
                             origin)
    return report, window


def compared_report(stage: str, params: Params, record: dict, rollout: dict, joined: pd.DataFrame, rows: dict,
                    feedback: pd.DataFrame | None, origin: str, write: bool = True) -> ShadowReport:
    """The comparison of a shadow's or canary's candidate with production on the joined rows, written as
    reports/<stage>.json and .html unless `write` is False."""
    truth = feedback_truth(feedback, params.ingest.labels, origin) if feedback is not None else None
    holdout, no_estimate = None, None
    if len(joined):
        try:
            holdout = holdout_probabilities(params, record, rollout["tag"])
        except DataError as exc:  # said in the report; labels may still decide, nothing else does
            no_estimate = str(exc)
    report = parse_report(ShadowReport, {
        "stage": stage, "production_model": rollout["beside"], "candidate": rollout["tag"], "since": rollout["since"],
        "logs": {"production": str(params.serve.prediction_log), "shadow": str(params.serve.shadow_log)},
        "served": rows, **compare_shadow(joined, params.ingest.labels, params.monitor, holdout=holdout, truth=truth,
                                         seed=params.shift.seed, no_estimate=no_estimate)}, f"the {stage} report")
    if write:
        write_report(params.report_file(stage), report)
        write_html_page(params, stage, report)
    return report


def write_html_page(params: Params, stage: str, report: ShadowReport) -> Path:
    """The comparison as a self-contained HTML page beside its JSON (reports/<stage>.html), to mail or attach."""
    from tasks.files import write_atomically
    from tasks.report import html_report

    page = params.report_file(stage).with_suffix(".html")
    title = f"regraft {stage}: {report.candidate} beside {report.production_model}"
    text = html_report([(stage, report.model_dump())], {}, title, params.paths.train_log)
    write_atomically(page, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return page
