"""The commands on data files: `regraft validate` (the validation suite), `regraft shift` (shift between two files),
`regraft feedback` (labels for served texts, beside shift-watch's estimate) and `regraft shadow` (the shadow
candidate against production on the prediction logs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.errors import EXIT_OK
from tasks.render import interval_text


def command_validate(args: argparse.Namespace, project: Path) -> int:
    from tasks.config import load_params
    from tasks.render import print_validation_outcome
    from tasks.validate import validate_file

    report = validate_file(load_params(project / "params.yaml"), Path(args.path).resolve(), args.columns)
    columns = report.columns
    print(f"columns from {columns['from']}: text={columns['text']!r}, label={columns['label']!r}, "
          f"groups={columns['groups']}", flush=True)
    return print_validation_outcome(report)


def command_shift(args: argparse.Namespace, project: Path) -> int:
    import json

    from tasks.config import load_params
    from tasks.errors import DataError
    from tasks.ingest import read_with_columns
    from tasks.render import shift_markdown
    from tasks.reports import ShiftAnalysis, parse_report
    from tasks.shift import analyse_shift, without_bulk

    params = load_params(project / "params.yaml")
    frames = []
    for raw in (args.source, args.target):
        path = Path(raw).resolve()
        frame, columns, _ = read_with_columns(path, params.ingest.columns, args.columns, params.ingest.time_format)
        if "text" not in frame or frame.empty:
            raise DataError(f"{path}: no rows with a {columns.text!r} column to compare")
        frames.append(frame)
    report = without_bulk(analyse_shift(frames[0], frames[1], params))
    print(json.dumps(report, indent=2) if args.json
          else shift_markdown(parse_report(ShiftAnalysis, report, "the shift analysis")))
    return EXIT_OK


def read_feedback(raw: str, columns: str | None, params):
    """A labelled file of served texts (`regraft feedback`, `regraft shadow --feedback`): its rows and its path."""
    from tasks.errors import DataError
    from tasks.ingest import read_with_columns

    path = Path(raw).resolve()
    frame, names, _ = read_with_columns(path, params.ingest.columns, columns, params.ingest.time_format)
    if frame.empty or "label" not in frame:
        raise DataError(f"{path}: no rows with a {names.text!r} and a {names.label!r} column")
    return frame, path


def command_feedback(args: argparse.Namespace, project: Path) -> int:
    from tasks.config import load_params
    from tasks.monitoring import record_feedback

    params = load_params(project / "params.yaml")
    frame, path = read_feedback(args.path, args.columns, params)
    for row in record_feedback(params, frame, str(path)):
        estimated, realized = row["estimated"]["accuracy"], row["realized"]["accuracy"]
        low, high = estimated["interval"]
        print(f"estimate {row['estimate_id'][:8]}: accuracy estimated {estimated['estimate']:.3f} "
              f"{interval_text(estimated['interval'])}, realized {realized:.3f} on {row['labelled_rows']} labelled served texts "
              f"(error {row['error']['accuracy']:+.3f}; {'inside' if low <= realized <= high else 'outside'} the interval)")
    print(f"recorded in {params.paths.performance_history}")
    return EXIT_OK


def command_shadow(args: argparse.Namespace, project: Path) -> int:
    """The shadow candidate against production on the traffic both predicted; exit 1 when it is shown worse."""
    import json

    from tasks.config import load_params
    from tasks.errors import EXIT_CHECK_FAILED
    from tasks.render import shadow_markdown
    from tasks.shadow import WORSE, shadow_report

    params = load_params(project / "params.yaml")
    feedback, path = read_feedback(args.feedback, args.columns, params) if args.feedback else (None, None)
    report = shadow_report(params, feedback, str(path or ""))
    print(json.dumps(report.model_dump(), indent=2) if args.json else shadow_markdown(report))
    return EXIT_CHECK_FAILED if report.verdict == WORSE else EXIT_OK


def command_canary(args: argparse.Namespace, project: Path) -> int:
    """One judged window of the running canary; exit 1 when it was shown worse and rolled back."""
    import json

    from tasks.config import load_params
    from tasks.errors import EXIT_CHECK_FAILED
    from tasks.promotion import ROLLED_BACK, judge_canary_window
    from tasks.render import canary_judgement_text, shadow_markdown

    params = load_params(project / "params.yaml")
    feedback, path = read_feedback(args.feedback, args.columns, params) if args.feedback else (None, None)
    judged = judge_canary_window(params, feedback, str(path or ""))
    print(json.dumps({**judged.report.model_dump(), "outcome": judged.outcome}, indent=2) if args.json
          else shadow_markdown(judged.report))
    print(canary_judgement_text(judged.window, judged.change), file=sys.stderr if args.json else sys.stdout)
    return EXIT_CHECK_FAILED if judged.outcome == ROLLED_BACK else EXIT_OK
