"""One self-contained HTML page per run: every stage's report, the shift plots, the training curves,
the per-group charts and the verdict, images embedded, so it can be mailed or attached as it is."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.9em}
th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}section{border-top:2px solid #ddd;margin-top:2em}"""


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


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


def html_report(sections: list[tuple[str, dict]], figures: dict[str, list[Path]], title: str, train_log: Path,
                performance_history: list[dict] | None = None) -> str:
    """The run's reports (name and content, in run order) as one HTML page, each with its figures, and the
    production model's estimated and realized performance over time."""
    from markdown_it import MarkdownIt

    from tasks.render import render_report

    # Reports carry values from the data (group names, texts) and people's free text (a reviewer's reason):
    # raw HTML in them is shown as text, never rendered.
    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for name, report in sections:
        parts.append(f"<section id='{html.escape(name)}'>" + markdown.render(render_report(name, report)))
        if name == "finetune":
            curves = training_curves(train_log)
            if curves:
                parts.append(f"<img alt='training curves' src='{png_data_uri(curves)}'>")
        for image in figures.get(name, []):
            parts.append(f"<img alt='{html.escape(image.stem)}' src='{png_data_uri(image.read_bytes())}'>")
        parts.append("</section>")
    history_plot = performance_history_plot(performance_history or [])
    if history_plot:
        parts.append("<section id='production-performance'><h1>Production model on serving traffic</h1>"
                     "<p>shift-watch's estimates before labels, and the realized accuracy once they arrived.</p>"
                     f"<img alt='estimated and realized performance' src='{png_data_uri(history_plot)}'></section>")
    parts.append("</body></html>")
    return "\n".join(parts)
