"""Prefect flow `retrain`: the stages of dvc.yaml, in DAG order, one Prefect task per stage.

Each task runs `dvc repro --single-item <stage>`, so dvc.lock is written by DVC exactly as
`dvc repro` writes it, then publishes the stage's report as a Markdown artifact. A failed run
restores data, reports, dvc.lock and params.yaml to what they were before it started.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.dag import stage_order, stage_outputs
from flows.workspace import discard, restore, take_snapshot
from tasks import finetune as finetune_task
from tasks import ingest as ingest_task
from tasks import shift as shift_task
from tasks import validate as validate_task
from tasks.config import load_params, parse_override, write_overrides
from tasks.errors import RegraftError

RENDERERS = {
    "ingest": ingest_task.render_markdown,
    "validate": validate_task.render_markdown,
    "shift": shift_task.render_markdown,
    "finetune": finetune_task.render_markdown,
}


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


def stage_environment() -> dict[str, str]:
    """The stage commands (`python -m pipelines...`) must run on this interpreter."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


@task(name="stage", task_run_name="{stage}")
def run_stage(stage: str, project_dir: Path, reports_dir: Path) -> dict:
    """Run one dvc.yaml stage through DVC, stream its output into the Prefect log, publish its report."""
    logger = get_run_logger()
    process = subprocess.Popen(
        dvc_command("repro", "--single-item", stage), cwd=project_dir, env=stage_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    tail: deque[str] = deque(maxlen=40)
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line and not line.lstrip().startswith(DVC_GIT_HINTS):
            logger.info(line)
            tail.append(line)
    if process.wait() != 0:
        shown = [t for t in tail if not t.startswith(("Having any troubles", "ERROR: failed to reproduce"))]
        raise StageFailed(f"stage {stage!r} failed:\n" + "\n".join(shown))
    report_file = project_dir / reports_dir / f"{stage}.json"
    if not report_file.is_file():
        raise StageFailed(f"stage {stage!r} wrote no report at {report_file}")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    render = RENDERERS.get(stage, lambda r: f"# {stage}\n\n```json\n{json.dumps(r, indent=2)[:20000]}\n```\n")
    create_markdown_artifact(key=f"{stage}-report", markdown=render(report), description=f"regraft {stage} report")
    return report


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


@flow(name="retrain", log_prints=True)
def retrain(parameters: RetrainParameters = RetrainParameters(), project_dir: str = ".") -> dict:
    """Run every stage of dvc.yaml in order; all or nothing."""
    root = Path(project_dir).resolve()
    overrides = parameters.as_overrides()
    params = load_params(root / "params.yaml", overrides)
    stages = stage_order(root)
    run_id = str(flow_run.get_id() or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S"))
    run_dir = root / params.paths.state / "runs" / run_id
    snapshot = take_snapshot(
        root, [Path("params.yaml"), Path("dvc.lock"), params.paths.reports, *stage_outputs(root)], run_dir / "before"
    )
    reports: dict[str, dict] = {}
    try:
        if overrides:
            write_overrides(root / "params.yaml", overrides)
        for stage in stages:
            reports[stage] = run_stage.with_options(name=stage)(stage, root, params.paths.reports)
        remote = push_outputs(root) if parameters.push else ""
    except BaseException as exc:
        # Keep what the failed run wrote for inspection, then put the last good state back.
        kept = run_dir / "failed-reports"
        if (root / params.paths.reports).exists():
            shutil.copytree(root / params.paths.reports, kept, dirs_exist_ok=True)
        restore(snapshot)
        if isinstance(exc, RegraftError):
            raise type(exc)(
                f"{exc}\nThe failed run's reports are in {kept}; data, reports, dvc.lock and params.yaml "
                "are back to what they were before the run."
            ) from None
        raise
    discard(snapshot)
    return {"stages": stages, "reports": reports, "pushed_to": remote,
            "reports_dir": str(root / params.paths.reports)}
