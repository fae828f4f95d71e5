"""Prefect flow `retrain`: the stages of dvc.yaml, in DAG order, one Prefect task per stage.

Each task runs `dvc repro --single-item <stage>`, so dvc.lock is written by DVC exactly as
`dvc repro` writes it, then publishes the stage's report as a Markdown artifact. A failed run
restores data, reports, dvc.lock and params.yaml to what they were before it started. The flow
decides nothing itself: the gate stage writes the verdict, the decide stage the decision; the flow
only asks a person when the verdict is INCONCLUSIVE and files the answer for the decide stage.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel, ConfigDict, Field, create_model

from flows.concurrency import run_slot
from flows.dag import stage_order, stage_outputs
from flows.dvc_output import DVC_GIT_HINTS, DVC_NOISE, is_transient, stage_exit_status
from flows.notifications import GATE_PAUSED, RUN_FAILED, notify
from flows.workspace import discard, prune_failed_runs, recover_interrupted, restore, take_snapshot
from tasks.config import Params, config_field, load_params, parse_override, project_root, write_overrides
from tasks.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, CheckFailed, DataError, InternalError, RegraftError
from tasks.files import PRIVATE_UMASK, sha256_of, write_json
from tasks.gate import INCONCLUSIVE, answer_file
from tasks.locking import clear_stale_dvc_locks, project_lock
from tasks.overrides import check_overrides, check_overrides_before_lock
from tasks.promotion import finish_interrupted_promotion, install_champion_from_remote
from tasks.processes import stop_process_group
from tasks.progress import PROGRESS_FILE_ENV, read_progress
from tasks.render import render_report, verdict_markdown

# The fields of the UI's run form, each setting one params.yaml key. Type, bounds and help come from
# that key's field in tasks/config.py, so the form cannot drift from the configuration.
FORM_FIELDS = {
    "time_cutoff": "ingest.split.time_cutoff",
    "holdout_fraction": "ingest.split.holdout_fraction",
    "split_seed": "ingest.split.seed",
    "strategy": "train.strategy",
    "epochs": "train.epochs",
    "on_severe_shift": "shift.on_severe",
}
# The stage before which an INCONCLUSIVE verdict is put to a person.
DECIDE_STAGE = "decide"
PARAMS_FILE = Path("params.yaml")
# A run's copy of what it may change, under paths.state/runs/<run id>/.
SNAPSHOT = "before"


class RunOptions(BaseModel):
    """What a person may change for one run. Empty fields leave params.yaml as it is."""

    model_config = ConfigDict(extra="forbid")

    overrides: list[str] = Field(
        default_factory=list, description="Any other params.yaml key, as KEY=VALUE (e.g. validate.min_rows_per_class=10).",
    )
    push: bool = Field(default=True, description="Push data and models to the DVC remote after a successful run.")

    def as_overrides(self) -> dict[str, Any]:
        """Dotted params.yaml keys and values; the form's fields win over free-form ones."""
        result = dict(parse_override(item) for item in self.overrides)
        values = self.model_dump(mode="json")
        for name, key in FORM_FIELDS.items():
            if values.get(name) is not None:
                result[key] = values[name]
        return result


def form_field(key: str) -> tuple[Any, Any]:
    """An optional form field with the type, bounds and help of the params.yaml key it sets."""
    info = config_field(key)
    optional = info.annotation | None
    return (Annotated[optional, *info.metadata] if info.metadata else optional,
            Field(default=None, description=f"{info.description} ({key})", json_schema_extra={"param": key}))


RetrainParameters = create_model(
    "RetrainParameters", __base__=RunOptions, __module__=__name__,
    **{name: form_field(key) for name, key in FORM_FIELDS.items()},
)


class StageInterrupted(InternalError):
    """A stage that may succeed when run again: its process was killed (out of memory, preempted) or
    DVC found a path locked by another DVC command. The stage task retries these; finetune resumes
    from its last checkpoint."""


