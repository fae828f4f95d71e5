"""Runs that end badly and the next run: a project that is busy, a run lost outright (SIGKILL of the run and
its stage) that the next run puts back, a hung stage stopped at its timeout, and an output path that would have
deleted the state folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import kill_run_and_stages, make_project, processes_in, quick_project, run, tree_digest
from tests.integration.test_run_safety import WORKSPACE, regraft_env, wait_for_trainer

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")


def test_a_busy_project_exits_3_and_says_who_holds_it_once(tmp_path, prefect_env):
    from tasks.config import write_overrides
    from tasks.locking import project_lock

    project = make_project(tmp_path / "project", tmp_path / "remote")
    write_overrides(project / "params.yaml", {"schedule.lock_timeout_seconds": 0})
    with project_lock(project / ".regraft", "a promotion in this test", 0):
        busy = run([REGRAFT, "run", "--no-push"], project, check=False, env_update=prefect_env)
    assert busy.returncode == 3, busy.stdout + busy.stderr
    assert busy.stderr.count("a promotion in this test") == 2  # waiting for it, then giving up: said once each
    assert busy.stderr.count("error: ") == 1 and "Traceback" not in busy.stderr


def test_a_run_lost_outright_is_put_back_by_the_next_run(tmp_path, tiny_bert, prefect_env):
    """A lost worker: `regraft run` and its stage die by SIGKILL mid-training, leaving the run's override in
    params.yaml and the workspace half-changed. The next run finds the dead run's snapshot, puts the workspace
    back first and says so."""
    project = quick_project(tmp_path, tiny_bert)
    before = tree_digest(project, WORKSPACE)
    process = subprocess.Popen([REGRAFT, "run", "--no-push", "--set", "train.epochs=50"], cwd=project,
                               env=regraft_env(prefect_env), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_for_trainer(project, process)
        kill_run_and_stages(project, process.pid)  # everything at once, as when the machine goes
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "epochs: 50" in (project / "params.yaml").read_text()  # the dead run's override is still there

    failed = run([REGRAFT, "run", "--no-push", "--set", "validate.rows.train_min=100000"], project, check=False,
                 env_update=prefect_env)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "recovered from an interrupted run" in failed.stdout + failed.stderr
    assert tree_digest(project, WORKSPACE) == before


def test_a_hung_stage_is_stopped_at_its_timeout_and_the_project_released(tmp_path, tiny_bert, prefect_env):
    project = quick_project(tmp_path, tiny_bert, **{"schedule.stage_timeout_seconds": 4})
    before = tree_digest(project, WORKSPACE)
    timed_out = run([REGRAFT, "run", "--no-push"], project, check=False, env_update=prefect_env)
    assert timed_out.returncode == 70, timed_out.stdout + timed_out.stderr
    assert "ran longer than schedule.stage_timeout_seconds=4 s and was stopped" in timed_out.stderr
    assert not [p.info["cmdline"] for p in processes_in(project) if p.info["cmdline"]]
    assert tree_digest(project, WORKSPACE) == before
    # The lock is free again: the next run starts at once (and fails the same way).
    again = run([REGRAFT, "run", "--no-push"], project, check=False, env_update=prefect_env)
    assert again.returncode == 70 and "waiting for" not in again.stdout + again.stderr


@pytest.mark.parametrize("how", ["--set", "params.yaml"])
def test_an_output_over_the_state_folder_is_refused_before_anything_runs(tmp_path, how):
    """`paths.shift_plots=.regraft` once made DVC delete the model store, the Prefect state and the run lock
    before the shift stage ran. Now it is refused, by --set and in params.yaml alike, and nothing is touched."""
    project = make_project(tmp_path / "project", tmp_path / "remote")
    store = project / ".regraft" / "bentoml" / "models" / "kept.txt"
    store.parent.mkdir(parents=True)
    store.write_text("a packaged model")
    if how == "params.yaml":
        params = project / "params.yaml"
        params.write_text(params.read_text().replace("shift_plots: reports/shift", "shift_plots: .regraft"))
        args = []
    else:
        args = ["--set", "paths.shift_plots=.regraft"]
    before = tree_digest(project, (".regraft", "params.yaml"))
    refused = run([REGRAFT, "run", "--no-push", *args], project, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert ("paths.shift_plots: not a key a run may change" if how == "--set"
            else "shift_plots (.regraft) overlaps state (.regraft)") in refused.stderr
    assert refused.stderr.count("error: ") == 1 and "Traceback" not in refused.stderr
    assert tree_digest(project, (".regraft", "params.yaml")) == before and store.read_text() == "a packaged model"
