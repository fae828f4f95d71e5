"""One run per project at a time (flock), and stale records in DVC's .dvc/tmp/rwlock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.locking import (CLOCK_SLACK_SECONDS, ProjectBusy, clear_stale_dvc_locks, current_holder, project_lock,
                           stale_dvc_locks)

pytestmark = pytest.mark.unit

HOLD = """
import sys, time
from pathlib import Path
from tasks.locking import project_lock
with project_lock(Path(sys.argv[1]), "retrain run holder", 5):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(state: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(state), str(seconds)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_waits_and_says_for_whom(tmp_path):
    holder = hold_lock(tmp_path, 3)
    waits: list[str] = []
    started = time.monotonic()
    with project_lock(tmp_path, "second", 30, on_wait=waits.append, poll_seconds=0.1):
        waited = time.monotonic() - started  # got the lock only when the holder let go
    holder.wait(timeout=30)
    assert waited >= 1.0
    assert json.loads((tmp_path / "run.lock").read_text())["what"] == "second"
    assert len(waits) == 1 and f"retrain run holder (PID {holder.pid}" in waits[0]


def test_who_holds_the_project_now(tmp_path):
    assert current_holder(tmp_path) is None
    holder = hold_lock(tmp_path, 30)
    try:
        assert f"retrain run holder (PID {holder.pid}" in current_holder(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert current_holder(tmp_path) is None  # the kernel let go with the process


def test_waiting_too_long_fails_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path, 5)
    try:
        busy = pytest.raises(ProjectBusy, match=rf"retrain run holder \(PID {holder.pid}.*still holds the project")
        with busy, project_lock(tmp_path, "second", 0.3, on_wait=lambda _: None, poll_seconds=0.05):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_never_leaves_the_project_locked(tmp_path):
    holder = hold_lock(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    waits: list[str] = []
    with project_lock(tmp_path, "next", 0, on_wait=waits.append):
        pass
    assert waits == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_rwlock(project: Path, rwlock: dict, written: float) -> Path:
    path = project / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rwlock))
    os.utime(path, (written, written))
    return path


def test_records_of_killed_and_reused_pids_are_stale_and_a_live_holder_is_not(tmp_path):
    gone = dead_pid()
    written = time.time()  # this test process started before: it may hold a record written now
    time.sleep(CLOCK_SLACK_SECONDS + 1.5)  # start times read from psutil may be up to a second early
    sleeper = subprocess.Popen(["sleep", "30"])  # started after: its PID cannot be the writer's
    try:
        path = write_rwlock(tmp_path, {
            "write": {"data/target_train.parquet": {"pid": gone, "cmd": "dvc repro --single-item ingest"},
                      "models/candidate": {"pid": sleeper.pid, "cmd": "dvc repro --single-item finetune"}},
            "read": {"params.yaml": [{"pid": os.getpid(), "cmd": "dvc repro --single-item shift"}]},
        }, written)
        stale, live = stale_dvc_locks(tmp_path)
        assert len(stale) == 2 and len(live) == 1
        assert any(f"process {gone} no longer exists" in s and "data/target_train.parquet" in s for s in stale)
        assert any(f"PID {sleeper.pid} now belongs to another process ('sleep'" in s for s in stale)
        assert "params.yaml" in live[0]

        assert clear_stale_dvc_locks(tmp_path) == stale
        left = json.loads(path.read_text())
        assert left == {"write": {}, "read": {"params.yaml": [{"pid": os.getpid(), "cmd": "dvc repro --single-item shift"}]}}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_rwlock_or_a_torn_one(tmp_path):
    assert stale_dvc_locks(tmp_path) == ([], [])
    assert clear_stale_dvc_locks(tmp_path) == []
    path = tmp_path / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True)
    path.write_text('{"write": {"data')
    assert "not valid JSON" in stale_dvc_locks(tmp_path)[0][0]
    clear_stale_dvc_locks(tmp_path)
    assert not path.exists()
