"""An INCONCLUSIVE gate in a flow run: a person answers through the Prefect API (what the UI's Resume
form sends), or the pause times out and rejects, or the terminal asks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from prefect import flow

from flows.retrain import decide_inconclusive
from tasks.config import GateConfig

pytestmark = pytest.mark.integration
VERDICT = {"stage": "gate", "verdict": "INCONCLUSIVE", "criteria": [], "inconclusive": ["worst group: condition=A accuracy"],
           "insufficient_data": [], "notes": [], "decision": None, "failed": [], "champion": False}


def gate_config(timeout: int) -> GateConfig:
    return GateConfig(alpha=0.05, floors=[], non_inferiority={"metric": "accuracy", "delta": 0.1},
                      worst_group={"metrics": ["accuracy"], "floor": 0.5},
                      disparity={"metric": "accuracy", "max_gap": 0.3, "max_increase": 0.1},
                      forgetting={"metric": "accuracy", "max_drop": 0.1}, on_inconclusive="reject",
                      decision_timeout_seconds=timeout)


@flow
def decide_and_record(out: str, timeout: int, mode: str) -> dict:
    decided = decide_inconclusive(VERDICT, gate_config(timeout), mode)
    Path(out).write_text(json.dumps(decided))
    return decided


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
        "state", decide_and_record(str(out), 120, "pause", return_state=True)))
    thread.start()
    resume_flow_run(paused_run_id(), run_input={"approve": True, "reason": "groups checked by hand", "reviewer": "ana"})
    thread.join(timeout=120)
    assert states["state"].is_completed()
    decision = json.loads(out.read_text())["decision"]
    assert decision["approved"] is True and decision["by"] == "ana" and decision["reason"] == "groups checked by hand"


def test_nobody_answers_and_the_timeout_rejects(prefect_api, tmp_path):
    out = tmp_path / "decision.json"
    decide_and_record(str(out), 2, "pause", return_state=True)
    decision = json.loads(out.read_text())["decision"]
    assert decision["approved"] is False and decision["by"] == "timeout"


@pytest.mark.parametrize("reply,approved", [("y", True), ("", False)])
def test_the_terminal_asks(prefect_api, tmp_path, monkeypatch, reply, approved):
    answers = iter([reply, "looked at it"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    out = tmp_path / "decision.json"
    decide_and_record(str(out), 60, "prompt")
    decision = json.loads(out.read_text())["decision"]
    assert decision["approved"] is approved and decision["reason"] == "looked at it"
    assert decision["by"].startswith("terminal")
