"""Prefect flows for operating regraft: promote, rollback, and shift-watch (serving traffic vs the
production model's training data: a moderate or severe shift emits `regraft.shift.detected`; an estimated drop
in performance beyond monitor.max_drop emits `regraft.performance.degraded`). Each emits its event for
notifications (flows/notifications.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.concurrency import run_slot
from flows.notifications import (CANARY_PROMOTED, CANARY_ROLLED_BACK, CANARY_STARTED, MODEL_PROMOTED, MODEL_ROLLED_BACK,
                                 PERFORMANCE_DEGRADED, SHIFT_DETECTED, notify)
from tasks.config import load_params, project_root


def in_project() -> Path:
    """The project these flows were deployed for; stage code reads params.yaml paths relative to it."""
    root = project_root()
    os.chdir(root)
    return root


@flow(name="promote", log_prints=True)
def promote(tag: str, reason: str = "promoted from Prefect", by: str = "prefect",
            rollout: Literal["full", "shadow", "shadow-off", "canary", "canary-off"] = "full",
            fraction: float | None = None) -> dict:
    """Make a packaged model (PASS or approved) the production model; with rollout `shadow`, its shadow candidate
    instead (every serving host predicts each served text with it too, off the response path); `shadow-off` ends
    that shadow (tag: the shadow candidate) without promoting it; `canary` lets it answer `fraction` of the requests
    (0 < fraction < 1) until shift-watch's judged windows promote or roll it back; `canary-off` ends the canary."""
    from tasks.promotion import canary_model, end_canary, end_shadow, promote_model, shadow_model
    from tasks.render import shadow_change_text

    root = in_project()
    params = load_params(root / "params.yaml")
    change = {"full": promote_model, "shadow": shadow_model, "shadow-off": end_shadow, "canary-off": end_canary,
              "canary": lambda params, tag, reason, by: canary_model(params, tag, fraction, reason, by)}[rollout]
    with run_slot(params.project.name, f"promote {tag} ({rollout})", params.schedule.lock_timeout_seconds,
                  get_run_logger().warning):
        record = change(params, tag, reason, by)
    if record.get("finished"):
        print(record["finished"])
    if rollout != "full":
        event = record["history"][-1]
        print(shadow_change_text(event))
        if rollout == "canary":
            notify(CANARY_STARTED, f"model.{tag}", shadow_change_text(event), event.get("verdict"), tag=tag,
                   fraction=fraction, beside=event["beside"], by=event["by"], reason=event["reason"])
        return event
    print(f"{tag} is now in production; {record['versioning']}")
    announce(MODEL_PROMOTED, record)
    return record["history"][-1]


