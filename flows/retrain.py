"""Prefect flow `retrain`: the stages of dvc.yaml, in DAG order, one Prefect task per stage.

Each task runs `dvc repro --single-item <stage>`, so dvc.lock is written by DVC exactly as
`dvc repro` writes it, then publishes the stage's report as a Markdown artifact. A failed run
restores data, reports, dvc.lock and params.yaml to what they were before it started.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.dag import stage_order, stage_outputs
from flows.workspace import discard, restore, take_snapshot
from pipelines.gate import DECIDER_ENV
from pipelines.stage_io import write_json
from tasks import evaluate as evaluate_task
from tasks import finetune as finetune_task
from tasks import gate as gate_task
from tasks import ingest as ingest_task
from tasks import packaging as packaging_task
from tasks import shift as shift_task
from tasks import validate as validate_task
from tasks.config import GateConfig, load_params, parse_override, write_overrides
from tasks.errors import RegraftError
from tasks.locking import clear_stale_dvc_locks, project_lock

RENDERERS = {
    "ingest": ingest_task.render_markdown,
    "validate": validate_task.render_markdown,
    "shift": shift_task.render_markdown,
    "finetune": finetune_task.render_markdown,
    "evaluate": evaluate_task.render_markdown,
    "verdict": gate_task.render_table,
    "package": packaging_task.render_markdown,
}
# The gate stage's report is reports/verdict.json.
REPORT_NAMES = {"gate": "verdict"}


class RetrainParameters(BaseModel):
    """What a person may change for one run. Each field maps to one key of params.yaml;
    empty fields leave params.yaml as it is."""

    model_config = ConfigDict(extra="forbid")

    time_cutoff: dt.date | None = Field(
        default=None, description="First day of the target domain (ingest.split.time_cutoff).",
        json_schema_extra={"param": "ingest.split.time_cutoff"},
    )
    holdout_fraction: float | None = Field(
        default=None, gt=0, lt=1, description="Share of each domain held out (ingest.split.holdout_fraction).",
        json_schema_extra={"param": "ingest.split.holdout_fraction"},
    )
    split_seed: int | None = Field(
        default=None, ge=0, description="Seed of the holdout split (ingest.split.seed).",
        json_schema_extra={"param": "ingest.split.seed"},
    )
    strategy: Literal["auto", "feature_extraction", "full", "gradual_unfreeze", "lora"] | None = Field(
        default=None, description="How much of the pretrained model adapts (train.strategy).",
        json_schema_extra={"param": "train.strategy"},
    )
    epochs: int | None = Field(
        default=None, ge=1, le=100, description="Training epochs, an upper bound with early stopping (train.epochs).",
        json_schema_extra={"param": "train.epochs"},
    )
    on_severe_shift: Literal["warn", "block"] | None = Field(
        default=None, description="Whether a severe domain shift stops the run before training (shift.on_severe).",
        json_schema_extra={"param": "shift.on_severe"},
    )
    on_inconclusive: Literal["reject", "approve"] | None = Field(
        default=None, description="What an INCONCLUSIVE gate becomes when nobody answers (gate.on_inconclusive).",
        json_schema_extra={"param": "gate.on_inconclusive"},
    )
    overrides: list[str] = Field(
        default_factory=list, description="Any other params.yaml key, as KEY=VALUE (e.g. validate.min_rows_per_class=10).",
    )
    push: bool = Field(default=True, description="Push data and models to the DVC remote after a successful run.")

    def as_overrides(self) -> dict[str, Any]:
        """Dotted params.yaml keys and values; explicit fields win over free-form ones."""
        result = dict(parse_override(item) for item in self.overrides)
        values = self.model_dump(mode="json")
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if "param" in extra and values[name] is not None:
                result[extra["param"]] = values[name]
        return result


# DVC's advice on staging files in git: noise inside a flow run.
DVC_GIT_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage")


class StageFailed(RegraftError):
    """A DVC stage exited non-zero; the message carries what it printed last."""


class StageInterrupted(StageFailed):
    """A stage that may succeed when run again: its process was killed (out of memory, preempted) or
    DVC found a path locked by another DVC command. The stage task retries these; finetune resumes
    from its last checkpoint."""


# What DVC prints when its locks are taken by another DVC command.
BUSY_MARKERS = (re.compile(r"is busy, it is being blocked by"), re.compile(r"Unable to acquire lock"))
EXIT_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)$")


def killed_by_signal(status: int) -> bool:
    """DVC runs a stage's command through $SHELL (/bin/sh when unset). When the shell execs the command
    (bash), a signal death shows as -N; when it forks (dash), the shell exits with 128+N."""
    return status < 0 or 128 < status <= 128 + 64


def is_transient(lines: Iterable[str]) -> bool:
    """Whether DVC's output says the stage was killed by a signal or blocked by another DVC command."""
    for line in lines:
        status = EXIT_STATUS.search(line)
        if (status and killed_by_signal(int(status.group(1)))) or any(m.search(line) for m in BUSY_MARKERS):
            return True
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry interrupted stages only; a stage that failed on its own input stays failed."""
    return isinstance(state.data, StageInterrupted)


class GateRejected(RegraftError):
    """The gate's INCONCLUSIVE verdict was rejected (by a person, a timeout or gate.on_inconclusive)."""


