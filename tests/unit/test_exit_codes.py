"""What a failure means, end to end: a stage's exit code -> the flow's error -> the command's exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.errors import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_CHECK_FAILED, EXIT_INTERNAL, CheckFailed, InternalError

pytestmark = pytest.mark.unit
REGRAFT = str(Path(sys.executable).parent / "regraft")


def dvc_failure(status: int) -> list[str]:
    return ["Running stage 'validate':", "> python -m pipelines.validate", "error: something",
            f"ERROR: failed to reproduce 'validate': failed to run: python -m pipelines.validate, exited with {status}"]


@pytest.mark.parametrize("status,error,code", [
    (1, CheckFailed, EXIT_CHECK_FAILED), (2, None, EXIT_BAD_INPUT), (70, InternalError, EXIT_INTERNAL),
    (-9, None, EXIT_INTERNAL), (137, None, EXIT_INTERNAL),
])
def test_a_stages_exit_status_says_what_the_failure_means(status, error, code):
    from flows.dvc_stage import StageInterrupted, stage_error

    kind = stage_error(dvc_failure(status))
    assert kind.exit_code == code
    if error is not None:
        assert kind is error
    if status in (-9, 137):
        assert kind is StageInterrupted  # killed: the stage task retries it


def test_busy_is_its_own_code():
    from tasks.locking import ProjectBusy

    assert ProjectBusy.exit_code == EXIT_BUSY


def test_version_and_no_project(tmp_path):
    version = subprocess.run([REGRAFT, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("regraft ")
    lost = subprocess.run([REGRAFT, "models"], cwd=tmp_path, capture_output=True, text=True)
    assert lost.returncode == EXIT_BAD_INPUT
    assert lost.stderr.count("error: no regraft project") == 1 and "Traceback" not in lost.stderr
