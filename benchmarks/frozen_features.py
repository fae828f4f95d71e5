"""Benchmark: which of the frozen encoder's states a linear head should read, against TF-IDF + logistic regression,
in one run, on the datasets of benchmarks/transfer.py.

evaluate's frozen-encoder baseline is a logistic regression on the last layer's token mean (the sentence embedding
all-MiniLM-L6-v2 was trained for); up to stop 50 auto's feature_extraction rung read the last layer too (a head on
its first token), and since stop 51 it reads the layers' mean this measures (tasks/finetune.py fit_linear_head). A
sentence-similarity objective shapes that last layer; sentiment, authorship and income may be kept better in the
layers below it. This measures the token mean of every layer
averaged over the layers (the embedding layer excluded; the same width, the same single encoder pass:
`output_hidden_states` costs no extra matrix work) against the last layer's, each alone and pooled half and half
with TF-IDF's probabilities (a fixed 50/50 pool, not auto's, whose weight and temperature are chosen on validation
rows), all by the class-balanced logistic regression evaluate fits (tasks/baselines.py), with no scaling or tuning.
Embedded in fp32 (regraft embeds in bf16 where that measures faster; these figures are fp32's).

The rows: each dataset as benchmarks/transfer.py splits it (the demo and drug-conditions through ingest's own
normalisation and split, params.yaml's columns and time cutoff), up to --source source rows and --target target rows
(texts deduplicated across both, so a review filed twice cannot sit on both sides of a fold). Every target row is
scored out of fold (5 stratified folds, the source rows always in the fit, as auto's cross-fitting does), --repeats
times with different folds; macro-F1 is the mean over the repeats, and the paired bootstrap interval of each
difference (tasks/strategy.py macro_f1_evidence, the evidence ladder's own test) comes from the first repeat.

Prints one line per dataset, then one JSON object last: `results`, per dataset each model's macro-F1 (mean over the repeats),
the folds, and the differences `layer_mean_minus_last`, `pool_layer_mean_minus_tfidf` and `pool_last_minus_tfidf`,
each as `estimate` (mean over the repeats), `estimate_first_repeat` and `interval_first_repeat`; and the counts over
the datasets: `*_beats_*` by the mean over the repeats, `*_clearly_beats_*` by the first repeat's interval lying
above zero; `datasets` how many were measured.

    python benchmarks/frozen_features.py [--datasets demo movie-reviews ...] [--source 400] [--target 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import transfer  # noqa: E402  (sets the offline switches and the project root on sys.path)

MODELS = ["tfidf", "last", "layer_mean", "pool_last", "pool_layer_mean"]


def domains(name: str, ingest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(source, target) frames with text and label columns, as benchmarks/transfer.py splits each dataset: the demo
    and drug-conditions through ingest's normalisation (clean text) and split, with `ingest`'s (params.yaml's) columns
    and time cutoff."""
    from tasks.ingest import clean_text, normalise, split_domains

    if name in ("demo", "drug-conditions"):
        frame = normalise(transfer.demo_frame(), ingest.columns, "demo", ingest.time_format)
        split = ingest.split
        if name == "drug-conditions":
            settings, _ = transfer.dataset_settings(name, Path("."))
            split = split.model_copy(update={"by": "column", "column": "condition",
                                             "source_values": settings["ingest.split.source_values"],
                                             "target_values": settings["ingest.split.target_values"]})
        return split_domains(frame, split, ingest.columns)
    with tempfile.TemporaryDirectory(prefix="frozen-features-") as folder:
        write = transfer.census_files if name == "census" else transfer.FILE_DATASETS[name][0]
        write(Path(folder))
        frames = [pd.read_csv(Path(folder) / f"{side}.csv") for side in ("source", "target")]
    return tuple(frame.assign(text=frame["text"].map(clean_text)) for frame in frames)


def rows_of(frame: pd.DataFrame, n: int, seen: set[str]) -> pd.DataFrame:
    """Up to n rows with a text and a label, none of whose texts is in `seen` (which it extends)."""
    frame = frame.dropna(subset=["text", "label"]).astype({"text": str, "label": str})
    frame = frame[~frame["text"].isin(seen)].drop_duplicates("text")
    frame = frame.iloc[np.random.default_rng(0).permutation(len(frame))[:n]]
    seen.update(frame["text"])
    return frame


