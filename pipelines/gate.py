"""DVC stage `gate`: evaluation + shift reports -> the verdict (paths.verdict), written on every run and
never changed afterwards; exit 1 on FAIL. What becomes of an INCONCLUSIVE verdict is the `decide` stage's."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from pipelines.stage_io import report_path, run_stage
from tasks.config import Params
from tasks.errors import ReportError
from tasks.gate import FAIL, Evidence, judge
from tasks.render import interval_text, verdict_markdown
from tasks.reports import EvaluateReport, ShiftReport, Verdict, read_report, write_report


def read_evidence(params: Params) -> Evidence:
    """Read what the gate judges; every missing, unreadable or malformed evaluation file is named, never skipped."""
    problems: list[str] = []
    try:
        evaluation = read_report(report_path(params, "evaluate"), EvaluateReport)
    except ReportError as exc:
        evaluation = None
        problems.append(str(exc))
    # The shift report's absence is its own criterion; only evaluation files make the whole verdict void.
    shift = read_shift(report_path(params, "shift"))
    bootstrap = None
    if evaluation is not None:
        try:
            bootstrap = pd.read_parquet(params.paths.bootstrap)
        except (OSError, ValueError) as exc:
            problems.append(f"{params.paths.bootstrap}: bootstrap resamples unreadable ({exc})")
    return Evidence(evaluation=evaluation, bootstrap=bootstrap, shift=shift, problems=problems)


def read_shift(path: Path) -> ShiftReport | None:
    """The shift report, or None when it is missing, unreadable or malformed (the shift criterion then fails)."""
    try:
        return read_report(path, ShiftReport)
    except ReportError:
        return None


def main(params: Params) -> int:
    verdict = judge(read_evidence(params), params.gate, params.evaluate.small_n)
    write_report(params.paths.verdict, verdict)
    print(verdict_markdown(verdict))
    if verdict.verdict == FAIL:
        print("error: gate FAIL:\n  " + "\n  ".join(failure_lines(verdict)), file=sys.stderr)
        return 1
    return 0


def failure_lines(verdict: Verdict) -> list[str]:
    return [f"{c.name}: {c.detail or 'value ' + str(c.value)}" + (
        f" (value {c.value:.3f}, interval {interval_text(c.interval)}, needs "
        f"{c.direction} {c.threshold:.3f})" if c.value is not None and c.interval[0] is not None else "")
        for c in verdict.criteria if c.status == FAIL]


if __name__ == "__main__":
    run_stage(main)
