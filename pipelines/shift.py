"""DVC stage `shift`: source vs target -> reports/shift.json, PNG plots, source importance weights.

Also `regraft shift SOURCE TARGET` on two files (labels optional).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.stage_io import read_splits, report_path, run_stage, save_figure, write_json, write_parquet
from tasks.config import Params
from tasks.models import load_classifier, load_tokenizer, mean_pooled_embeddings, predict_proba
from tasks.shift import build_sample, detect_shift, render_markdown, source_classifier_probabilities


def cap_rows(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    return frame if len(frame) <= limit else frame.sample(n=limit, random_state=seed).reset_index(drop=True)


def analyse(source: pd.DataFrame, target: pd.DataFrame, params: Params) -> dict:
    """Embed both domains with the base encoder (cached), build the per-row inputs, run every test."""
    cfg, labels = params.shift, params.ingest.labels
    source = cap_rows(source.reset_index(drop=True), cfg.max_rows, cfg.seed)
    target = cap_rows(target.reset_index(drop=True), cfg.max_rows, cfg.seed)
    base, max_length = params.model.base, params.model.max_length
    cache = params.paths.cache / "embeddings"
    tokenizer = load_tokenizer(base)
    source_emb = mean_pooled_embeddings(base, source["text"].astype("str").tolist(), max_length, cache)
    target_emb = mean_pooled_embeddings(base, target["text"].astype("str").tolist(), max_length, cache)
    groups = params.ingest.columns.groups
    source_sample = build_sample(source, source_emb, tokenizer, groups, labels)
    target_sample = build_sample(target, target_emb, tokenizer, groups, labels)
    if source_sample.labels is not None:
        target_sample.class_probs = source_classifier_probabilities(source_emb, source_sample.labels, target_emb)
    champion = params.paths.champion
    if (champion / "config.json").is_file():
        # Black-box shift detection on the production model's outputs.
        model, champion_tokenizer = load_classifier(champion, labels), load_tokenizer(champion)
        source_sample.probs = predict_proba(model, champion_tokenizer, source["text"].tolist(), max_length).numpy()
        target_sample.probs = predict_proba(model, champion_tokenizer, target["text"].tolist(), max_length).numpy()
    report = detect_shift(source_sample, target_sample, cfg, labels,
                          source["text"].astype("str").tolist(), target["text"].astype("str").tolist())
    report["source_ids"] = source["id"].astype("str").tolist() if "id" in source else None
    report["embeddings_2d"] = project_2d(source_emb.numpy(), target_emb.numpy())
    return report


def project_2d(source: np.ndarray, target: np.ndarray, limit: int = 2000) -> dict:
    """PCA of the pooled embeddings to two dimensions, for the scatter plot."""
    pooled = np.vstack([source[:limit], target[:limit]])
    centred = pooled - pooled.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T
    return {"source": points[: min(limit, len(source))].tolist(), "target": points[min(limit, len(source)):].tolist()}


def save_plots(report: dict, folder: Path) -> list[str]:
    """Three PNGs: embedding projection, domain-classifier scores, class priors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, colour in (("source", "tab:blue"), ("target", "tab:orange")):
        pts = np.asarray(report["embeddings_2d"][name])
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.5, c=colour, label=f"{name} (n={report[f'n_{name}']})")
    ax.set(title="Sentence embeddings, first two principal components", xlabel="PC 1", ylabel="PC 2")
    ax.legend()
    written.append(save_figure(fig, folder / "embeddings_pca.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 31)
    ax.hist(report["domain_scores"]["source"], bins=bins, alpha=0.6, label="source rows")
    ax.hist(report["domain_scores"]["target"], bins=bins, alpha=0.6, label="target rows")
    auc = next(t["statistic"] for t in report["tests"] if t["name"] == "classifier")
    ax.set(title=f"Domain classifier: P(target), out of fold (AUC {auc:.3f})", xlabel="P(target)", ylabel="rows")
    ax.legend()
    written.append(save_figure(fig, folder / "classifier_scores.png"))

    label = next((t for t in report["tests"] if t["name"] == "label_shift"), None)
    if label:
        d = label["detail"]
        x = np.arange(len(d["labels"]))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(x - 0.27, d["source_prior"], width=0.27, label="source")
        if d.get("labelled_target_prior"):
            ax.bar(x, d["labelled_target_prior"], width=0.27, label="target (labelled)")
        if "estimated_target_prior" in d:
            est = np.asarray(d["estimated_target_prior"])
            low, high = np.asarray(d["estimated_interval_95"])
            ax.bar(x + 0.27, est, width=0.27, yerr=[est - low, high - est], capsize=3, label="target (estimated, EM)")
        ax.set_xticks(x, d["labels"])
        ax.set(title="Class priors", ylabel="share of rows")
        ax.legend()
        written.append(save_figure(fig, folder / "class_priors.png"))
    return written



def main(params: Params) -> int:
    splits = read_splits(params)
    source = pd.concat([splits["source_train"], splits["source_holdout"]], ignore_index=True)
    target = pd.concat([splits["target_train"], splits["target_holdout"]], ignore_index=True)
    report = analyse(source, target, params)
    report["plots"] = save_plots(report, params.paths.shift_plots)
    weights = pd.DataFrame({"id": report.pop("source_ids") or [], "weight": report.pop("source_importance_weights")})
    write_parquet(params.paths.shift_weights, weights)
    report.pop("embeddings_2d")
    report["stage"] = "shift"
    report["on_severe"] = params.shift.on_severe
    write_json(report_path(params, "shift"), report)
    print(render_markdown(report))
    if report["verdict"] == "severe" and params.shift.on_severe == "block":
        print("error: severe domain shift and shift.on_severe=block, so training does not start:\n  "
              + "\n  ".join(report["reasons"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_stage(main)
