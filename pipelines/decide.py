"""DVC stage `decide`: the verdict -> the decision (paths.decision), a record of its own that package
and promote read. PASS and FAIL decide themselves; an INCONCLUSIVE verdict takes the answer a person gave
for exactly this verdict (the retrain flow asks through the Prefect UI or the terminal and files it under
paths.gate_answers), else gate.on_inconclusive. Exit 1 when the candidate is not approved."""

from __future__ import annotations

import sys

from pipelines.stage_io import run_stage
from tasks.config import Params
from tasks.errors import CheckFailed, ReportError
from tasks.files import sha256_of
from tasks.gate import INCONCLUSIVE, answer_file, decide_on_verdict, read_answer
from tasks.render import decision_markdown
from tasks.reports import Verdict, read_report, write_report


def main(params: Params) -> int:
    path = params.paths.verdict
    try:
        verdict = read_report(path, Verdict)
    except ReportError as exc:
        raise CheckFailed(f"no readable verdict ({exc}); nothing is approved without one") from None
    digest = sha256_of(path)
    answer = read_answer(answer_file(params.paths.gate_answers, digest)) if verdict.verdict == INCONCLUSIVE else None
    decision = decide_on_verdict(verdict, digest, params.gate.on_inconclusive, answer)
    write_report(params.paths.decision, decision)
    print(decision_markdown(decision))
    if not decision.approved:
        undecided = "".join(f"\n  {name}" for name in decision.undecided)
        print(f"error: gate {decision.verdict} and rejected by {decision.by}: {decision.reason}{undecided}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_stage(main)
