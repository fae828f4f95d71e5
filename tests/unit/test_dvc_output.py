"""Reading DVC's printed output (flows/dvc_output.py): the stage's exit status and lock contention, on lines
as DVC 3 prints them."""

from __future__ import annotations

import pytest

from flows.dvc_output import DVC_GIT_HINTS, DVC_NOISE, is_transient, killed_by_signal, stage_exit_status

pytestmark = pytest.mark.unit


def failed_stage(status: int) -> list[str]:
    """What `dvc repro --single-item finetune` prints when the stage's command exits with `status`."""
    return ["Running stage 'finetune':", "> python -m pipelines.finetune", "finetune: step 3/40 epoch 1",
            f"ERROR: failed to reproduce 'finetune': failed to run: python -m pipelines.finetune, exited with {status}"]


RWLOCK_BUSY = [
    "ERROR: 'dvc.lock' is busy, it is being blocked by:",
    "  (PID 4242): dvc repro --single-item validate",
    "",
    "If there are no processes with such PIDs, you can manually remove '.dvc/tmp/rwlock' and try again.",
]
REPO_LOCKED = [
    "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly. "
    "Check the page <https://dvc.org/doc/user-guide/troubleshooting#lock-issue> for other possible reasons and "
    "to learn how to resolve this.",
]


@pytest.mark.parametrize("status", [0, 1, 2, 70, 137, -9, 143])
def test_the_stages_exit_status_is_read_from_dvcs_error_line(status):
    assert stage_exit_status(failed_stage(status)) == status


def test_no_error_line_means_no_exit_status():
    assert stage_exit_status(["Running stage 'finetune':", "> python -m pipelines.finetune"]) is None
    assert stage_exit_status(RWLOCK_BUSY) is None


@pytest.mark.parametrize("status,killed", [
    (-9, True), (-15, True),  # bash execs the command: the signal shows as -N
    (137, True), (143, True), (129, True), (192, True),  # dash forks: the shell exits with 128+N
    (0, False), (1, False), (2, False), (70, False), (128, False), (193, False),
])
def test_killed_by_signal_under_either_shell(status, killed):
    assert killed_by_signal(status) is killed


@pytest.mark.parametrize("lines,transient", [
    (failed_stage(137), True),
    (failed_stage(-9), True),
    (failed_stage(1), False),
    (failed_stage(2), False),
    (failed_stage(70), False),
    (RWLOCK_BUSY, True),
    (REPO_LOCKED, True),
    (["ERROR: failed to reproduce 'finetune': "
      "'/work/project/dvc.lock' is busy, it is being blocked by:"], True),
    ([], False),
])
def test_transient_failures_are_signals_and_dvcs_locks(lines, transient):
    assert is_transient(lines) is transient
    assert is_transient(iter(lines)) is transient  # read once: a generator of lines works too


def test_dvcs_own_lines_are_told_from_the_stages():
    shown = [line for line in failed_stage(1) if not line.startswith(DVC_NOISE)]
    assert shown == ["finetune: step 3/40 epoch 1"]
    hints = ["To track the changes with git, run:", "\tgit add dvc.lock", "To enable auto staging, run:",
             "\tdvc config core.autostage true"]
    assert all(line.lstrip().startswith(DVC_GIT_HINTS) for line in hints)
    assert not "validate: 120 rows".startswith(DVC_GIT_HINTS)
