"""A person's answer to an INCONCLUSIVE verdict: asked through the Prefect UI's Resume form for deployment runs, at
the terminal when there is one, else of nobody; filed under paths.gate_answers for the decide stage, which decides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment
from pydantic import Field

from flows.notifications import GATE_PAUSED, tell
from tasks.config import Params
from tasks.files import sha256_of, write_json
from tasks.gate import INCONCLUSIVE, answer_file
from tasks.render import verdict_markdown
from tasks.reports import Verdict, read_report


class GateDecision(RunInput):
    """What a person answers when the gate is INCONCLUSIVE (the form in the Prefect UI)."""

    approve: bool = Field(description="Let this candidate go on to packaging and promotion despite the INCONCLUSIVE verdict.")
    reason: str = Field(min_length=3, description="Why; recorded in the decision (reports/decision.json).")
    reviewer: str = Field(default="", description="Who decides (name or e-mail).")


def decision_mode() -> str:
    """Who answers an INCONCLUSIVE gate: a person through the Prefect UI when the run came from a
    deployment, the person at the terminal when there is one, else nobody (gate.on_inconclusive decides)."""
    if deployment.get_id():
        return "pause"
    if sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty():
        return "prompt"
    return "policy"


def ask_person(verdict: Verdict, timeout_seconds: int, mode: str) -> dict | None:
    """A person's answer to an INCONCLUSIVE verdict ({approved, by, reason}), or None when there is nobody
    to ask or nobody answers in time."""
    logger = get_run_logger()
    if mode == "pause":
        logger.warning("gate INCONCLUSIVE: waiting up to %s s for a decision (resume this run in the Prefect UI)",
                       timeout_seconds)
        tell(GATE_PAUSED, f"gate INCONCLUSIVE on {', '.join(verdict.inconclusive) or 'some criteria'}: "
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
def file_answer(root: Path, params: Params) -> dict | None:
    """Ask whoever can answer about an INCONCLUSIVE verdict (the gate's file, which the answer is filed for by its
    sha256); file the answer for the decide stage."""
    verdict = read_report(root / params.paths.verdict, Verdict)
    if verdict.verdict != INCONCLUSIVE:
        return None
    answer = ask_person(verdict, params.gate.decision_timeout_seconds, decision_mode())
    if answer is not None:
        digest = sha256_of(root / params.paths.verdict)
        write_json(answer_file(root / params.paths.gate_answers, digest), {**answer, "verdict_sha256": digest})
    return answer
