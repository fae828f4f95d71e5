"""`make demo`'s path end to end with the bundled model: the suite's one real run, in a file of its own so that
a test worker starts it first and the rest of the suite runs beside it (tests/conftest.py orders the files)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import make_project, run
from tests.integration.test_retrain_flow import REGRAFT, STAGES

pytestmark = pytest.mark.integration


@pytest.mark.timeout(1800)
def test_the_demo_runs_end_to_end_with_the_bundled_model(tmp_path):
    """`make demo`'s path: the real all-MiniLM-L6-v2 on the demo data, every stage, a temporary Prefect API.
    Cheaper than the demo where it changes no wiring: one epoch of 64-token texts (fp32 LoRA on a CPU without
    bf16 takes 80 s an epoch at 256 tokens on two threads; shift, evaluate and package embed and predict at the
    same length), fewer null splits, permutations and resamples, and gate criteria
    that do not depend on how far one epoch gets (the baselines' margin among them)."""
    from tasks.config import write_overrides

    project = make_project(tmp_path / "demo", tmp_path / "remote")
    write_overrides(project / "params.yaml", {
        "train.epochs": 1, "model.max_length": 64, "shift.null_splits": 5, "shift.bootstrap": 50, "shift.permutations": 50,
        "evaluate.bootstrap": 200,
        "gate.floors": [], "gate.worst_group.floor": 0.0, "gate.disparity.max_gap": 1.0, "gate.baselines.margin": 1.0})
    done = run([REGRAFT, "run"], project)
    assert "regraft run finished: " + " -> ".join(STAGES) in done.stdout
    assert re.search(r"domain shift: (moderate|severe)", done.stdout)
    # `auto` compares at every size: on the demo's 43 validation rows and, cross-fitted, its 430 target rows.
    finetune = json.loads((project / "reports" / "finetune.json").read_text())
    rows = {row["model"]: row for row in finetune["strategy_evidence"]}
    assert list(rows) == ["tfidf", "feature_extraction", "lora", "full"]
    assert all(rows[name]["cross_fitted"]["rows"] == 430 for name in ("tfidf", "feature_extraction"))
    assert all(row["interval"][0] <= row["validation_macro_f1"] <= row["interval"][1] for row in rows.values())
    assert f"finetune: {finetune['strategy']} on CPU" in done.stdout
    assert f"served as: {finetune['served_model']['served_as']}" in done.stdout
    assert re.search(r"target_holdout\s+108\s+negative 38, neutral 10, positive 60", done.stdout)
    assert "validation passed: 82 expectations on 4 splits" in done.stdout
    # The candidate clears the gate, which shows the demo's tiny per-condition groups as insufficient data.
    assert "# Gate: PASS" in done.stdout and "decision: approved by gate" in done.stdout
    assert re.search(r"worst group: condition, \d+ small groups \| insufficient data", done.stdout)
    assert re.search(r"transfer gain \(candidate - TF-IDF, macro-F1\): [+-]0\.\d+", done.stdout)
    verdict = json.loads((project / "reports" / "verdict.json").read_text())
    assert verdict["verdict"] == "PASS" and verdict["champion"] is False
    # ... and ends with a packaged, smoke-tested model that can be promoted.
    assert re.search(r"packaged regraft-classifier:\S+ \(Bento regraft:\S+\); smoke test: 32 served labels", done.stdout)
    assert "promote it with: regraft promote regraft-classifier:" in done.stdout
    assert "data pushed to DVC remote 'local'" in done.stdout
    assert (project / "models" / "candidate" / "model.safetensors").is_file()