class GateDecision(RunInput):
    """What a person answers when the gate is INCONCLUSIVE (the form in the Prefect UI)."""

    approve: bool = Field(description="Let this candidate go on to packaging and promotion despite the INCONCLUSIVE verdict.")
    reason: str = Field(min_length=3, description="Why; recorded in reports/verdict.json.")
    reviewer: str = Field(default="", description="Who decides (name or e-mail).")


def stage_environment() -> dict[str, str]:
    """The stage commands (`python -m pipelines...`) must run on this interpreter; the gate leaves an
    INCONCLUSIVE verdict to the flow, which can ask a person."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[DECIDER_ENV] = "flow"
    return env


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


@task(name="stage", task_run_name="{stage}", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def run_stage(stage: str, project_dir: Path, reports_dir: Path) -> dict:
    """Run one dvc.yaml stage through DVC, stream its output into the Prefect log, publish its report."""
    logger = get_run_logger()
    # Its own process group, so that a cancelled or interrupted run stops DVC and the stage's command
    # (and torchrun's workers) instead of leaving them writing into a workspace that is being restored.
    process = subprocess.Popen(
        dvc_command("repro", "--single-item", stage), cwd=project_dir, env=stage_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=40)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            line = line.rstrip()
            if line and not line.lstrip().startswith(DVC_GIT_HINTS):
                logger.info(line)
                tail.append(line)
        returncode = process.wait()
    except BaseException:
        stop_process_group(process)
        raise
    if returncode != 0:
        shown = [t for t in tail if not t.startswith(("Having any troubles", "ERROR: failed to reproduce"))]
        raise (StageInterrupted if is_transient(tail) else StageFailed)(f"stage {stage!r} failed:\n" + "\n".join(shown))
    name = REPORT_NAMES.get(stage, stage)
    report_file = project_dir / reports_dir / f"{name}.json"
    if not report_file.is_file():
        raise StageFailed(f"stage {stage!r} wrote no report at {report_file}")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    publish_report(name, report)
    return report


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 10) -> None:
    """SIGTERM a stage's process group, give it a grace period, then SIGKILL whatever is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_seconds)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the stage's own children may outlive DVC
    except ProcessLookupError:
        pass
    process.wait()


def publish_report(name: str, report: dict) -> None:
    render = RENDERERS.get(name, lambda r: f"# {name}\n\n```json\n{json.dumps(r, indent=2)[:20000]}\n```\n")
    create_markdown_artifact(key=f"{name}-report", markdown=render(report), description=f"regraft {name} report")


def decision_mode() -> str:
    """Who answers an INCONCLUSIVE gate: a person through the Prefect UI when the run came from a
    deployment, the person at the terminal when there is one, else the configured policy."""
    if deployment.get_id():
        return "pause"
    if sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty():
        return "prompt"
    return "policy"


def decide_inconclusive(verdict: dict, cfg: GateConfig, mode: str) -> dict:
    """Record approve/reject for an INCONCLUSIVE verdict; never waits longer than the configured timeout."""
    logger = get_run_logger()
    if mode == "pause":
        logger.warning("gate INCONCLUSIVE: waiting up to %s s for a decision (resume this run in the Prefect UI)",
                       cfg.decision_timeout_seconds)
        try:
            answer = pause_flow_run(wait_for_input=GateDecision, timeout=cfg.decision_timeout_seconds,
                                    key="gate-decision")
        except FlowPauseTimeout:
            return gate_task.record_decision(verdict, False, "timeout",
                                             f"no decision within {cfg.decision_timeout_seconds} s")
        return gate_task.record_decision(verdict, answer.approve, answer.reviewer or "Prefect UI", answer.reason)
    if mode == "prompt":
        print(gate_task.render_table(verdict))
        reply = input("Gate INCONCLUSIVE. Approve this candidate for packaging? [y/N] ").strip().lower()
        reason = input("Reason (recorded in the verdict): ").strip() or "(none given)"
        return gate_task.record_decision(verdict, reply in ("y", "yes"), f"terminal ({os.environ.get('USER', '?')})", reason)
    return gate_task.record_decision(verdict, cfg.on_inconclusive == "approve", "policy",
                                     f"gate.on_inconclusive={cfg.on_inconclusive} (nobody to ask)")


