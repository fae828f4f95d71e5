"""DVC stage `validate`: the Great Expectations suite on every split -> reports/validate.json + Data Docs."""

from __future__ import annotations

import sys
from pathlib import Path

from pipelines.stage_io import read_splits, report_path, run_stage, write_json
from tasks.config import Params
from tasks.ingest import normalise, read_table
from tasks.validate import SplitRules, render_markdown, validate_splits


def main(params: Params) -> int:
    report = validate_splits(
        read_splits(params), params.validate_, params.ingest.columns, params.ingest.labels,
        gx_dir=params.paths.state / "gx", docs_dir=params.paths.data_docs,
    )
    write_json(report_path(params, "validate"), report)
    return print_outcome(report)


def validate_file(params: Params, path: Path) -> dict:
    """`regraft validate PATH`: the same suite on one file, read with the configured column mapping.
    It is checked as a train split (no holdout, so no leakage check)."""
    frame = normalise(read_table(path), params.ingest.columns, path.name, params.ingest.time_format)
    name = path.stem.replace(".", "_") or "file"
    return validate_splits(
        {name: frame}, params.validate_, params.ingest.columns, params.ingest.labels,
        gx_dir=params.paths.state / "gx-file", docs_dir=params.paths.state / "data_docs_file",
        rules=[SplitRules(name, params.validate_.rows.train_min)],
    )


def print_outcome(report: dict) -> int:
    """Print the outcome in plain words; failures go to stderr and make the exit code 1."""
    if report["success"]:
        print(render_markdown(report))
        return 0
    print("validation failed:", file=sys.stderr)
    for message in report["failures"]:
        print(f"  - {message}", file=sys.stderr)
    print(f"details: {report['data_docs']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    run_stage(main)
