"""Who is told what: regraft's flows emit Prefect events at the moments a person must know about, and
`regraft ui` keeps one Prefect automation that sends each of them to the webhook in `notify.webhook_url`
(a Slack or Teams incoming webhook, or any URL that takes a JSON POST) through a Custom Webhook block.

Events (payload: summary, verdict, link to the flow run in the UI, and what the event is about):
- regraft.run.failed: a retrain run ended without a model (a gate FAIL, a rejected verdict, a failed stage);
- regraft.gate.paused: an INCONCLUSIVE gate waits for a person's decision;
- regraft.model.promoted, regraft.model.rolled-back: production changed;
- regraft.shift.detected: shift-watch found a moderate or severe shift in serving traffic;
- regraft.performance.degraded: shift-watch estimates, with confidence, that the production model does worse on
  serving traffic than validated, by more than monitor.max_drop;
- regraft.canary.started, regraft.canary.rolled-back, regraft.canary.promoted: a canary answers a share of the
  requests; it was shown worse and production answers everything again; it was shown not worse in its windows and
  is production now.

Where the server may send: the Prefect server of `regraft ui` runs its automations' notification and webhook
actions only to the hosts fixed when `regraft ui` started (notify.allowed_hosts, by default the host of the
webhook URL it was started with). Whoever holds the UI's credential can create blocks and automations, but not
make the server POST anywhere else (server-side request forgery).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from tasks.config import NotifyConfig

RUN_FAILED = "regraft.run.failed"
GATE_PAUSED = "regraft.gate.paused"
MODEL_PROMOTED = "regraft.model.promoted"
MODEL_ROLLED_BACK = "regraft.model.rolled-back"
SHIFT_DETECTED = "regraft.shift.detected"
PERFORMANCE_DEGRADED = "regraft.performance.degraded"
CANARY_STARTED = "regraft.canary.started"
CANARY_ROLLED_BACK = "regraft.canary.rolled-back"
CANARY_PROMOTED = "regraft.canary.promoted"
NOTIFIED_EVENTS = (RUN_FAILED, GATE_PAUSED, MODEL_PROMOTED, MODEL_ROLLED_BACK, SHIFT_DETECTED, PERFORMANCE_DEGRADED,
                   CANARY_STARTED, CANARY_ROLLED_BACK, CANARY_PROMOTED)

# Per project (its name follows), so projects sharing a server keep their own destination and automation.
BLOCK_NAME = "regraft-notifications"
AUTOMATION_NAME = "regraft: notify"
# The hosts the server may send to, handed by `regraft ui` to the Prefect server it starts (comma-separated).
SERVER_DESTINATIONS_ENV = "REGRAFT_SERVER_NOTIFY_HOSTS"
# How `regraft ui` starts the Prefect server: Prefect's own `prefect server start`, in a process whose
# automations are held to the destinations above.
GUARDED_SERVER = ("from flows.notifications import guard_server_destinations; guard_server_destinations(); "
                  "from prefect.cli import app; app()")
# The automation fills these from the event; the webhook block puts subject and body into its JSON.
SUBJECT = "regraft {{ event.payload.project }}: {{ event.event }}: {{ event.payload.summary }}"
BODY = "{{ event.payload.summary }}\nverdict: {{ event.payload.verdict }}\nrun: {{ event.payload.link }}"


def run_link() -> str:
    """The Prefect UI page of the flow run this is called in ("" outside a run or without a UI)."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    run_id, ui = flow_run.get_id(), PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if run_id and ui else ""


def project_resource(project: str) -> str:
    """The resource id of a project's events: its triggers and its notifications match on it, and nothing else's."""
    return f"regraft.project.{project}"


def notify(event: str, subject: str, summary: str, verdict: str | None, **details: Any) -> None:
    """Emit one regraft event of this project (the flow's, REGRAFT_PROJECT), about `subject` (a model tag or the
    project); its automation turns it into a message."""
    from prefect.events import emit_event

    from tasks.config import load_params, project_root

    project = load_params(project_root() / "params.yaml").project.name
    emit_event(event=event, resource={"prefect.resource.id": project_resource(project), "prefect.resource.name": project},
               related=[{"prefect.resource.id": f"regraft.{subject}", "prefect.resource.role": "subject"}],
               payload={"project": project, "summary": summary, "verdict": verdict or "none", "link": run_link(),
                        **details})


