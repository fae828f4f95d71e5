"""DVC stage `gate`: evaluation + shift reports -> reports/verdict.json (always), exit 1 on FAIL.

INCONCLUSIVE: inside the retrain flow (REGRAFT_GATE_DECIDER=flow) the flow asks a person and records
the answer; anywhere else (`dvc repro`) gate.on_inconclusive decides at once, so nothing waits for nobody.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from pipelines.stage_io import report_path, run_stage, write_json
from tasks.config import Params
from tasks.gate import FAIL, INCONCLUSIVE, Evidence, judge, promotable, record_decision, render_table

DECIDER_ENV = "REGRAFT_GATE_DECIDER"


def read_evidence(params: Params) -> Evidence:
    """Read what the gate judges; every missing or unreadable file is named, never skipped."""
    problems: list[str] = []

    def read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"{path}: not found")
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: unreadable ({exc})")
        return None

    evaluation = read_json(report_path(params, "evaluate"))
    shift = read_json(report_path(params, "shift"))
    bootstrap = None
    if evaluation is not None:
        path = Path(evaluation.get("bootstrap_file", params.paths.reports / "evaluate" / "bootstrap.parquet"))
        try:
            bootstrap = pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: bootstrap resamples unreadable ({exc})")
    # The shift report's absence is its own criterion; only evaluation files make the whole verdict void.
    problems = [p for p in problems if "shift.json" not in p]
    return Evidence(evaluation=evaluation, bootstrap=bootstrap, shift=shift, problems=problems)


def main(params: Params) -> int:
    verdict = judge(read_evidence(params), params.gate, params.evaluate.small_n)
    if verdict["verdict"] == INCONCLUSIVE and os.environ.get(DECIDER_ENV) != "flow":
        policy = params.gate.on_inconclusive
        verdict = record_decision(verdict, approved=policy == "approve", by="policy",
                                  reason=f"gate.on_inconclusive={policy} (no one to ask outside the retrain flow)")
    write_json(report_path(params, "verdict"), verdict)
    print(render_table(verdict))
    if verdict["verdict"] == FAIL:
        print("error: gate FAIL:\n  " + "\n  ".join(failure_lines(verdict)), file=sys.stderr)
        return 1
    if verdict["decision"] and not promotable(verdict):
        print(f"error: gate INCONCLUSIVE and rejected ({verdict['decision']['reason']}):\n  "
              + "\n  ".join(verdict["inconclusive"]), file=sys.stderr)
        return 1
    return 0


def failure_lines(verdict: dict) -> list[str]:
    return [f"{c['name']}: {c['detail'] or 'value ' + str(c['value'])}" + (
        f" (value {c['value']:.3f}, interval [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}], needs "
        f"{c['direction']} {c['threshold']:.3f})" if c["value"] is not None and c["interval"][0] is not None else "")
        for c in verdict["criteria"] if c["status"] == FAIL]


if __name__ == "__main__":
    run_stage(main)
