"""DVC stage `ingest`: raw data -> four normalised Parquet splits and reports/ingest.json."""

from __future__ import annotations

from pipelines.stage_io import report_path, run_stage, write_parquet
from tasks.config import Params
from tasks.ingest import ingest
from tasks.reports import IngestReport, write_report


def main(params: Params) -> int:
    result = ingest(params.ingest)
    for name, frame in result.splits.items():
        write_parquet(getattr(params.paths.splits, name), frame)
    report = IngestReport.model_validate(result.report)
    write_report(report_path(params, "ingest"), report)
    for name, split in report.splits.items():
        mix = ", ".join(f"{k} {v}" for k, v in split.labels.items())
        print(f"ingest: {name:15s} {split.rows:6d} rows  ({mix})")
    return 0


if __name__ == "__main__":
    run_stage(main)
