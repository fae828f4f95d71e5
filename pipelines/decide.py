"""DVC stage `decide`: the verdict -> the decision (paths.decision), a record of its own that package
and promote read. PASS and FAIL decide themselves; an INCONCLUSIVE verdict takes the answer a person gave
for exactly this verdict (the retrain flow asks through the Prefect UI or the terminal and files it under
paths.gate_answers), else gate.on_inconclusive. Exit 1 when the candidate is not approved."""

from __future__ import annotations

import json
import sys

from pipelines.stage_io import run_stage, write_json
from tasks.config import Params
from tasks.errors import CheckFailed
from tasks.files import sha256_of
from tasks.gate import INCONCLUSIVE, answer_file, decide_on_verdict, read_answer
from tasks.render import decision_markdown


def main(params: Params) -> int:
    path = params.paths.verdict
    try:
        verdict = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"{path}: no readable verdict ({exc}); nothing is approved without one") from None
    digest = sha256_of(path)
    answer = read_answer(answer_file(params.paths.gate_answers, digest)) if verdict.get("verdict") == INCONCLUSIVE else None
    decision = decide_on_verdict(verdict, digest, params.gate.on_inconclusive, answer)
    write_json(params.paths.decision, decision)
    print(decision_markdown(decision))
    if not decision["approved"]:
        undecided = "".join(f"\n  {name}" for name in decision["undecided"])
        print(f"error: gate {decision['verdict']} and rejected by {decision['by']}: {decision['reason']}{undecided}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_stage(main)