def tell(event: str, summary: str, verdict: str | None, **details: Any) -> None:
    """Emit a notification event; a failure to emit is logged, never the reason a run fails."""
    from prefect import get_run_logger

    try:
        notify(event, "project", summary, verdict, **details)
    except Exception as exc:  # the event system is a side channel
        get_run_logger().warning("could not emit %s: %s", event, exc)


def ensure_notifications(webhook_url: str, project: str) -> str:
    """Create or update the webhook block and the automation that sends every regraft event to it (idempotent:
    `regraft ui` calls it on each start). An empty URL removes the automation."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger

    try:
        Automation.read(name=f"{AUTOMATION_NAME} {project}").delete()
    except ValueError:
        pass  # none yet
    if not webhook_url:
        return "notifications off (set notify.webhook_url)"
    block_name = f"{BLOCK_NAME}-{project}"
    block = CustomWebhookNotificationBlock(name=block_name, url=webhook_url, method="POST",
                                           json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"})
    block_id = block.save(block_name, overwrite=True)
    Automation(
        name=f"{AUTOMATION_NAME} {project}",
        description="Send regraft's run, gate, promotion, shift and performance events to notify.webhook_url.",
        trigger=EventTrigger(expect=set(NOTIFIED_EVENTS), match={"prefect.resource.id": project_resource(project)},
                             posture="Reactive", threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return f"notifications of {', '.join(NOTIFIED_EVENTS)} go to the webhook in notify.webhook_url"


def url_host(url: str) -> str:
    """The host of an http(s) URL, lower-case; "" when it has none or is not http(s)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        return ""
    return host.lower() if parts.scheme in ("http", "https") else ""


def allowed_destinations(notify: NotifyConfig, webhook_url: str) -> list[str]:
    """The hosts automations may send to: notify.allowed_hosts when it names any, else the host of the webhook
    URL `regraft ui` was started with (none without one). Raises ConfigError when that URL's host is not allowed."""
    from tasks.errors import ConfigError

    hosts = sorted({h.strip().lower() for h in notify.allowed_hosts if h.strip()})
    if webhook_url:
        host = url_host(webhook_url)
        if not host or "{{" in webhook_url:
            raise ConfigError(f"notify.webhook_url: {webhook_url!r} is not an http(s) URL with a fixed host")
        if not hosts:
            return [host]
        if host not in hosts:
            raise ConfigError(f"notify.webhook_url: the host {host!r} is not in notify.allowed_hosts {hosts}")
    return hosts


def destination_problem(block: Any, allowed: set[str]) -> str | None:
    """Why an automation may not send through `block`, or None: the block must have an http(s) `url` with a
    fixed host among `allowed` (a templated URL could take its host from an event's payload)."""
    url = getattr(block, "url", None)
    if hasattr(url, "get_secret_value"):
        url = url.get_secret_value()
    if not isinstance(url, str):
        return f"a {type(block).__name__} block has no URL regraft can check; only URLs at {sorted(allowed)} are allowed"
    host = url_host(url)
    if not host or "{{" in url:
        return "a templated or non-http(s) URL is not allowed"
    if host not in allowed:
        return f"the host {host!r} is not in notify.allowed_hosts {sorted(allowed)} fixed when `regraft ui` started"
    return None


def guard_server_destinations() -> None:
    """In the Prefect server's own process, before it starts: its automations' send-notification and
    call-webhook actions fail (ActionFailed, shown on the automation) unless their block's URL is at a host fixed
    at start in REGRAFT_SERVER_NOTIFY_HOSTS; the actions service runs in this process."""
    from prefect.server.events import actions

    allowed = {h for h in os.environ.get(SERVER_DESTINATIONS_ENV, "").split(",") if h}

    def checked(load_block):
        async def load_and_check(self, triggered_action):
            block = await load_block(self, triggered_action)
            problem = destination_problem(block, allowed)
            if problem:
                raise actions.ActionFailed(f"regraft: this server sends only to notify.allowed_hosts: {problem}")
            return block
        return load_and_check

    actions.SendNotification._get_notification_block = checked(actions.SendNotification._get_notification_block)
    actions.CallWebhook._get_webhook_block = checked(actions.CallWebhook._get_webhook_block)
