"""DVC stage `evaluate`: candidate, champion and two baselines on both holdout splits, and on the source holdout
weighted to look like the target (the shift stage's importance weights) -> reports/evaluate.json,
reports/metrics.json (DVC metrics), reports/evaluate/ (bootstrap table, plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.stage_io import read_splits, report_path, run_stage, write_atomically, write_json, write_parquet
from tasks.config import Params
from tasks.baselines import baseline_probabilities, classifier_probabilities, train_frame
from tasks.errors import CheckFailed
from tasks.evaluate import bootstrap_table, evaluate_split, transfer_gain, weighted_split
from tasks.figures import evaluate_figures
from tasks.registry import production_problems
from tasks.render import evaluate_markdown
from tasks.reports import (BootstrapKey, EvaluateReport, SplitReport, WeightedSplit, WeightedUnavailable,
                           write_report)

HOLDOUTS = ("target_holdout", "source_holdout")
WEIGHTED = "source_holdout_weighted"


def main(params: Params) -> int:
    # Fail closed: a champion whose files are not the registry's production model would make the comparison
    # (non-inferiority, forgetting) meaningless, or silently absent.
    problems = production_problems(params.paths.registry, params.paths.champion)
    if problems:
        raise CheckFailed("the registry's production model cannot be compared with: " + "; ".join(problems[:5])
                          + ". `regraft promote TAG` or `regraft rollback` completes or repairs it.")
    splits = read_splits(params)
    texts = {split: splits[split]["text"].astype("str").tolist() for split in HOLDOUTS}
    labels, max_length = params.ingest.labels, params.model.max_length
    probas = {"candidate": classifier_probabilities(params.paths.model, texts, labels, max_length, "candidate")}
    champion = params.paths.champion
    has_champion = (champion / "config.json").is_file()
    if has_champion:
        probas["champion"] = classifier_probabilities(champion, texts, labels, max_length, "champion (production)")
    probas.update(baseline_probabilities(train_frame(splits, params.train.data), texts, labels, params.model.base,
                                         max_length, params.paths.embeddings))

    evaluated: dict[str, SplitReport] = {}
    samples: dict[BootstrapKey, np.ndarray] = {}
    for split in HOLDOUTS:
        per_model = {model: by_split[split] for model, by_split in probas.items()}
        evaluated[split], split_samples = evaluate_split(
            splits[split], per_model, params.ingest.labels, params.ingest.columns.groups, params.evaluate, split)
        samples.update(split_samples)
    weighted, weighted_samples = weighted_source_holdout(params, splits["source_holdout"],
                                                         {m: p["source_holdout"] for m, p in probas.items()})
    samples.update(weighted_samples)
    report = EvaluateReport(
        labels=params.ingest.labels, champion=str(champion) if has_champion else None,
        models={
            "candidate": f"fine-tuned model at {params.paths.model}",
            "champion": f"production model at {champion}" if has_champion else None,
            "frozen_encoder": f"{params.model.base} frozen, mean-pooled, logistic-regression head",
            "tfidf": "TF-IDF (1-2 grams) + logistic regression",
        },
        bootstrap=params.evaluate.bootstrap, confidence=params.evaluate.confidence, splits=evaluated,
        transfer_gain=transfer_gain(evaluated), weighted=weighted, bootstrap_file=str(params.paths.bootstrap))
    write_parquet(params.paths.bootstrap, bootstrap_table(samples))
    report.plots = evaluate_figures(report, params.paths.evaluation)
    write_confusion_rows(params.paths.confusion_rows, splits["target_holdout"], probas["candidate"]["target_holdout"],
                         params.ingest.labels)
    write_report(report_path(params, "evaluate"), report)
    write_json(params.paths.metrics, headline_metrics(report))
    print(evaluate_markdown(report))
    return 0


def weighted_source_holdout(params: Params, frame: pd.DataFrame, probas: dict[str, np.ndarray]
                            ) -> tuple[WeightedSplit | WeightedUnavailable, dict[BootstrapKey, np.ndarray]]:
    """The source holdout weighted by the shift stage's importance weights (target/source density ratio), so that
    forgetting can be judged on source rows that look like the target. Rows the shift stage did not weigh (it
    samples beyond shift.max_rows) are left out, and said so."""
    weights_file = params.paths.shift_weights
    by_id = pd.read_parquet(weights_file).drop_duplicates("id").set_index("id")["weight"] if weights_file.is_file() else None
    if by_id is None or by_id.empty or "id" not in frame:
        return WeightedUnavailable(split=WEIGHTED, problem=f"no importance weights in {weights_file}"), {}
    weights = frame["id"].astype("str").map(by_id).to_numpy(dtype=float)
    weighed = ~np.isnan(weights)
    if not weighed.any():
        return WeightedUnavailable(split=WEIGHTED, problem=f"{weights_file} weighs none of the source_holdout rows"), {}
    index = {label: i for i, label in enumerate(params.ingest.labels)}
    entry, samples = weighted_split(frame["label"].map(index).to_numpy()[weighed],
                                    {m: p[weighed] for m, p in probas.items()}, weights[weighed],
                                    params.ingest.labels, params.evaluate, WEIGHTED)
    return entry.model_copy(update={"rows_without_weight": int((~weighed).sum())}), samples


def headline_metrics(report: EvaluateReport) -> dict:
    """The few numbers `dvc metrics show/diff` and `dvc exp show` compare across runs, each with its interval
    (`<metric>_low`, `<metric>_high`)."""
    out = {}
    for split, entry in report.splits.items():
        for model, result in entry.models.items():
            overall, row = result.overall, {}
            for metric, value in (("accuracy", overall.accuracy), ("macro_f1", overall.macro_f1), ("ece", overall.ece)):
                row[metric] = value
                interval = overall.intervals.get(metric)
                if interval:
                    row[f"{metric}_low"], row[f"{metric}_high"] = interval
            out.setdefault(split, {})[model] = row
    gain = report.transfer_gain
    out["transfer_gain_macro_f1"] = gain.estimate
    out["transfer_gain_macro_f1_low"], out["transfer_gain_macro_f1_high"] = gain.interval
    return out


def write_confusion_rows(path: Path, frame: pd.DataFrame, proba: np.ndarray, labels: list[str]) -> None:
    """actual/predicted per row, for DVC's confusion-matrix plot template."""
    rows = pd.DataFrame({"actual": frame["label"].astype("str"), "predicted": [labels[i] for i in proba.argmax(axis=1)]})
    write_atomically(path, lambda tmp: rows.to_csv(tmp, index=False))


if __name__ == "__main__":
    run_stage(main)
