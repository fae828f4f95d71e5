"""DVC stage `shift`: source vs target -> reports/shift.json, PNG plots, source importance weights."""

from __future__ import annotations

import sys

import pandas as pd

from pipelines.stage_io import read_splits, report_path, run_stage, write_parquet
from tasks.config import Params
from tasks.figures import shift_figures
from tasks.render import shift_markdown
from tasks.reports import ShiftReport, write_report
from tasks.shift import analyse_shift


def main(params: Params) -> int:
    splits = read_splits(params)
    source = pd.concat([splits["source_train"], splits["source_holdout"]], ignore_index=True)
    target = pd.concat([splits["target_train"], splits["target_holdout"]], ignore_index=True)
    report = analyse_shift(source, target, params)
    report["plots"] = shift_figures(report, params.paths.shift_plots)
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
