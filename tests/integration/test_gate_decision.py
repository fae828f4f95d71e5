"""An INCONCLUSIVE gate in a flow run: a person answers through the Prefect API (what the UI's Resume
form sends), or the pause times out and nobody has answered (the policy will decide), or the terminal asks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from prefect import flow

from flows.gate_answer import ask_person
from tasks.reports import Verdict

pytestmark = pytest.mark.integration
VERDICT = Verdict(verdict="INCONCLUSIVE", criteria=[], inconclusive=["worst group: condition=A accuracy"],
                  insufficient_data=[], notes=[], failed=[], champion=False)


@flow
def ask_and_record(out: str, timeout: int, mode: str) -> dict | None:
    answer = ask_person(VERDICT, timeout, mode)
    Path(out).write_text(json.dumps(answer))
    return answer


def paused_run_id(timeout: float = 60.0):
    import anyio
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType

    async def find():
        async with get_client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["PAUSED"]))))
                if runs:
                    return runs[0].id
                await anyio.sleep(0.5)
        raise AssertionError("no flow run paused")

    return anyio.run(find)


def test_a_person_approves_through_the_api(prefect_api, tmp_path):
    from prefect.flow_runs import resume_flow_run

    out = tmp_path / "decision.json"
    states = {}
    thread = threading.Thread(target=lambda: states.setdefault(
        "state", ask_and_record(str(out), 120, "pause", return_state=True)))
    thread.start()
    resume_flow_run(paused_run_id(), run_input={"approve": True, "reason": "groups checked by hand", "reviewer": "ana"})
    thread.join(timeout=120)
    assert states["state"].is_completed()
    answer = json.loads(out.read_text())
    assert answer == {"approved": True, "by": "ana", "reason": "groups checked by hand"}


def test_nobody_answers_in_time_and_no_answer_is_filed(prefect_api, tmp_path):
    out = tmp_path / "decision.json"
    ask_and_record(str(out), 2, "pause", return_state=True)
    assert json.loads(out.read_text()) is None  # the decide stage then applies gate.on_inconclusive


@pytest.mark.parametrize("reply,approved", [("y", True), ("", False)])
def test_the_terminal_asks(prefect_api, tmp_path, monkeypatch, reply, approved):
    answers = iter([reply, "looked at it"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    out = tmp_path / "decision.json"
    ask_and_record(str(out), 60, "prompt")
    decision = json.loads(out.read_text())
    assert decision["approved"] is approved and decision["reason"] == "looked at it"
    assert decision["by"].startswith("terminal")
