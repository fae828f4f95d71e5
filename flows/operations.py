"""Prefect flows for operating regraft: promote, rollback, and shift-watch (serving traffic vs the
production model's training data; a moderate or severe shift emits `regraft.shift.detected`). Each emits
its event for notifications (flows/notifications.py)."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.notifications import MODEL_PROMOTED, MODEL_ROLLED_BACK, SHIFT_DETECTED, notify
from tasks.config import load_params, project_root


def in_project() -> Path:
    """The project these flows were deployed for; stage code reads params.yaml paths relative to it."""
    root = project_root()
    os.chdir(root)
    return root


@flow(name="promote", log_prints=True)
def promote(tag: str, reason: str = "promoted from Prefect", by: str = "prefect") -> dict:
    """Make a packaged model (PASS or approved) the production model."""
    from tasks.promotion import promote_model

    root = in_project()
    record = promote_model(load_params(root / "params.yaml"), tag, reason, by)
    print(f"{tag} is now in production; {record['versioning']}")
    announce(MODEL_PROMOTED, record)
    return record["history"][-1]


@flow(name="rollback", log_prints=True)
def rollback(reason: str = "rolled back from Prefect", by: str = "prefect") -> dict:
    """Put the previous production model back."""
    from tasks.promotion import rollback as rollback_model

    root = in_project()
    record = rollback_model(load_params(root / "params.yaml"), reason, by)
    print(f"{record['production']} is back in production; {record['versioning']}")
    announce(MODEL_ROLLED_BACK, record)
    return record["history"][-1]


def announce(event: str, record: dict) -> None:
    """Tell whoever listens (notifications, other automations) that production changed."""
    change = record["history"][-1]
    what = "promoted to production" if event == MODEL_PROMOTED else "rolled back into production"
    notify(event, f"model.{change['tag']}", f"{change['tag']} {what} (was {change.get('previous') or 'nothing'}) "
           f"by {change['by']}: {change['reason']}", change.get("verdict"), tag=change["tag"],
           previous=change.get("previous"), by=change["by"], reason=change["reason"])


@flow(name="shift-watch", log_prints=True)
def shift_watch(max_rows: int = 2000) -> dict:
    """Compare recent served texts with the production model's training data; on a moderate or severe
    shift, emit a `regraft.shift.detected` event (an automation on it starts `retrain`)."""
    from tasks.monitoring import watch_traffic
    from tasks.registry import read_record
    from tasks.render import shift_markdown

    root = in_project()
    params = load_params(root / "params.yaml")
    if not read_record(params.paths.registry).get("production"):
        # A scheduled watch on a project that serves nothing yet has nothing to compare: not a failure.
        get_run_logger().info("no production model yet (%s): nothing is served, nothing to watch", params.paths.registry)
        return {"verdict": "skipped", "reasons": ["no production model"]}
    report = watch_traffic(params, max_rows)
    create_markdown_artifact(key="shift-watch-report", markdown=shift_markdown(report),
                             description="serving traffic vs the production model's training data")
    if report["verdict"] in ("moderate", "severe"):
        notify(SHIFT_DETECTED, f"model.{report['production_model']}",
               f"{report['verdict']} shift in the last {report['served_rows']} served texts of "
               f"{report['production_model']}: " + "; ".join(report["reasons"]), report["verdict"],
               reasons=report["reasons"], production_model=report["production_model"], served_rows=report["served_rows"])
        get_run_logger().warning("shift %s in serving traffic: event %s emitted", report["verdict"], SHIFT_DETECTED)
    return {"verdict": report["verdict"], "reasons": report["reasons"]}
