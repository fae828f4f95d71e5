"""DVC stage `validate`: the Great Expectations suite on every split -> reports/validate.json + Data Docs."""

from __future__ import annotations

from pipelines.stage_io import read_splits, report_path, run_stage
from tasks.config import Params
from tasks.errors import EXIT_BAD_INPUT
from tasks.render import print_validation_outcome
from tasks.reports import write_report
from tasks.validate import validate_splits


def main(params: Params) -> int:
    report = validate_splits(
        read_splits(params), params.validate_, params.ingest.columns, params.ingest.labels,
        gx_dir=params.paths.state / "gx", docs_dir=params.paths.data_docs,
    )
    write_report(report_path(params, "validate"), report)
    # Data that breaks the suite is bad input: the run stops before training (exit 2).
    return EXIT_BAD_INPUT if print_validation_outcome(report) else 0


if __name__ == "__main__":
    run_stage(main)
