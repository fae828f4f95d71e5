"""Prefect flow `retrain`: the stages of dvc.yaml, in DAG order, one Prefect task per stage.

Each task runs `dvc repro --single-item <stage>`, so dvc.lock is written by DVC exactly as
`dvc repro` writes it, then publishes the stage's report as a Markdown artifact. A failed run
restores data, reports, dvc.lock and params.yaml to what they were before it started. The flow
decides nothing itself: the gate stage writes the verdict, the decide stage the decision; the flow
only asks a person when the verdict is INCONCLUSIVE and files the answer for the decide stage.

Around it: flows/run_form.py (what a person may change for a run), flows/dvc_stage.py (one stage as a task),
flows/gate_answer.py (asking a person), flows/run_record.py (run.json, the HTML report, the history, the push).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.concurrency import project_lease, run_slot
from flows.dag import stage_order, stage_outputs
from flows.dvc_stage import run_stage, stage_progress_file
from flows.gate_answer import file_answer
from flows.notifications import RUN_FAILED, tell
from flows.run_form import RetrainParameters
from flows.run_record import check_hermetic_remote, publish_html_report, push_outputs, record_run, save_to_history
from flows.workspace import discard, prune_failed_runs, recover_interrupted, restore, take_snapshot
from tasks.config import Params, hermetic_checkout, load_params, project_root, write_overrides
from tasks.errors import RegraftError, ReportError
from tasks.files import PRIVATE_UMASK
from tasks.locking import clear_stale_dvc_locks, project_lock
from tasks.overrides import check_overrides, check_overrides_before_lock
from tasks.promotion import finish_interrupted_promotion, install_champion_from_remote
from tasks.reports import Verdict, read_report

# The stage before which an INCONCLUSIVE verdict is put to a person.
DECIDE_STAGE = "decide"
PARAMS_FILE = Path("params.yaml")
# A run's copy of what it may change, under paths.state/runs/<run id>/.
SNAPSHOT = "before"


def gate_verdict(path: Path) -> str | None:
    """PASS, FAIL or INCONCLUSIVE from a verdict file, or None when there is no valid one."""
    try:
        return read_report(path, Verdict).verdict
    except ReportError:
        return None


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
    check_hermetic_remote(root)
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S"))
    current = load_params(root / "params.yaml")
    what, wait = f"retrain run {run_id}", current.schedule.lock_timeout_seconds
    with run_slot(current.project.name, what, wait, logger.warning), \
            project_lock(root / current.paths.state, what, wait, on_wait=logger.warning), \
            project_lease(current, what, wait, logger.warning):
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
                file_answer(root, params)
            reports[stage] = run_stage.with_options(name=stage)(
                stage, root, params.report_file(stage), params.schedule.stage_timeout_seconds,
                stage_progress_file(root / params.paths.state, stage))
        report_page = publish_html_report(root, params, stages, run_id)
        history = save_to_history(root, params, run_id, started)
        # A run whose checkout dies with it pushes whatever the form said: nothing may stay only on the worker.
        remote = push_outputs(root) if parameters.push or hermetic_checkout() else ""
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