def stage_error(lines: list[str]) -> type[RegraftError]:
    """What a failed stage means, from its exit status (pipelines/stage_io.py): 1 a check said no,
    2 bad input or configuration, a signal or DVC's lock an interruption, anything else a crash."""
    if is_transient(lines):
        return StageInterrupted
    status = stage_exit_status(lines)
    return {EXIT_CHECK_FAILED: CheckFailed, EXIT_BAD_INPUT: RegraftError}.get(status, InternalError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry interrupted stages only; a stage that failed on its own input stays failed."""
    return isinstance(state.data, StageInterrupted)


class GateDecision(RunInput):
    """What a person answers when the gate is INCONCLUSIVE (the form in the Prefect UI)."""

    approve: bool = Field(description="Let this candidate go on to packaging and promotion despite the INCONCLUSIVE verdict.")
    reason: str = Field(min_length=3, description="Why; recorded in the decision (reports/decision.json).")
    reviewer: str = Field(default="", description="Who decides (name or e-mail).")


def stage_environment() -> dict[str, str]:
    """The stage commands (`python -m pipelines...`) must run on this interpreter."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def stage_progress_file(state_dir: Path, stage: str) -> Path:
    """Where a stage appends its progress records (tasks/progress.py) while the flow runs it."""
    return state_dir / "progress" / f"{stage}.jsonl"


class TerminalProgress:
    """A live bar with throughput and ETA on the terminal, drawn from the records the stage appends to its
    progress file, polled while the stage runs."""

    def __init__(self, enabled: bool, path: Path, name: str, interval: float = 0.5):
        self.enabled, self.path, self.name, self.interval = enabled, path, name, interval
        self.offset, self.bar = 0, None
        self.stage_ended = threading.Event()
        self.follower = threading.Thread(target=self.follow, daemon=True)

    def start(self) -> None:
        if self.enabled:
            self.follower.start()

    def poll(self) -> None:
        """Show the records appended since the last poll."""
        if not self.enabled:
            return
        records, self.offset = read_progress(self.path, self.offset)
        for record in records:
            self.show(record)

    def follow(self) -> None:
        """Poll until the stage has ended, then once more for its last records."""
        while not self.stage_ended.wait(self.interval):
            self.poll()
        self.poll()

    def show(self, record: dict) -> None:
        step, total, rate = record["step"], record["total"], record["samples_per_second"]
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", desc=self.name, dynamic_ncols=True, leave=False)
        self.bar.update(step - self.bar.n)
        if rate is not None:
            self.bar.set_postfix(samples_per_s=f"{rate:.1f}")

    def close(self) -> None:
        self.stage_ended.set()
        if self.follower.is_alive():
            self.follower.join()
        if self.bar is not None:
            self.bar.close()


class StageTimedOut(InternalError):
    """A stage ran longer than schedule.stage_timeout_seconds and was stopped."""


@task(name="stage", task_run_name="{stage}", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def run_stage(stage: str, project_dir: Path, report_file: Path, timeout_seconds: float, progress_file: Path) -> dict:
    """Run one dvc.yaml stage through DVC, stream its output into the Prefect log, publish its report.
    A stage still running after `timeout_seconds` is stopped, with everything it started. The stage appends
    its progress records to `progress_file`."""
    logger = get_run_logger()
    # Emptied at the start: a retried stage's bar follows this attempt, not the records of the one before.
    progress_file.parent.mkdir(parents=True, exist_ok=True)
    progress_file.write_bytes(b"")
    # Its own process group, so that a cancelled or interrupted run stops DVC and the stage's command
    # (and torchrun's workers) instead of leaving them writing into a workspace that is being restored.
    process = subprocess.Popen(
        dvc_command("repro", "--single-item", stage), cwd=project_dir,
        env={**stage_environment(), PROGRESS_FILE_ENV: str(progress_file)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )
    tail: deque[str] = deque(maxlen=40)
    progress = TerminalProgress(sys.stderr.isatty(), progress_file, stage)
    progress.start()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        stop_process_group(process)

    watchdog = threading.Timer(timeout_seconds, expire)
    watchdog.daemon = True
    watchdog.start()
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
    finally:
        watchdog.cancel()
        progress.close()
    if expired.is_set():
        raise StageTimedOut(f"stage {stage!r} ran longer than schedule.stage_timeout_seconds={timeout_seconds:g} s "
                            "and was stopped")
    if returncode != 0:
        shown = [t for t in tail if not t.startswith(DVC_NOISE)]
        raise stage_error(list(tail))(f"stage {stage!r} failed:\n" + "\n".join(shown))
    path = project_dir / report_file
    if not path.is_file():
        raise InternalError(f"stage {stage!r} wrote no report at {path}")
    report = json_file(path)
    publish_report(report_file.stem, report)
    return report


def gate_verdict(path: Path) -> str | None:
    """PASS, FAIL or INCONCLUSIVE from a verdict file, or None when there is no readable one."""
    try:
        return json_file(path).get("verdict")
    except (OSError, ValueError, AttributeError):
        return None


def json_file(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def publish_report(name: str, report: dict) -> None:
    create_markdown_artifact(key=f"{name}-report", markdown=render_report(name, report),
                             description=f"regraft {name} report")


def decision_mode() -> str:
    """Who answers an INCONCLUSIVE gate: a person through the Prefect UI when the run came from a
    deployment, the person at the terminal when there is one, else nobody (gate.on_inconclusive decides)."""
    if deployment.get_id():
        return "pause"
    if sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty():
        return "prompt"
    return "policy"


def ask_person(verdict: dict, timeout_seconds: int, mode: str) -> dict | None:
    """A person's answer to an INCONCLUSIVE verdict ({approved, by, reason}), or None when there is nobody
    to ask or nobody answers in time."""
    logger = get_run_logger()
    if mode == "pause":
        logger.warning("gate INCONCLUSIVE: waiting up to %s s for a decision (resume this run in the Prefect UI)",
                       timeout_seconds)
        tell(GATE_PAUSED, f"gate INCONCLUSIVE on {', '.join(verdict.get('inconclusive') or []) or 'some criteria'}: "
             f"the run waits up to {timeout_seconds} s for a decision (Resume in the Prefect UI)", INCONCLUSIVE)
        try:
            answer = pause_flow_run(wait_for_input=GateDecision, timeout=timeout_seconds, key="gate-decision")
        except FlowPauseTimeout:
            logger.warning("no decision within %s s: gate.on_inconclusive decides", timeout_seconds)
            return None
        return {"approved": answer.approve, "by": answer.reviewer or "Prefect UI", "reason": answer.reason}
    if mode == "prompt":
        print(verdict_markdown(verdict))
        reply = input("Gate INCONCLUSIVE. Approve this candidate for packaging? [y/N] ").strip().lower()
        reason = input("Reason (recorded in the decision): ").strip() or "(none given)"
        return {"approved": reply in ("y", "yes"), "by": f"terminal ({os.environ.get('USER', '?')})", "reason": reason}
    return None


@task(name="ask-about-verdict")
def file_answer(verdict: dict, root: Path, params: Params) -> dict | None:
    """Ask whoever can answer about an INCONCLUSIVE verdict; file the answer for the decide stage."""
    if verdict.get("verdict") != INCONCLUSIVE:
        return None
    answer = ask_person(verdict, params.gate.decision_timeout_seconds, decision_mode())
    if answer is not None:
        digest = sha256_of(root / params.paths.verdict)
        write_json(answer_file(root / params.paths.gate_answers, digest), {**answer, "verdict_sha256": digest})
    return answer


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
        raise InternalError(f"dvc push to remote {name!r} failed: {pushed.stderr.strip() or pushed.stdout.strip()}")
    get_run_logger().info(pushed.stdout.strip())
    return name


@task(name="record-history")
def save_to_history(project_dir: Path, params: Params, run_id: str, stages: list[str]) -> str:
    """Keep this run as a DVC experiment (`dvc exp save`): params.yaml as the run used it, dvc.lock (the data's
    md5), the metrics with intervals, the verdict and the plots' data. Later runs add their own; `dvc exp
    show` lists them and `dvc metrics diff` / `dvc plots diff` compare any two. A failure here is logged,
    never the reason a run fails."""
    logger = get_run_logger()
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=project_dir, capture_output=True)
    if head.returncode != 0:
        logger.warning("run history needs a git commit in the project (commit once): this run is not recorded")
        return ""
    kept = [params.paths.metrics, params.paths.verdict, params.paths.decision, params.paths.train_log,
            params.paths.confusion_rows, params.paths.run_record]
    name = f"run-{run_id[:8]}"
    include = [arg for path in kept if (project_dir / path).is_file() for arg in ("--include-untracked", str(path))]
    # Only the stages this run ran are committed into the experiment's dvc.lock: a run that stopped at the gate
    # does not claim to have packaged anything.
    saved = subprocess.run(dvc_command("exp", "save", "--quiet", "--name", name, *include, *stages), cwd=project_dir,
                           env=stage_environment(), capture_output=True, text=True)
    if saved.returncode != 0:
        logger.warning("could not record the run in the history (dvc exp save): %s",
                       saved.stderr.strip() or saved.stdout.strip())
        return ""
    logger.info("recorded as DVC experiment %s (dvc exp show; dvc metrics diff %s <other>)", name, name)
    return name


def publish_html_report(root: Path, params: Params, stages: list[str], run_id: str) -> Path:
    """Write the run's one-page HTML report (every report, plot and the verdict) and link it from the run."""
    from tasks.monitoring import read_history
    from tasks.report import html_report

    sections = [(params.report_file(stage).stem, json_file(root / params.report_file(stage)))
                for stage in stages if (root / params.report_file(stage)).is_file()]
    figures = {"shift": sorted((root / params.paths.shift_plots).glob("*.png")),
               "evaluate": sorted((root / params.paths.evaluation).glob("*.png"))}
    page = root / params.paths.html_report
    try:
        history = read_history(root / params.paths.performance_history)
    except DataError as exc:  # a damaged history must not cost the run its report
        get_run_logger().warning("performance history left out of the report: %s", exc)
        history = []
    page.write_text(html_report(sections, figures, f"regraft run {run_id}", root / params.paths.train_log, history),
                    encoding="utf-8")
    create_link_artifact(key="run-report", link=page.as_uri(), link_text="HTML report of this run",
                         description="validation, shift plots, training curves, metrics, groups and verdict")
    return page


def keep_verdict(kept_reports: Path, root: Path, params: Params) -> None:
    """The verdict is written on every run, pass or fail: put the failed run's verdict (and decision) back."""
    for path in (params.paths.verdict, params.paths.decision):
        kept = kept_reports / path.relative_to(params.paths.reports)
        if kept.is_file():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kept, root / path)


@flow(name="retrain", log_prints=True)
def retrain(parameters: RetrainParameters = RetrainParameters()) -> dict:
    """Run every stage of dvc.yaml in order; all or nothing; one run per project at a time. The project is
    where the run was started (tasks.config.project_root), not a parameter anyone can point elsewhere."""
    root = project_root()
    # A worker may not have been started by `regraft`: what this run writes is the owner's alone all the same.
    os.umask(PRIVATE_UMASK)
    # Refuse a bad override now, not after waiting behind another run for the lock; checked again under it.
    check_overrides_before_lock(root, parameters.as_overrides())
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S"))
    current = load_params(root / "params.yaml")
    what, wait = f"retrain run {run_id}", current.schedule.lock_timeout_seconds
    with run_slot(current.project.name, what, wait, logger.warning), \
            project_lock(root / current.paths.state, what, wait, on_wait=logger.warning):
        for note in clear_stale_dvc_locks(root):
            logger.warning("removed a stale DVC lock record: %s", note)
        for note in recover_interrupted(root, root / current.paths.state / "runs", SNAPSHOT):
            logger.warning("recovered from an interrupted run: %s", note)
        finished = finish_interrupted_promotion(load_params(root / "params.yaml"))
        if finished:
            logger.warning("recovered from an interrupted promotion: %s", finished)
        # The gate's champion is the registry's production model in the remote, whatever this worker had.
        installed = install_champion_from_remote(load_params(root / "params.yaml"))
        if installed:
            logger.warning("%s", installed)
        # Read after taking the lock: the run before may have changed params.yaml.
        return run_all_stages(root, parameters, run_id)


def run_all_stages(root: Path, parameters: RetrainParameters, run_id: str) -> dict:
    overrides = parameters.as_overrides()
    params = check_overrides(root, overrides)
    stages = stage_order(root)
    runs = root / params.paths.state / "runs"
    snapshot = take_snapshot(
        root, [PARAMS_FILE, Path("dvc.lock"), params.paths.reports, *stage_outputs(root)], runs / run_id / SNAPSHOT
    )
    reports: dict[str, dict] = {}
    started: list[str] = []
    history: str | None = None
    try:
        if overrides:
            write_overrides(root / PARAMS_FILE, overrides)
        record_run(root, params, run_id, overrides)
        for stage in stages:
            started.append(stage)
            if stage == DECIDE_STAGE and "gate" in reports:
                file_answer(reports["gate"], root, params)
            reports[stage] = run_stage.with_options(name=stage)(
                stage, root, params.report_file(stage), params.schedule.stage_timeout_seconds,
                stage_progress_file(root / params.paths.state, stage))
        report_page = publish_html_report(root, params, stages, run_id)
        history = save_to_history(root, params, run_id, started)
        remote = push_outputs(root) if parameters.push else ""
    except BaseException as exc:
        # Keep what the failed run wrote for inspection, then put the last good state back.
        kept = runs / run_id / "failed-reports"
        if (root / params.paths.reports).exists():
            shutil.copytree(root / params.paths.reports, kept, dirs_exist_ok=True)
        if "gate" in started and history is None and isinstance(exc, Exception):
            save_to_history(root, params, run_id, started)  # a FAIL or rejected verdict is history too
        restore(snapshot)
        discard(snapshot)
        prune_failed_runs(runs, params.schedule.keep_failed_runs)
        if "gate" in started:
            keep_verdict(kept, root, params)
        if isinstance(exc, Exception):
            verdict = gate_verdict(root / params.paths.verdict) if "gate" in started else None
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            tell(RUN_FAILED, f"retrain run failed at stage {started[-1] if started else 'start'}: {first_line}",
                 verdict, stage=started[-1] if started else None, failed_reports=str(kept))
        if isinstance(exc, RegraftError):
            verdict_note = " (except the verdict and decision of this run)" if "gate" in started else ""
            raise type(exc)(
                f"{exc}\nThe failed run's reports are in {kept}; data, models, reports{verdict_note}, dvc.lock "
                "and params.yaml are back to what they were before the run."
            ) from None
        raise
    # Overrides belong to this run: params.yaml is as it was before; dvc.lock and reports/run.json say what
    # this run used, so the model it made stays reproducible.
    restore(snapshot, only=(PARAMS_FILE,))
    discard(snapshot)
    shutil.rmtree(runs / run_id, ignore_errors=True)
    return {"stages": stages, "reports": reports, "pushed_to": remote, "history": history, "overrides": overrides,
            "reports_dir": str(root / params.paths.reports), "html_report": str(report_page)}


def tell(event: str, summary: str, verdict: str | None, **details: Any) -> None:
    """Emit a notification event; a failure to emit is logged, never the reason a run fails."""
    try:
        notify(event, "project", summary, verdict, **details)
    except Exception as exc:  # the event system is a side channel
        get_run_logger().warning("could not emit %s: %s", event, exc)


def record_run(root: Path, params: Params, run_id: str, overrides: dict[str, Any]) -> None:
    """reports/run.json: this run's id, its overrides and every parameter in force; also a Prefect artifact."""
    write_json(root / params.paths.run_record, {"run_id": run_id, "overrides": overrides,
                                                "params": params.model_dump(mode="json", by_alias=True)})
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in overrides.items()) or "| (none) | |"
    create_markdown_artifact(key="run-parameters", description="what this run changed in params.yaml",
                             markdown=f"# Overrides of this run\n\n| key | value |\n|---|---|\n{rows}\n\n"
                                      "params.yaml itself is unchanged after the run; dvc.lock records the values used.")
