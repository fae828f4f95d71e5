"""What every stage runner shares: reading params, writing outputs atomically, exiting cleanly."""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tasks.config import Params, load_params
from tasks.errors import EXIT_INTERNAL, RegraftError
from tasks.files import write_atomically, write_json  # noqa: F401  (runners write through these)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    write_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_splits(params: Params) -> dict[str, pd.DataFrame]:
    splits = {}
    for name, path in params.paths.splits.model_dump().items():
        if not Path(path).is_file():
            raise RegraftError(f"{path}: split {name!r} not found; run the ingest stage first")
        splits[name] = pd.read_parquet(path)
    return splits


def report_path(params: Params, stage: str) -> Path:
    return params.report_file(stage)


def run_stage(main: Callable[[Params], int]) -> None:
    """Entry point of a stage runner: load params.yaml and run. The exit code tells the flow what happened:
    1 a check said no, 2 bad input or configuration (the message, no traceback), 70 a crash (with traceback) or
    a full disk (the message)."""
    try:
        code = main(load_params())
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            traceback.print_exc()
        else:  # the machine's, not a bug: one line, and writes are atomic so nothing half-written was kept
            print(f"error: the disk is full ({exc.strerror}{f': {exc.filename}' if exc.filename else ''}); "
                  "this stage kept nothing it had half written; free space and run again", file=sys.stderr)
        code = EXIT_INTERNAL
    except Exception:  # a bug: keep the traceback, and say so by the exit code
        traceback.print_exc()
        code = EXIT_INTERNAL
    sys.exit(code)
