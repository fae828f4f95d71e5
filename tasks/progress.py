"""Training progress as data: a stage appends one JSON object per progress point to a JSON-lines file, and
whoever runs the stage (the flow) reads the records back instead of parsing the printed progress line.

The flow names the file through PROGRESS_FILE_ENV in the stage's environment; without it nothing is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

PROGRESS_FILE_ENV = "REGRAFT_PROGRESS_FILE"


def progress_file() -> Path | None:
    """The file this process appends its progress records to, or None when nobody asked for them."""
    value = os.environ.get(PROGRESS_FILE_ENV)
    return Path(value) if value else None


def append_progress(path: Path, record: dict) -> None:
    """Append `record` as one line. One write of the whole line in append mode: a reader that polls meanwhile
    sees the record whole or not yet ended, never mixed with another."""
    # A diverged loss or an unknown ETA (nan) is written as null: the file stays standard JSON.
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    line = json.dumps(finite) + "\n"
    with open(path, "a", encoding="utf-8") as out:
        out.write(line)
        out.flush()


def read_progress(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The records from byte `offset` on, and the offset to read from next. A last line without its newline is
    still being written: it is left for the next read. A missing file holds no records yet."""
    try:
        with open(path, "rb") as source:
            source.seek(offset)
            data = source.read()
    except FileNotFoundError:
        return [], offset
    complete = data.rfind(b"\n") + 1
    records = []
    for line in data[:complete].splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # progress is a side channel: a damaged line is skipped, not a reason to stop
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + complete
