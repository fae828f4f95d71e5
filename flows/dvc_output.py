"""What the flow must read from DVC's printed output, in one place.

`dvc repro` reports a stage's exit status and contention for its locks only as text (its own exit code
is 1 whatever the stage did), so these patterns are the one adapter between DVC's wording and the flow's
retry decisions. Every other fact a flow needs comes from files the stages write.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# DVC's advice on staging files in git: noise inside a flow run.
DVC_GIT_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage")
# DVC's own lines around a failed stage: the stage's output says what went wrong.
DVC_NOISE = ("Having any troubles", "ERROR: failed to reproduce", "Running stage ", "> python -m pipelines.")
# What DVC prints when its locks are taken by another DVC command (dvc/rwlock.py, dvc/lock.py).
BUSY_MARKERS = (re.compile(r"is busy, it is being blocked by"), re.compile(r"Unable to acquire lock"))
# dvc/stage/exceptions.py StageCmdFailedError, at the end of DVC's "failed to reproduce" line.
EXIT_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)$")


def killed_by_signal(status: int) -> bool:
    """DVC runs a stage's command through $SHELL (/bin/sh when unset). When the shell execs the command
    (bash), a signal death shows as -N; when it forks (dash), the shell exits with 128+N."""
    return status < 0 or 128 < status <= 128 + 64


def stage_exit_status(lines: Iterable[str]) -> int | None:
    """The exit status of the stage's command, as DVC reports it."""
    for line in lines:
        status = EXIT_STATUS.search(line)
        if status:
            return int(status.group(1))
    return None


def is_transient(lines: Iterable[str]) -> bool:
    """Whether DVC's output says the stage was killed by a signal or blocked by another DVC command."""
    lines = list(lines)
    status = stage_exit_status(lines)
    return (status is not None and killed_by_signal(status)) or any(
        m.search(line) for line in lines for m in BUSY_MARKERS)
