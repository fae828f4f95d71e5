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

from flows.dvc_stage import stage_environment
from tests.conftest import kill_run_and_stages, processes_in, quick_project, run, tree_digest

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")
DVC = [sys.executable, "-m", "dvc"]


def regraft_env(prefect_env: dict[str, str]) -> dict[str, str]:
    from flows.dvc_stage import stage_environment

    return {**stage_environment(), **prefect_env}  # runs report to one real Prefect API


def test_two_runs_started_at_once_take_turns_and_leave_dvc_consistent(tmp_path, tiny_bert, prefect_env):
    """Each run overrides a gate policy (not applicable without a champion, so both pass): the first runs the whole
    pipeline, the one that waited re-runs only gate, decide and package, and dvc.lock records its own value.
    Then a third run fails its gate; each of the three is in the run history (`dvc exp show`)."""
    project = quick_project(tmp_path, tiny_bert)
    git = ["git", "-c", "user.name=regraft", "-c", "user.email=regraft@localhost"]
    run([*git, "add", "-A"], project)
    run([*git, "commit", "-qm", "the project"], project)  # the run history is kept relative to a commit
    params_before = (project / "params.yaml").read_bytes()
    env = regraft_env(prefect_env)
    drops = {"a": 0.04, "b": 0.03}
    runs = {name: subprocess.Popen([REGRAFT, "run", "--no-push", "--set", f"gate.forgetting.max_drop={drop}"],
                                   cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, drop in drops.items()}
    outputs = {name: process.communicate(timeout=1200)[0] for name, process in runs.items()}
    for name, process in runs.items():
        assert process.returncode == 0, outputs[name][-4000:]
    waited = [name for name, out in outputs.items() if "waiting for retrain run" in out]
    assert len(waited) == 1, "exactly one run should have waited for the other"
    first = (set(drops) - set(waited)).pop()
    holder_pid = re.search(r"waiting for retrain run \S+ \(PID (\d+)", outputs[waited[0]]).group(1)
    assert int(holder_pid) == runs[first].pid
    # The run that went second ran after the first one finished: dvc.lock records its parameters and matches
    # the files on disk; each run's override was its own, so params.yaml is as it was.
    assert (project / "params.yaml").read_bytes() == params_before
    status = json.loads(run(DVC + ["status", "--json"], project).stdout)
    assert not [c for changes in status.values() for c in changes if isinstance(c, dict)
                and ({"changed outs", "deleted"} & set(c))], status
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["gate"]["params"]["params.yaml"]["gate"]["forgetting"]["max_drop"] == drops[waited[0]]
    assert json.loads((project / "reports" / "package.json").read_text())["smoke_test"]["mismatches"] == 0

    failed = run([REGRAFT, "run", "--no-push", "--set", "gate.worst_group.floor=0.99"], project, check=False,
                 env_update=env)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    history = json.loads(run(DVC + ["exp", "show", "--json"], project).stdout)
    rows = {e["name"]: e["data"] for commit in history for exp in commit.get("experiments") or []
            for e in exp["revs"]}
    assert len(rows) == 3, rows.keys()
    by_value = {}
    for name, data in rows.items():
        gate = data["params"]["params.yaml"]["data"]["gate"]
        verdict = data["metrics"]["reports/verdict.json"]["data"]["verdict"]
        metrics = data["metrics"]["reports/metrics.json"]["data"]["target_holdout"]["candidate"]
        assert metrics["macro_f1_low"] <= metrics["macro_f1"] <= metrics["macro_f1_high"]
        by_value[(gate["forgetting"]["max_drop"], gate["worst_group"]["floor"])] = verdict
    assert by_value == {(0.04, 0.0): "PASS", (0.03, 0.0): "PASS", (0.05, 0.99): "FAIL"}, by_value
    first, *_, last = sorted(rows)
    assert run(DVC + ["metrics", "diff", first, last], project).returncode == 0


def finetune_process(project: Path) -> psutil.Process | None:
    return next((p for p in processes_in(project) if "pipelines.finetune" in (p.info["cmdline"] or [])), None)


def wait_for_trainer(project: Path, process: subprocess.Popen, timeout: float = 600) -> psutil.Process:
    """The run's training process, once it is seen (the run must still be going)."""
    deadline, trainer = time.monotonic() + timeout, None
    while trainer is None and time.monotonic() < deadline and process.poll() is None:
        trainer = finetune_process(project)
        time.sleep(0.1)
    assert trainer is not None, "the training process was never seen"
    return trainer


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
    from flows.dvc_output import is_transient

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
        trainer = wait_for_trainer(project, process)
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


def test_sigterm_stops_the_run_its_stage_and_its_temporary_prefect_server(tmp_path, tiny_bert):
    """SIGTERM from a process manager (`timeout`, systemd, a stopped container) to `regraft run` on the demo's path,
    where no Prefect API is configured and the run starts a temporary one: the run exits 143 and says so once, the
    stage, DVC and the temporary server stop with it (the server outlived the run before: Python's default SIGTERM
    runs no exit handler), the run's override is taken back out of params.yaml, and the project is free."""
    project = quick_project(tmp_path, tiny_bert)
    before = tree_digest(project, WORKSPACE)
    env = {key: value for key, value in stage_environment().items() if not key.startswith("PREFECT_API_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    with (tmp_path / "run.log").open("w") as log:  # an override, to see it taken back out of params.yaml
        process = subprocess.Popen([REGRAFT, "run", "--no-push", "--set", "train.epochs=50"], cwd=project, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, stage = time.monotonic() + 300, None
        while stage is None and time.monotonic() < deadline and process.poll() is None:
            stage = next((p for p in processes_in(project) if "pipelines.validate" in (p.info["cmdline"] or [])), None)
            time.sleep(0.1)
        assert stage is not None, "the validate stage was never seen: " + (tmp_path / "run.log").read_text()[-3000:]
        process.send_signal(signal.SIGTERM)  # to the regraft process only
        process.wait(timeout=120)
        output = (tmp_path / "run.log").read_text()
        assert process.returncode == 143, output[-3000:]
        assert output.count("stopped by SIGTERM") == 1 and "Traceback" not in output, output[-3000:]
        assert "Starting temporary server" in output and "Stopping temporary server" in output, output[-3000:]
        leftovers = [p.info["cmdline"] for p in processes_in(project) if p.info["cmdline"]]
        assert not leftovers, f"the stopped run left processes behind: {leftovers}"
    finally:
        kill_run_and_stages(project, process.pid)  # on a failure, whatever is left
    assert tree_digest(project, WORKSPACE) == before
    refused = run([REGRAFT, "run", "--no-push", "--set", "validate.rows.train_min=100000"], project, check=False,
                  env_update={"PREFECT_HOME": env["PREFECT_HOME"]})
    assert refused.returncode == 2 and "waiting for" not in refused.stdout + refused.stderr, refused.stderr
