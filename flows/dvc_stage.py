"""One dvc.yaml stage as a Prefect task: `dvc repro --single-item <stage>` on this interpreter, its output in the
Prefect log, a live bar from its progress records, a timeout, its exit status read as an error the flow can retry
or report, and its report published as a Markdown artifact."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.dvc_output import DVC_GIT_HINTS, DVC_NOISE, is_transient, stage_exit_status
from tasks.config import hermetic_checkout
from tasks.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, CheckFailed, InternalError, RegraftError
from tasks.processes import stop_process_group
from tasks.progress import PROGRESS_FILE_ENV, read_progress
from tasks.render import render_report


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


def stage_environment() -> dict[str, str]:
    """The stage commands (`python -m pipelines...`) must run on this interpreter."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def repro_command(stage: str) -> list[str]:
    """`dvc repro` of one stage. In a fresh clone (a work pool's job) with `--pull`: what the stage needs and what
    it made before (by dvc.lock) comes from the DVC remote, so an unchanged stage is skipped as in a long-lived
    checkout, and a changed one runs."""
    return dvc_command("repro", *(["--pull"] if hermetic_checkout() else []), "--single-item", stage)


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
        repro_command(stage), cwd=project_dir,
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


def json_file(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def publish_report(name: str, report: dict) -> None:
    create_markdown_artifact(key=f"{name}-report", markdown=render_report(name, report),
                             description=f"regraft {name} report")