@task(name="gate-decision")
def settle_verdict(verdict: dict, project_dir: Path, reports_dir: Path, cfg: GateConfig) -> dict:
    """Resolve an INCONCLUSIVE verdict, write the decision into reports/verdict.json (and dvc.lock)."""
    if verdict["verdict"] != gate_task.INCONCLUSIVE or verdict.get("decision"):
        return verdict
    verdict = decide_inconclusive(verdict, cfg, decision_mode())
    write_json(project_dir / reports_dir / "verdict.json", verdict)
    subprocess.run(dvc_command("commit", "--force", "gate"), cwd=project_dir, env=stage_environment(),
                   capture_output=True, text=True, check=True)
    publish_report("verdict", verdict)
    if not gate_task.promotable(verdict):
        decision = verdict["decision"]
        raise GateRejected(f"gate INCONCLUSIVE and rejected by {decision['by']}: {decision['reason']}; "
                           f"undecided criteria: {', '.join(verdict['inconclusive'])}")
    return verdict


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_outputs(project_dir: Path) -> str:
    """Send data and models to the default DVC remote (transient failures retry)."""
    remote = subprocess.run(dvc_command("remote", "default"), cwd=project_dir, capture_output=True, text=True)
    name = remote.stdout.strip()
    if remote.returncode != 0 or not name:
        get_run_logger().warning("no default DVC remote is configured; outputs were not pushed")
        return ""
    pushed = subprocess.run(dvc_command("push", "--remote", name), cwd=project_dir, env=stage_environment(),
                            capture_output=True, text=True)
    if pushed.returncode != 0:
        raise RegraftError(f"dvc push to remote {name!r} failed: {pushed.stderr.strip() or pushed.stdout.strip()}")
    get_run_logger().info(pushed.stdout.strip())
    return name


def publish_html_report(root: Path, params, run_id: str) -> Path:
    """Write reports/report.html (every report, plot and the verdict on one page) and link it from the run."""
    from tasks.report import html_report

    page = root / params.paths.reports / "report.html"
    page.write_text(html_report(root / params.paths.reports, RENDERERS, f"regraft run {run_id}",
                                root / params.paths.train_log), encoding="utf-8")
    create_link_artifact(key="run-report", link=page.as_uri(), link_text="HTML report of this run",
                         description="validation, shift plots, training curves, metrics, groups and verdict")
    return page


def keep_verdict(kept_reports: Path, reports: Path) -> None:
    verdict = kept_reports / "verdict.json"
    if verdict.is_file():
        reports.mkdir(parents=True, exist_ok=True)
        shutil.copy2(verdict, reports / "verdict.json")


@flow(name="retrain", log_prints=True)
def retrain(parameters: RetrainParameters = RetrainParameters(), project_dir: str = ".") -> dict:
    """Run every stage of dvc.yaml in order; all or nothing; one run per project at a time."""
    root = Path(project_dir).resolve()
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S"))
    current = load_params(root / "params.yaml")
    with project_lock(root / current.paths.state, f"retrain run {run_id}", current.schedule.lock_timeout_seconds,
                      on_wait=logger.warning):
        for note in clear_stale_dvc_locks(root):
            logger.warning("removed a stale DVC lock record: %s", note)
        # Read after taking the lock: the run before may have changed params.yaml.
        return run_all_stages(root, parameters, run_id)


def run_all_stages(root: Path, parameters: RetrainParameters, run_id: str) -> dict:
    overrides = parameters.as_overrides()
    params = load_params(root / "params.yaml", overrides)
    stages = stage_order(root)
    run_dir = root / params.paths.state / "runs" / run_id
    snapshot = take_snapshot(
        root, [Path("params.yaml"), Path("dvc.lock"), params.paths.reports, *stage_outputs(root)], run_dir / "before"
    )
    reports: dict[str, dict] = {}
    started: list[str] = []
    try:
        if overrides:
            write_overrides(root / "params.yaml", overrides)
        for stage in stages:
            started.append(stage)
            reports[stage] = run_stage.with_options(name=stage)(stage, root, params.paths.reports)
            if stage == "gate":
                reports[stage] = settle_verdict(reports[stage], root, params.paths.reports, params.gate)
        report_page = publish_html_report(root, params, run_id)
        remote = push_outputs(root) if parameters.push else ""
    except BaseException as exc:
        # Keep what the failed run wrote for inspection, then put the last good state back.
        kept = run_dir / "failed-reports"
        if (root / params.paths.reports).exists():
            shutil.copytree(root / params.paths.reports, kept, dirs_exist_ok=True)
        restore(snapshot)
        # The verdict is written on every run, pass or fail: the failed run's verdict stays readable.
        if "gate" in started:
            keep_verdict(kept, root / params.paths.reports)
        if isinstance(exc, RegraftError):
            verdict_note = " (except reports/verdict.json, this run's verdict)" if "gate" in started else ""
            raise type(exc)(
                f"{exc}\nThe failed run's reports are in {kept}; data, models, reports{verdict_note}, dvc.lock "
                "and params.yaml are back to what they were before the run."
            ) from None
        raise
    discard(snapshot)
    return {"stages": stages, "reports": reports, "pushed_to": remote,
            "reports_dir": str(root / params.paths.reports), "html_report": str(report_page)}
