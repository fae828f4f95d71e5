"""DVC stage `shift`: source vs target -> reports/shift.json, PNG plots, source importance weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.stage_io import read_splits, report_path, run_stage, save_figure, write_parquet
from tasks.config import Params
from tasks.render import shift_markdown
from tasks.reports import ShiftReport, write_report
from tasks.shift import analyse_shift


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
    report = analyse_shift(source, target, params)
    report["plots"] = save_plots(report, params.paths.shift_plots)
    weights = pd.DataFrame({"id": report.pop("source_ids") or [], "weight": report.pop("source_importance_weights")})
    write_parquet(params.paths.shift_weights, weights)
    report.pop("embeddings_2d")
    shift = ShiftReport.model_validate({**report, "stage": "shift", "on_severe": params.shift.on_severe})
    write_report(report_path(params, "shift"), shift)
    print(shift_markdown(shift))
    if shift.verdict == "severe" and shift.on_severe == "block":
        print("error: severe domain shift and shift.on_severe=block, so training does not start:\n  "
              + "\n  ".join(shift.reasons), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_stage(main)
