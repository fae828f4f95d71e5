"""Who is told what: regraft's flows emit Prefect events at the moments a person must know about, and
`regraft ui` keeps one Prefect automation that sends each of them to the webhook in `notify.webhook_url`
(a Slack or Teams incoming webhook, or any URL that takes a JSON POST) through a Custom Webhook block.

Events (payload: summary, verdict, link to the flow run in the UI, and what the event is about):
- regraft.run.failed: a retrain run ended without a model (a gate FAIL, a rejected verdict, a failed stage);
- regraft.gate.paused: an INCONCLUSIVE gate waits for a person's decision;
- regraft.model.promoted, regraft.model.rolled-back: production changed;
- regraft.shift.detected: shift-watch found a moderate or severe shift in serving traffic;
- regraft.performance.degraded: shift-watch estimates, with confidence, that the production model does worse on
  serving traffic than validated, by more than monitor.max_drop.
"""

from __future__ import annotations

from typing import Any

RUN_FAILED = "regraft.run.failed"
GATE_PAUSED = "regraft.gate.paused"
MODEL_PROMOTED = "regraft.model.promoted"
MODEL_ROLLED_BACK = "regraft.model.rolled-back"
SHIFT_DETECTED = "regraft.shift.detected"
PERFORMANCE_DEGRADED = "regraft.performance.degraded"
NOTIFIED_EVENTS = (RUN_FAILED, GATE_PAUSED, MODEL_PROMOTED, MODEL_ROLLED_BACK, SHIFT_DETECTED, PERFORMANCE_DEGRADED)

BLOCK_NAME = "regraft-notifications"
AUTOMATION_NAME = "regraft: notify"
# The automation fills these from the event; the webhook block puts subject and body into its JSON.
SUBJECT = "regraft {{ event.event }}: {{ event.payload.summary }}"
BODY = "{{ event.payload.summary }}\nverdict: {{ event.payload.verdict }}\nrun: {{ event.payload.link }}"


def run_link() -> str:
    """The Prefect UI page of the flow run this is called in ("" outside a run or without a UI)."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    run_id, ui = flow_run.get_id(), PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if run_id and ui else ""


def notify(event: str, subject: str, summary: str, verdict: str | None, **details: Any) -> None:
    """Emit one regraft event about `subject` (a model tag or the project); the automation turns it into a message."""
    from prefect.events import emit_event

    emit_event(event=event, resource={"prefect.resource.id": f"regraft.{subject}"},
               payload={"summary": summary, "verdict": verdict or "none", "link": run_link(), **details})


def ensure_notifications(webhook_url: str) -> str:
    """Create or update the webhook block and the automation that sends every regraft event to it (idempotent:
    `regraft ui` calls it on each start). An empty URL removes the automation."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger

    try:
        Automation.read(name=AUTOMATION_NAME).delete()
    except ValueError:
        pass  # none yet
    if not webhook_url:
        return "notifications off (set notify.webhook_url)"
    block = CustomWebhookNotificationBlock(name=BLOCK_NAME, url=webhook_url, method="POST",
                                           json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"})
    block_id = block.save(BLOCK_NAME, overwrite=True)
    Automation(
        name=AUTOMATION_NAME,
        description="Send regraft's run, gate, promotion, shift and performance events to notify.webhook_url.",
        trigger=EventTrigger(expect=set(NOTIFIED_EVENTS), match={"prefect.resource.id": "regraft.*"},
                             posture="Reactive", threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return f"notifications of {', '.join(NOTIFIED_EVENTS)} go to the webhook in notify.webhook_url"
