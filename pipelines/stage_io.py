"""What every stage runner shares: reading params, writing outputs atomically, exiting cleanly."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tasks.config import Params, load_params
from tasks.errors import RegraftError


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file,
    and a failed write leaves the previous file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    write_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_splits(params: Params) -> dict[str, pd.DataFrame]:
    splits = {}
    for name, path in params.paths.splits.model_dump().items():
        if not Path(path).is_file():
            raise RegraftError(f"{path}: split {name!r} not found; run the ingest stage first")
        splits[name] = pd.read_parquet(path)
    return splits


def save_figure(fig, path: Path) -> str:
    """Save a matplotlib figure as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def report_path(params: Params, stage: str) -> Path:
    return params.paths.reports / f"{stage}.json"


def run_stage(main: Callable[[Params], int]) -> None:
    """Entry point of a stage runner: load params.yaml, run, turn known errors into a message and exit 1."""
    try:
        code = main(load_params())
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)
