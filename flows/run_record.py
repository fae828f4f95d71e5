"""What a retrain run leaves on record: reports/run.json with its overrides, the one-page HTML report, a DVC
experiment in the run history, and its data and models pushed to the DVC remote."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.dvc_stage import dvc_command, json_file, stage_environment
from tasks.config import Params, hermetic_checkout
from tasks.errors import ConfigError, DataError, InternalError
from tasks.reports import RunRecord, write_report


def default_remote(project_dir: Path) -> str:
    """The project's default DVC remote ("" when none is configured)."""
    remote = subprocess.run(dvc_command("remote", "default"), cwd=project_dir, capture_output=True, text=True)
    return remote.stdout.strip() if remote.returncode == 0 else ""


def check_hermetic_remote(project_dir: Path) -> None:
    """A run whose checkout dies with it (REGRAFT_HERMETIC) must have somewhere to leave its work: refused before any
    stage runs when the project names no default DVC remote (its data, models and, by default, its model remote and
    registry record live there)."""
    if hermetic_checkout() and not default_remote(project_dir):
        raise ConfigError(f"{project_dir}: a hermetic run (REGRAFT_HERMETIC) needs the project's default DVC remote "
                          "for its data, models and registry; none is configured (dvc remote add -d ...), and nothing "
                          "of this run would outlive the job")


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push_outputs(project_dir: Path) -> str:
    """Send data and models to the default DVC remote (transient failures retry)."""
    name = default_remote(project_dir)
    if not name:
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
    md5), the metrics with intervals, the verdict, every stage's report and the plots' data. Later runs add their
    own; `dvc exp show` lists them, `dvc metrics diff` / `dvc plots diff` compare any two, and `dvc exp apply`
    puts a run's reports back. A failure here is logged, never the reason a run fails."""
    logger = get_run_logger()
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=project_dir, capture_output=True)
    if head.returncode != 0:
        logger.warning("run history needs a git commit in the project (commit once): this run is not recorded")
        return ""
    kept = [params.paths.metrics, params.paths.verdict, params.paths.decision, params.paths.train_log,
            params.paths.confusion_rows, params.paths.run_record, *(params.report_file(stage) for stage in stages)]
    if hermetic_checkout():  # the page dies with this checkout otherwise; the experiment carries it to the git remote
        kept.append(params.paths.html_report)
    name = f"run-{run_id[:8]}"
    include = [arg for path in dict.fromkeys(kept) if (project_dir / path).is_file()
               for arg in ("--include-untracked", str(path))]
    # Only the stages this run ran are committed into the experiment's dvc.lock: a run that stopped at the gate
    # does not claim to have packaged anything.
    saved = subprocess.run(dvc_command("exp", "save", "--quiet", "--name", name, *include, *stages), cwd=project_dir,
                           env=stage_environment(), capture_output=True, text=True)
    if saved.returncode != 0:
        logger.warning("could not record the run in the history (dvc exp save): %s",
                       saved.stderr.strip() or saved.stdout.strip())
        return ""
    logger.info("recorded as DVC experiment %s (dvc exp show; dvc metrics diff %s <other>)", name, name)
    if hermetic_checkout():
        push_history(project_dir, name)
    return name


def push_history(project_dir: Path, name: str) -> None:
    """A run in a checkout that dies with it: its experiment goes to the project's git remote (`origin`, where the
    run's code came from), with the data its dvc.lock names to the DVC remote, so any machine lists it
    (`dvc exp list origin`) and gets it back (`dvc exp pull origin <name>`, then `dvc pull`)."""
    pushed = subprocess.run(dvc_command("exp", "push", "origin", name), cwd=project_dir, env=stage_environment(),
                            capture_output=True, text=True)
    if pushed.returncode != 0:
        get_run_logger().warning("could not push the run's history to the git remote (dvc exp push origin %s): %s",
                                 name, pushed.stderr.strip() or pushed.stdout.strip())
    else:
        get_run_logger().info("pushed experiment %s to the git remote origin", name)


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


def record_run(root: Path, params: Params, run_id: str, overrides: dict[str, Any]) -> None:
    """reports/run.json: this run's id, its overrides and every parameter in force; also a Prefect artifact."""
    write_report(root / params.paths.run_record, RunRecord(run_id=run_id, overrides=overrides,
                                                           params=params.model_dump(mode="json", by_alias=True)))
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in overrides.items()) or "| (none) | |"
    create_markdown_artifact(key="run-parameters", description="what this run changed in params.yaml",
                             markdown=f"# Overrides of this run\n\n| key | value |\n|---|---|\n{rows}\n\n"
                                      "params.yaml itself is unchanged after the run; dvc.lock records the values used.")
