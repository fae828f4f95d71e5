"""Training progress as data: a stage appends one JSON object per progress point to a JSON-lines file, and
whoever runs the stage (the flow) reads the records back instead of parsing the printed progress line.

The flow names the file through PROGRESS_FILE_ENV in the stage's environment; without it nothing is written.
`Progress` is the training loop's side: its bar or printed lines, and the records at each progress point.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
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


class Progress:
    """Throughput and ETA: a tqdm bar on a terminal, plain lines otherwise (they reach Prefect's log), and at
    each progress point a record in the progress file when the flow names one."""

    def __init__(self, total: int, every: int, enabled: bool, done: int = 0):
        self.total, self.every, self.enabled = total, every, enabled
        self.started = time.perf_counter()
        self.start_step = done
        self.bar = None
        self.records = progress_file() if enabled else None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="step", desc="finetune", dynamic_ncols=True)

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_second']:.1f}")
        if step % self.every != 0 and step != self.total:
            return
        rate = (step - self.start_step) / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        if self.records is not None:
            self.record({"step": step, "total": self.total, "epoch": row["epoch"], "loss": row["loss"],
                         "learning_rate": row["learning_rate"], "samples_per_second": row["samples_per_second"],
                         "eta_seconds": eta})
        if self.bar is None:
            print(f"finetune: step {step}/{self.total} epoch {row['epoch']} loss {row['loss']:.4f} "
                  f"lr {row['learning_rate']:.2e} {row['samples_per_second']:.1f} samples/s "
                  f"ETA {eta:.0f}s", flush=True)

    def record(self, record: dict) -> None:
        try:
            append_progress(self.records, record)
        except OSError as exc:
            # The records are for watching the run: losing them must not cost the training.
            print(f"finetune: no more progress records ({exc})", flush=True)
            self.records = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
