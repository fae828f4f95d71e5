"""Runs that collide or break: two runs started at once on one project, a training process killed
mid-run (the stage task retries and resumes from its checkpoint), and a stale DVC lock record."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import make_project, processes_in, quick_project, run, tree_digest

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")
DVC = [sys.executable, "-m", "dvc"]


def regraft_env(prefect_env: dict[str, str]) -> dict[str, str]:
    from flows.retrain import stage_environment

    return {**stage_environment(), **prefect_env}  # runs report to one real Prefect API


def test_two_runs_started_at_once_take_turns_and_leave_dvc_consistent(tmp_path, tiny_bert, prefect_env):
    project = quick_project(tmp_path, tiny_bert)
    params_before = (project / "params.yaml").read_bytes()
    env = regraft_env(prefect_env)
    runs = {seed: subprocess.Popen([REGRAFT, "run", "--no-push", "--set", f"ingest.split.seed={seed}"], cwd=project,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for seed in (11, 12)}
    outputs = {seed: process.communicate(timeout=1200)[0] for seed, process in runs.items()}
    for seed, process in runs.items():
        assert process.returncode == 0, outputs[seed][-4000:]
    waited = [seed for seed, out in outputs.items() if "waiting for retrain run" in out]
    assert len(waited) == 1, "exactly one run should have waited for the other"
    first = ({11, 12} - set(waited)).pop()
    holder_pid = re.search(r"waiting for retrain run \S+ \(PID (\d+)", outputs[waited[0]]).group(1)
    assert int(holder_pid) == runs[first].pid
    # The run that went second ran after the first one finished: dvc.lock records its parameters and matches
    # the files on disk; each run's override was its own, so params.yaml is as it was.
    assert (project / "params.yaml").read_bytes() == params_before
    status = json.loads(run(DVC + ["status", "--json"], project).stdout)
    assert not [c for changes in status.values() for c in changes if isinstance(c, dict)
                and ({"changed outs", "deleted"} & set(c))], status
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["params"]["params.yaml"]["ingest"]["split"]["seed"] == waited[0]
    assert json.loads((project / "reports" / "package.json").read_text())["smoke_test"]["mismatches"] == 0


def finetune_process(project: Path) -> psutil.Process | None:
    return next((p for p in processes_in(project) if "pipelines.finetune" in (p.info["cmdline"] or [])), None)


def test_a_killed_training_process_is_retried_and_resumes_from_its_checkpoint(tmp_path, tiny_bert, prefect_env):
    project = quick_project(tmp_path, tiny_bert, **{"train.epochs": 2})
    # A DVC lock record left by a killed `dvc repro` whose PID now belongs to another process: DVC alone
    # would report params.yaml "busy" on every run.
    sleeper = subprocess.Popen(["sleep", "600"])
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    rwlock.write_text(json.dumps({"write": {str(project / "params.yaml"): {
        "pid": sleeper.pid, "cmd": "dvc repro --single-item ingest"}}, "read": {}}))
    long_ago = psutil.Process(sleeper.pid).create_time() - 3600
    os.utime(rwlock, (long_ago, long_ago))
    busy = run(DVC + ["repro", "--single-item", "ingest"], project, check=False)
    assert busy.returncode != 0 and "is busy" in busy.stderr + busy.stdout

    checkpoint = project / ".regraft" / "checkpoints" / "finetune" / "checkpoint.pt"
    # DVC runs the stage through $SHELL; /bin/sh (dash, what CI has when SHELL is unset) forks the command
    # and reports the kill as exit status 137 rather than -9.
    env = {**regraft_env(prefect_env), "SHELL": "/bin/sh"}
    process = subprocess.Popen([REGRAFT, "run", "--no-push"], cwd=project, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 600
        while killed is None and time.monotonic() < deadline and process.poll() is None:
            trainer = finetune_process(project)
            if trainer is not None and checkpoint.exists():
                trainer.send_signal(signal.SIGKILL)  # what the OOM killer or a preempted node does
                killed = trainer.pid
            time.sleep(0.05)
        output = process.communicate(timeout=1200)[0]
    finally:
        sleeper.kill()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert killed, "the training process was never seen with a checkpoint"
    assert process.returncode == 0, output[-5000:]
    assert "removed a stale DVC lock record" in output and f"PID {sleeper.pid} now belongs to another process" in output
    assert re.search(r"exited with (-9|137)\b", output) and "Retry 1/2 will start" in output
    resumed = re.search(r"finetune: resuming from the checkpoint at step (\d+)", output)
    assert resumed, output[-5000:]
    # Checkpoints are written every 5 steps and at the end of each epoch: the kill may land after either.
    report = json.loads((project / "reports" / "finetune.json").read_text())
    assert report["resumed_from_step"] == int(resumed.group(1)) > 0
    assert not checkpoint.exists()


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_stage_killed_by_a_signal_is_transient_whichever_shell_dvc_uses(tmp_path, shell):
    """bash execs a stage's command (DVC reports -9), dash forks it (DVC reports 137): both are a kill, which the
    stage task retries; a command that fails on its own (exit 3) is not retried."""
    from flows.retrain import is_transient

    run(["git", "init", "-q"], tmp_path)
    run(DVC + ["init", "-q"], tmp_path)
    kill = "python -c 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "killed": {"cmd": kill, "always_changed": True}, "fails": {"cmd": "python -c 'raise SystemExit(3)'"}}}))
    for stage, transient in (("killed", True), ("fails", False)):
        result = run(DVC + ["repro", "--single-item", stage], tmp_path, check=False, env_update={"SHELL": shell})
        assert result.returncode != 0
        assert is_transient((result.stdout + result.stderr).splitlines()) is transient, result.stdout + result.stderr


WORKSPACE = ("data", "models", "reports", "dvc.lock", "params.yaml")  # every file a run may change


def test_ctrl_c_stops_the_running_stage_and_restores_the_project(tmp_path, tiny_bert, prefect_env):
    """Ctrl-C on `regraft run` while a stage trains: DVC and the stage's command stop with the run (they run in
    their own process group), and the workspace is what it was before the run."""
    project = quick_project(tmp_path, tiny_bert, **{"train.epochs": 50})
    before = tree_digest(project, WORKSPACE)
    # Ctrl-C must mean KeyboardInterrupt in `regraft run` even when this test runs under a shell that ignores
    # SIGINT (an ignored signal stays ignored across exec; a handled one is reset to its default).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([REGRAFT, "run", "--no-push"], cwd=project, env=regraft_env(prefect_env),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline, trainer = time.monotonic() + 600, None
        while trainer is None and time.monotonic() < deadline and process.poll() is None:
            trainer = finetune_process(project)
            time.sleep(0.1)
        assert trainer is not None, "the training process was never seen"
        process.send_signal(signal.SIGINT)  # to the regraft process only, as if its own handler got Ctrl-C
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0, output[-3000:]
    assert trainer.pid not in {p.pid for p in processes_in(project)}, "the stage's training process outlived the run"
    leftovers = [p.info["cmdline"] for p in processes_in(project) if p.info["cmdline"]]
    assert not leftovers, f"the interrupted run left processes behind: {leftovers}"
    assert tree_digest(project, WORKSPACE) == before



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
        deadline, trainer = time.monotonic() + 600, None
        while trainer is None and time.monotonic() < deadline and process.poll() is None:
            trainer = finetune_process(project)
            time.sleep(0.1)
        assert trainer is not None, "the training process was never seen"
        # Everything dies at once, as when the machine goes: the run, DVC and the stage (its own group).
        for group in {os.getpgid(p.pid) for p in processes_in(project)} | {process.pid}:
            os.killpg(group, signal.SIGKILL)
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
