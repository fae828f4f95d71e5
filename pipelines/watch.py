"""Shift between serving traffic and the production model's training data (the `shift-watch` flow)."""

from __future__ import annotations

from pathlib import Path

from pipelines.shift import analyse
from pipelines.stage_io import report_path, write_json
from tasks.config import Params
from tasks.monitoring import read_prediction_log, training_data
from tasks.registry import read_record
from tasks.serving import production_tag

BULKY = ("embeddings_2d", "domain_scores", "source_importance_weights", "source_ids")


def watch(params: Params, max_rows: int) -> dict:
    """Run the shift tests on (production training data, recent served texts); write reports/shift-watch.json."""
    tag = production_tag(params.paths.registry)
    entry = read_record(params.paths.registry)["models"][tag]
    splits = params.paths.splits.model_dump()
    source = training_data(entry, splits, Path(".dvc") / "cache")
    target = read_prediction_log(params.serve.prediction_log, max_rows)
    report = analyse(source, target, params)
    for key in BULKY:
        report.pop(key, None)
    report.update({"stage": "shift-watch", "production_model": tag, "served_rows": len(target),
                   "log": str(params.serve.prediction_log)})
    write_json(report_path(params, "shift-watch"), report)
    return report
