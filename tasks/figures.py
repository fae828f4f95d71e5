"""Every figure a person sees: the shift stage's and the evaluation's PNGs (reports/shift, reports/evaluate, embedded in
the HTML report) and shift-watch's history of estimates. Matplotlib (Agg backend) is imported only when one is drawn."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tasks.reports import EvaluateReport, GroupMetrics


def save_figure(fig, path: Path) -> str:
    """Save a matplotlib figure as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def shift_figures(report: dict, folder: Path) -> list[str]:
    """The shift stage's three PNGs (from tasks/shift.py `analyse_shift`, its per-row arrays included): embedding
    projection, domain-classifier scores, class priors."""
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





def evaluate_figures(report: EvaluateReport, folder: Path) -> list[str]:
    """Per-group bars with interval whiskers (candidate vs champion and baselines), confusion matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    split = report.splits["target_holdout"]
    models = list(split.models)
    for column in split.group_columns:
        for metric in ("accuracy", "macro_f1"):
            groups = list(split.models["candidate"].groups[column].groups)
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(models) / 2), 4))
            width = 0.8 / len(models)
            for j, model in enumerate(models):
                entries = split.models[model].groups[column].groups
                values = np.array([np.nan if entries[g].metric(metric) is None else entries[g].metric(metric)
                                   for g in groups])
                low = np.array([_bound(entries[g], metric, 0, values[i]) for i, g in enumerate(groups)])
                high = np.array([_bound(entries[g], metric, 1, values[i]) for i, g in enumerate(groups)])
                x = np.arange(len(groups)) + (j - (len(models) - 1) / 2) * width
                ax.bar(x, values, width=width, label=model,
                       yerr=[np.clip(values - low, 0, None), np.clip(high - values, 0, None)], capsize=2)
            sizes = split.group_columns[column].sizes
            ax.set_xticks(np.arange(len(groups)), [f"{g}\n(n={sizes.get(g, 0)})" for g in groups], fontsize=8)
            ax.set(title=f"target_holdout: {metric} by {column} ({report.confidence:.0%} intervals)",
                   ylabel=metric, ylim=(0, 1.05))
            ax.legend(fontsize=8)
            written.append(save_figure(fig, folder / f"groups_{_slug(column)}_{metric}.png"))
    for split_name, entry in report.splits.items():
        fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models), 3.4))
        for ax, model in zip(np.atleast_1d(axes), models):
            matrix = np.asarray(entry.models[model].overall.confusion)
            ax.imshow(matrix, cmap="Blues")
            for (r, c), v in np.ndenumerate(matrix):
                ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
            ticks = np.arange(len(report.labels))
            ax.set_xticks(ticks, report.labels, fontsize=7)
            ax.set_yticks(ticks, report.labels, fontsize=7)
            ax.set(title=model, xlabel="predicted", ylabel="true")
        fig.suptitle(f"Confusion matrices, {split_name}")
        written.append(save_figure(fig, folder / f"confusion_{split_name}.png"))
    return written


def _bound(entry: GroupMetrics, metric: str, side: int, value: float) -> float:
    """One end of the interval the gate uses (GroupMetrics.judged_interval); the value itself where it is unknown."""
    interval = entry.judged_interval(metric)
    return value if interval[side] is None else interval[side]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def training_curves(log: Path) -> bytes | None:
    """Loss and learning rate against the optimiser step, from the finetune stage's log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    if not log.is_file():
        return None
    frame = pd.read_csv(log)
    if frame.empty or "step" not in frame:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(frame["step"], frame["loss"])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(frame["step"], frame["learning_rate"])
    axes[1].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def performance_history_plot(history: list[dict]) -> bytes | None:
    """shift-watch's estimated accuracy of the production model over time (interval bars), the realized accuracy
    where labels arrived (`regraft feedback`), and the validated accuracy each estimate started from."""
    estimates = [row for row in history if row.get("kind") == "estimate"]
    if not estimates:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    realized = {row["estimate_id"]: row["realized"]["accuracy"] for row in history if row.get("kind") == "realized"}
    when = pd.to_datetime([row["time"] for row in estimates], utc=True)
    value = [row["estimated"]["accuracy"]["estimate"] for row in estimates]
    low = [v - (row["estimated"]["accuracy"]["interval"][0] or v) for v, row in zip(value, estimates)]
    high = [(row["estimated"]["accuracy"]["interval"][1] or v) - v for v, row in zip(value, estimates)]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.errorbar(when, value, yerr=[low, high], fmt="o", capsize=3, label="estimated (interval)")
    ax.plot(when, [row["validated"]["accuracy"] for row in estimates], "_", markersize=14, color="grey",
            label="validated on holdout")
    labelled = [(t, realized[row["id"]]) for t, row in zip(when, estimates) if row["id"] in realized]
    if labelled:
        ax.plot(*zip(*labelled), "x", markersize=9, color="tab:red", label="realized (labels arrived)")
    ax.set(title="Production model accuracy on serving traffic", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
