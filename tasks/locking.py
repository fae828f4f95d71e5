"""One writer at a time per project, and DVC's own lock file checked for entries left by killed runs.

Runs of `retrain`, `promote` and `rollback` change the same DVC state (dvc.lock, the cache, data/,
models/), so they take an exclusive lock on `<paths.state>/run.lock` for their whole duration. The
lock is an flock: the kernel drops it when its process dies, so it can never go stale. A second run
waits for the first (its log says for whom) and fails with a clear error after a timeout.

DVC keeps per-path reader/writer records in `.dvc/tmp/rwlock` with the PID and command of each
holder. A record can outlive its process (a killed `dvc repro`), and after a restart its PID may
belong to an unrelated process; DVC then reports the path "busy" forever. `stale_dvc_locks` finds such
records, `clear_stale_dvc_locks` removes them and says why.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from tasks.config import DVC_DIR
from tasks.errors import EXIT_BUSY, RegraftError

LOCK_NAME = "run.lock"
RWLOCK = DVC_DIR / "tmp" / "rwlock"


class ProjectBusy(RegraftError):
    """Another run held the project for longer than this run was willing to wait."""

    exit_code = EXIT_BUSY


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"{holder.get('what', 'a run')} (PID {holder.get('pid', '?')}, since {holder.get('since', '?')})"


def current_holder(state_dir: Path) -> str | None:
    """Who holds the project's run lock at this moment (described), or None when nobody does."""
    path = state_dir / LOCK_NAME
    if not path.is_file():
        return None
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe_holder(read_holder(path))
    return None


@contextmanager
def project_lock(state_dir: Path, what: str, timeout_seconds: float,
                 on_wait: Callable[[str], None] = print, poll_seconds: float = 1.0) -> Iterator[None]:
    """Hold the project's run lock; wait up to `timeout_seconds` for a run that holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    # os.open descriptors are not inherited by subprocesses, so a stage never keeps the lock alive.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            on_wait(f"waiting for {describe_holder(holder)} to finish: one run at a time may change this project "
                    f"(lock {path}, up to {timeout_seconds:g} s)")
            deadline = time.monotonic() + timeout_seconds
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ProjectBusy(
                            f"{path}: {describe_holder(read_holder(path))} still holds the project after "
                            f"{timeout_seconds:g} s; try again when it has finished "
                            "(schedule.lock_timeout_seconds sets how long a run waits)") from None
                    time.sleep(poll_seconds)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"what": what, "pid": os.getpid(),
                                  "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}).encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DvcLockEntry:
    mode: str  # "read" or "write"
    path: str
    pid: int
    cmd: str


def dvc_lock_entries(rwlock: dict) -> list[DvcLockEntry]:
    entries = [DvcLockEntry("write", path, int(info["pid"]), info["cmd"])
               for path, info in rwlock.get("write", {}).items()]
    entries += [DvcLockEntry("read", path, int(info["pid"]), info["cmd"])
                for path, infos in rwlock.get("read", {}).items() for info in infos]
    return entries


# psutil derives start times from the boot time in /proc/stat, which is whole seconds: a start time may read up
# to a second early. Another second covers file-system timestamp granularity.
CLOCK_SLACK_SECONDS = 2


def why_stale(entry: DvcLockEntry, written_at: float) -> str | None:
    """Why a record's holder cannot be the process that wrote it, or None when it may still be running."""
    try:
        process = psutil.Process(entry.pid)
        started = process.create_time()
        name = process.name()
    except psutil.NoSuchProcess:
        return f"process {entry.pid} no longer exists (killed before DVC could release its lock)"
    # A process that started after the lock file was last written cannot have written this record.
    if started > written_at + CLOCK_SLACK_SECONDS:
        return (f"PID {entry.pid} now belongs to another process ({name!r}, started "
                f"{dt.datetime.fromtimestamp(started, dt.UTC):%Y-%m-%d %H:%M:%S} UTC, after the record was written)")
    return None


def stale_dvc_locks(project_dir: Path) -> tuple[list[str], list[str]]:
    """(stale, live) explanations for the records in .dvc/tmp/rwlock."""
    path = project_dir / RWLOCK
    if not path.is_file():
        return [], []
    try:
        rwlock = json.loads(path.read_text(encoding="utf-8") or "{}")
    except ValueError:
        return [f"{path} is not valid JSON (a run was killed while writing it)"], []
    stale, live = [], []
    written_at = path.stat().st_mtime
    for entry in dvc_lock_entries(rwlock):
        reason = why_stale(entry, written_at)
        text = f"{entry.mode} lock on {entry.path!r} held by `{entry.cmd}` (PID {entry.pid})"
        (stale if reason else live).append(f"{text}: {reason}" if reason else text)
    return stale, live


def clear_stale_dvc_locks(project_dir: Path) -> list[str]:
    """Remove records of dead holders from .dvc/tmp/rwlock; return one explanation per removed record.
    Call it only while holding the project lock, so no regraft run is using DVC meanwhile."""
    path = project_dir / RWLOCK
    if not stale_dvc_locks(project_dir)[0]:
        return []
    # DVC edits the file under an flock of rwlock.lock (zc.lockfile); take the same lock.
    with open(path.with_name("rwlock.lock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale, _ = stale_dvc_locks(project_dir)
        try:
            rwlock = json.loads(path.read_text(encoding="utf-8") or "{}")
        except ValueError:
            path.unlink()
            return stale
        written_at = path.stat().st_mtime
        keep: dict = {"write": {}, "read": {}}
        for entry in dvc_lock_entries(rwlock):
            if why_stale(entry, written_at) is None:
                info = {"pid": entry.pid, "cmd": entry.cmd}
                if entry.mode == "write":
                    keep["write"][entry.path] = info
                else:
                    keep["read"].setdefault(entry.path, []).append(info)
        partial = path.with_name("rwlock.regraft-tmp")
        partial.write_text(json.dumps(keep), encoding="utf-8")
        os.replace(partial, path)
    return stale