@flow(name="rollback", log_prints=True)
def rollback(reason: str = "rolled back from Prefect", by: str = "prefect") -> dict:
    """Put the previous production model back."""
    from tasks.promotion import rollback as rollback_model

    root = in_project()
    params = load_params(root / "params.yaml")
    with run_slot(params.project.name, "rollback", params.schedule.lock_timeout_seconds, get_run_logger().warning):
        record = rollback_model(params, reason, by)
    if record.get("finished"):
        print(record["finished"])
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
    """Compare recent served texts with the production model's training data and estimate the model's performance
    on them; on a moderate or severe shift, emit `regraft.shift.detected`; on an estimated drop beyond
    monitor.max_drop, `regraft.performance.degraded` (an automation on each starts `retrain`)."""
    from tasks.monitoring import read_history, watch_traffic
    from tasks.registry import read_record
    from tasks.render import performance_markdown, shift_markdown
    from tasks.figures import performance_history_plot
    from tasks.report import png_data_uri

    from tasks.config import hermetic_checkout
    from tasks.errors import RegraftError

    if hermetic_checkout():
        raise RegraftError("shift-watch reads the serving hosts' prediction logs, which a fresh clone does not have: "
                           "run its deployment on a worker on a serving host, in that host's checkout "
                           "(deploy/prefect.yaml's shift-watch: REGRAFT_SERVING_PROJECT, queue `serving`)")
    root = in_project()
    params = load_params(root / "params.yaml")
    if not read_record(params.paths.registry).get("production"):
        # A scheduled watch on a project that serves nothing yet has nothing to compare: not a failure.
        get_run_logger().info("no production model yet (%s): nothing is served, nothing to watch", params.paths.registry)
        return {"verdict": "skipped", "reasons": ["no production model"]}
    report = watch_traffic(params, max_rows)
    performance, model, served = report.performance, report.production_model, report.served_rows
    create_markdown_artifact(key="shift-watch-report", markdown=shift_markdown(report),
                             description="serving traffic vs the production model's training data")
    history = read_history(params.paths.performance_history)
    plot = performance_history_plot(history)
    create_markdown_artifact(key="production-performance",
                             markdown=performance_markdown(performance, history)
                             + (f"\n![estimated and realized accuracy over time]({png_data_uri(plot)})\n" if plot else ""),
                             description="the production model's estimated performance on serving traffic, and its history")
    if report.verdict in ("moderate", "severe"):
        notify(SHIFT_DETECTED, f"model.{model}",
               f"{report.verdict} shift in the last {served} served texts of {model}: " + "; ".join(report.reasons),
               report.verdict, reasons=report.reasons, production_model=model, served_rows=served)
        get_run_logger().warning("shift %s in serving traffic: event %s emitted", report.verdict, SHIFT_DETECTED)
    drop = performance.drop
    if drop.degraded:
        notify(PERFORMANCE_DEGRADED, f"model.{model}",
               f"{model} is estimated at {drop.metric} {drop.estimated:.3f} on its last {served} served texts, "
               f"{drop.drop:.3f} below its validated {drop.validated:.3f} (limit {drop.max_drop:.3f})",
               "degraded", production_model=model, served_rows=served, metric=drop.metric,
               estimated=drop.estimated, interval=drop.interval, validated=drop.validated)
        get_run_logger().warning("estimated %s drop %.3f: event %s emitted", drop.metric, drop.drop,
                                 PERFORMANCE_DEGRADED)
    outcome = judge_running_canary(params)
    publish_running_shadow(params)
    return {"verdict": report.verdict, "reasons": report.reasons, "performance": performance.verdict,
            "estimated": drop.estimated, "degraded": drop.degraded, "canary": outcome}


def publish_running_shadow(params) -> None:
    """Each shift-watch shows the running shadow's comparison with production (none: nothing) as an artifact; a
    shadow only reports, a person decides (`regraft promote`). It leaves reports/shadow.json as `regraft shadow`
    (perhaps with labels) wrote it. A comparison that cannot be made is logged: it must not fail the watch."""
    from tasks.registry import read_record, shadow_of
    from tasks.render import shadow_markdown
    from tasks.shadow import shadow_report

    try:
        if not shadow_of(read_record(params.paths.registry)):
            return
        report = shadow_report(params, write=False)
    except Exception as exc:  # informational: the watch's own results and the canary's judgement stand
        get_run_logger().warning("the shadow was not compared this window: %s", exc)
        return
    create_markdown_artifact(key="shadow-report", markdown=shadow_markdown(report),
                             description="the shadow candidate against production on the texts both predicted")


def judge_running_canary(params) -> str | None:
    """Each shift-watch is a window of the running canary (none: None): judged as `regraft canary` does; a rollback
    or a promotion emits its event. A window that cannot be judged (no logs yet, the canary ended meanwhile) is
    logged and leaves the canary as it was: shift-watch's own results stand."""
    from tasks.errors import RegraftError
    from tasks.promotion import PROMOTED, ROLLED_BACK, judge_canary_window
    from tasks.registry import canary_of, read_record
    from tasks.render import canary_judgement_text, shadow_markdown

    try:
        if not canary_of(read_record(params.paths.registry)):
            return None
        judged = judge_canary_window(params, by="shift-watch")
    except RegraftError as exc:
        get_run_logger().warning("the canary was not judged this window: %s", exc)
        return f"not judged: {exc}"
    report, tag = judged.report, judged.report.candidate
    create_markdown_artifact(key="canary-report", markdown=shadow_markdown(report),
                             description="the canary against production on the texts both predicted")
    print(canary_judgement_text(judged.window, judged.change))
    if judged.outcome == ROLLED_BACK:
        notify(CANARY_ROLLED_BACK, f"model.{tag}", canary_judgement_text(judged.window, judged.change), report.verdict,
               tag=tag, beside=report.production_model, reason=report.reason)
    elif judged.outcome == PROMOTED:
        notify(CANARY_PROMOTED, f"model.{tag}", f"{tag} promoted to production after its canary: "
               f"{judged.change['reason']}", report.verdict, tag=tag, previous=judged.change.get("previous"),
               reason=judged.change["reason"])
    return judged.outcome
