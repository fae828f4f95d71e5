"""One self-contained HTML page per run: every stage's report, the shift plots, the training curves,
the per-group charts and the verdict, images embedded, so it can be mailed or attached as it is."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from tasks.figures import performance_history_plot, training_curves

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.9em}
th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}section{border-top:2px solid #ddd;margin-top:2em}"""


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


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