def frozen_features(base: str, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """The last layer's token mean and the layers' mean, as regraft computes them (tasks/models.py pooled_embeddings,
    one fp32 encoder pass: the second pooling is read from a throwaway cache the first call filled)."""
    from tasks.devices import choose_runtime
    from tasks.models import pooled_embeddings

    runtime = choose_runtime("fp32")
    with tempfile.TemporaryDirectory(prefix="frozen-features-cache-") as cache:
        return {name: pooled_embeddings(base, texts, max_length, pooling, Path(cache), runtime=runtime).numpy()
                for name, pooling in (("last", "mean"), ("layer_mean", "layer_mean"))}


def fold_count(y_target: np.ndarray, n_classes: int) -> int:
    """5 stratified folds, fewer when the rarest class has fewer target rows; refused below 2."""
    folds = min(5, int(np.bincount(y_target, minlength=n_classes).min()))
    if folds < 2:
        raise SystemExit("a class has fewer than 2 target rows: nothing to cross-fit")
    return folds


def cross_fitted(texts: list[str], y: np.ndarray, features: dict[str, np.ndarray], n_source: int, n_classes: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities of every model on the target rows (the rows from n_source on)."""
    from sklearn.model_selection import StratifiedKFold

    from tasks.baselines import balanced_logistic_regression, tfidf_model
    from tasks.lexical import full_proba

    target = np.arange(n_source, len(texts))
    proba = {name: np.zeros((len(target), n_classes)) for name in MODELS}
    folds = fold_count(y[target], n_classes)
    for fit_target, scored in StratifiedKFold(folds, shuffle=True, random_state=seed).split(target, y[target]):
        fit, rows = np.concatenate([np.arange(n_source), target[fit_target]]), target[scored]
        lexical = tfidf_model().fit([texts[i] for i in fit], y[fit])
        scored_texts = [texts[i] for i in rows]
        proba["tfidf"][scored] = full_proba(lexical.predict_proba(scored_texts), lexical.classes_, n_classes)
        for name, x in features.items():
            head = balanced_logistic_regression().fit(x[fit], y[fit])
            proba[name][scored] = full_proba(head.predict_proba(x[rows]), head.classes_, n_classes)
    for name in features:
        proba[f"pool_{name}"] = 0.5 * proba[name] + 0.5 * proba["tfidf"]
    return proba


def measure(name: str, params, n_source: int, n_target: int, repeats: int) -> dict:
    from tasks.evaluate import confusion_counts, metrics_from_confusion
    from tasks.strategy import macro_f1_evidence

    source_frame, target_frame = domains(name, params.ingest)
    seen: set[str] = set()
    source, target = rows_of(source_frame, n_source, seen), rows_of(target_frame, n_target, seen)
    labels = sorted(set(target["label"]))
    source = source[source["label"].isin(labels)]
    texts = source["text"].tolist() + target["text"].tolist()
    y = np.array([labels.index(label) for label in [*source["label"], *target["label"]]])
    started = time.process_time()
    features = frozen_features(params.model.base, texts, params.model.max_length)
    embed_cpu = time.process_time() - started
    y_target = y[len(source):]
    scores: dict[str, list[float]] = {model: [] for model in MODELS}
    first: dict[str, np.ndarray] = {}
    for seed in range(repeats):
        proba = cross_fitted(texts, y, features, len(source), len(labels), seed)
        if seed == 0:
            first = proba
        for model, p in proba.items():
            confusion = confusion_counts(y_target, p.argmax(axis=1), len(labels))
            scores[model].append(float(metrics_from_confusion(confusion)["macro_f1"]))

    def difference(model: str, reference: str) -> dict:
        evidence = macro_f1_evidence(y_target, {m: first[m].argmax(axis=1) for m in (model, reference)}, len(labels),
                                     reference)[model][f"minus_{reference}"]
        return {"estimate": round(float(np.mean(scores[model]) - np.mean(scores[reference])), 4),
                "estimate_first_repeat": round(evidence["estimate"], 4),
                "interval_first_repeat": [round(v, 4) for v in evidence["interval"]]}

    return {"dataset": name, "source_rows": len(source), "target_rows": len(target), "labels": labels,
            "folds": fold_count(y_target, len(labels)), "repeats": repeats,
            "macro_f1": {model: round(float(np.mean(v)), 4) for model, v in scores.items()},
            "layer_mean_minus_last": difference("layer_mean", "last"),
            "pool_layer_mean_minus_tfidf": difference("pool_layer_mean", "tfidf"),
            "pool_last_minus_tfidf": difference("pool_last", "tfidf"),
            "embed_cpu_seconds_with_loading": round(embed_cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=transfer.DATASETS)
    parser.add_argument("--source", type=int, default=400, help="source rows per dataset (at most)")
    parser.add_argument("--target", type=int, default=500, help="target rows per dataset (at most)")
    parser.add_argument("--repeats", type=int, default=3, help="cross-fittings with different folds")
    args = parser.parse_args()
    from tasks.config import load_params

    params = load_params(transfer.ROOT / "params.yaml")
    results = []
    for name in args.datasets:
        result = measure(name, params, args.source, args.target, args.repeats)
        results.append(result)
        print(f"{name:17s} {result['target_rows']:4d} target rows  " + "  ".join(
            f"{model} {score:.3f}" for model, score in result["macro_f1"].items()), flush=True)

    def count(key: str, clearly: bool) -> int:
        return sum((r[key]["interval_first_repeat"][0] > 0) if clearly else (r[key]["estimate"] > 0) for r in results)

    from tasks.devices import machine_summary

    print(json.dumps({"machine": {**machine_summary(), "precision": "fp32"}, "base": params.model.base,
                      "results": results, "layer_mean_beats_last": count("layer_mean_minus_last", False),
                      "layer_mean_clearly_beats_last": count("layer_mean_minus_last", True),
                      "pool_layer_mean_beats_tfidf": count("pool_layer_mean_minus_tfidf", False),
                      "pool_layer_mean_clearly_beats_tfidf": count("pool_layer_mean_minus_tfidf", True),
                      "pool_last_beats_tfidf": count("pool_last_minus_tfidf", False),
                      "pool_last_clearly_beats_tfidf": count("pool_last_minus_tfidf", True), "datasets": len(results)}))


if __name__ == "__main__":
    main()
