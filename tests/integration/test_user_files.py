"""A project on the user's own files (source.csv, target.csv) through the CLI: the eight corrupted-target cases
stop at validate and keep every earlier result, and the shift block, gate FAIL and INCONCLUSIVE policies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import quick_project, run, tree_digest

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")
DVC = [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def files_project(tmp_path_factory, tiny_bert, prefect_env):
    """A quick project on the user's own files (source.csv, target.csv), after one good run."""
    from tasks.config import write_overrides
    from tasks.ingest import demo_archive_path, read_demo

    project = quick_project(tmp_path_factory.mktemp("files"), tiny_bert)
    raw = read_demo(demo_archive_path())
    is_target = raw["date"].str[-4:].astype(int) >= 2015
    (project / "inputs").mkdir()
    raw[~is_target].to_csv(project / "inputs" / "source.csv", index=False)
    raw[is_target].to_csv(project / "inputs" / "target.csv", index=False)
    write_overrides(project / "params.yaml", {
        "ingest.source": "files", "ingest.split.by": "files",
        "ingest.source_files": ["inputs/source.csv"], "ingest.target_files": ["inputs/target.csv"],
        "train.strategy": "auto", "train.auto_race_epochs": 1, "train.epochs": 2,
    })
    done = run([REGRAFT, "run", "--no-push"], project, env_update=prefect_env)
    # auto raced the strategies on the 43 validation rows (the cheap ones cross-fitted on all 430 target rows).
    finetune = json.loads((project / "reports" / "finetune.json").read_text())
    assert [row["model"] for row in finetune["strategy_evidence"]] == ["tfidf", "feature_extraction", "lora", "full"]
    assert f"finetune: {finetune['strategy']} on " in done.stdout and "validation rows" in finetune["reason"]
    # A random 2-layer encoder cannot beat TF-IDF: the served model is the cheap one, and the run says so plainly.
    assert finetune["served_model"]["cheap"] and "negative transfer on this data" in done.stdout
    return project


def corrupt_target(case: str, path: Path, source: Path) -> None:
    frame = pd.read_csv(path)
    if case == "missing column":
        frame = frame.drop(columns=["review"])
    elif case == "wrong type":
        frame["review"] = range(len(frame))
    elif case == "empty file":
        path.write_bytes(b"")
        return
    elif case == "all-null labels":
        frame["rating"] = None
    elif case == "unknown label":
        frame.loc[frame.index[3], "rating"] = "excellent"
    elif case == "not UTF-8":
        frame.loc[frame.index[0], "review"] = "@@BYTES@@ " + frame.loc[frame.index[0], "review"]
        path.write_bytes(frame.to_csv(index=False).encode().replace(b"@@BYTES@@", b"caf\xe9 \xff"))
        return
    elif case == "duplicate rows":
        frame = pd.concat([frame, frame.head(40)])
    elif case == "holdout/train overlap":
        frame = pd.concat([frame, pd.read_csv(source)])
    frame.to_csv(path, index=False)


BAD_TARGETS = {
    "missing column": "column 'text' is missing (input column 'review')",
    "wrong type": "column 'text' has type int64; expected str",
    "empty file": "target_train: has 0 rows",
    "all-null labels": "column 'label' has 430 missing values",
    "unknown label": "values outside the configured labels; e.g. [{'id':",
    "not UTF-8": "1 texts contain bytes that are not valid UTF-8",
    "duplicate rows": "rows are duplicates (same text and label)",
    # Every source text is in the target file too: ingest keeps shared texts in train (never leakage), so no
    # source holdout is left, and validate says so.
    "holdout/train overlap": "source_holdout: has 0 rows; expected 20 to",
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_target_file_stops_at_validate_and_keeps_results(files_project, case, prefect_env):
    target = files_project / "inputs" / "target.csv"
    original = target.read_bytes()
    before = tree_digest(files_project)
    corrupt_target(case, target, files_project / "inputs" / "source.csv")
    # Repeats are dropped by ingest unless deduplication is off; with it off, validate must catch them.
    extra = ["--set", "ingest.deduplicate=false"] if case == "duplicate rows" else []
    try:
        failed = run([REGRAFT, "run", "--no-push", *extra], files_project, check=False, env_update=prefect_env)
    finally:
        target.write_bytes(original)
    assert failed.returncode == 2, failed.stdout + failed.stderr  # bad input
    # The problem is told once, after the stage's own log lines, without a traceback or Prefect's state echoes.
    assert failed.stderr.count("error: stage 'validate' failed") == 1
    assert "Traceback" not in failed.stderr and "Finished in state Failed" not in failed.stderr
    assert BAD_TARGETS[case] in failed.stderr
    assert "back to what they were before the run" in failed.stderr
    assert tree_digest(files_project) == before


def test_validate_command_on_one_file(files_project, prefect_env):
    good = run([REGRAFT, "validate", "inputs/target.csv"], files_project)
    assert "Validation passed" in good.stdout
    bad = files_project / "bad.csv"
    corrupt_target("unknown label", bad, bad) if bad.exists() else None
    bad.write_bytes((files_project / "inputs" / "target.csv").read_bytes().replace(b",positive,", b",great,", 1))
    failed = run([REGRAFT, "validate", str(bad)], files_project, check=False)
    assert failed.returncode == 1
    assert "bad: column 'label' has 1 values outside the configured labels" in failed.stderr
    # A file with its own column names: columns named text and label are found without being told.
    plain = files_project / "plain.csv"
    pd.read_csv(files_project / "inputs" / "target.csv").rename(columns={"review": "text", "rating": "label"}).to_csv(
        plain, index=False)
    found = run([REGRAFT, "validate", str(plain)], files_project)
    assert "columns from the columns named text and label" in found.stdout and "Validation passed" in found.stdout
    wrong = run([REGRAFT, "validate", str(plain), "--columns", "text=body,label=label"], files_project, check=False)
    assert wrong.returncode == 2 and "--columns names ['body'], which the file does not have" in wrong.stderr
    # JSONL may hold a list or a mapping where a text or a label belongs: exit 2 naming column, row and type.
    nested = files_project / "nested.jsonl"
    nested.write_text('{"text": "a fine review of a drug", "label": "positive"}\n'
                      '{"text": "another fine review", "label": ["positive", "negative"]}\n')
    refused = run([REGRAFT, "validate", str(nested)], files_project, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "nested.jsonl: column 'label' row 2 holds a list; each value must be a single text" in refused.stderr


def test_bad_override_fails_before_anything_runs(files_project, prefect_env):
    before = tree_digest(files_project)
    failed = run([REGRAFT, "run", "--set", "ingest.split.holdout_fraction=2"], files_project, check=False, env_update=prefect_env)
    assert failed.returncode == 2
    assert "ingest.split.holdout_fraction: Input should be less than 1 (got 2)" in failed.stderr
    assert tree_digest(files_project) == before


def test_shift_command_prints_json_with_a_verdict(files_project, prefect_env):
    import json

    out = run([REGRAFT, "shift", "inputs/source.csv", "inputs/target.csv", "--json"], files_project)
    report = json.loads(out.stdout)
    assert report["verdict"] in {"none", "moderate", "severe"}
    label = next(t for t in report["tests"] if t["name"] == "label_shift")
    # The demo's label mix really changes after 2015.
    assert label["flagged"] and label["p_value"] < 1e-3
    for name in ("source", "target"):  # other column names, said with --columns
        pd.read_csv(files_project / "inputs" / f"{name}.csv").rename(columns={"review": "body", "rating": "stars"}).to_csv(
            files_project / f"renamed_{name}.csv", index=False)
    readable = run([REGRAFT, "shift", "renamed_source.csv", "renamed_target.csv", "--columns", "text=body,label=stars"],
                   files_project)
    assert readable.stdout.startswith("# Domain shift: ")
    missing = run([REGRAFT, "shift", "inputs/source.csv", "inputs/nope.csv"], files_project, check=False)
    assert missing.returncode == 2 and "nope.csv: file not found" in missing.stderr


def test_severe_shift_blocks_training_when_configured(files_project, prefect_env):
    before = tree_digest(files_project)
    failed = run([REGRAFT, "run", "--no-push", "--set", "shift.on_severe=block", "--set", "shift.severe_ratio=1.001"],
                 files_project, check=False, env_update=prefect_env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "error: stage 'shift' failed" in failed.stderr
    assert "severe domain shift and shift.on_severe=block, so training does not start" in failed.stderr
    assert "label_shift: total variation of class priors" in failed.stderr
    assert tree_digest(files_project) == before


def test_gate_fail_stops_the_run_lists_the_criteria_and_keeps_the_verdict(files_project, prefect_env):
    before = tree_digest(files_project)
    failed = run([REGRAFT, "run", "--no-push", "--set",
                  "gate.floors=[{split: target_holdout, metric: accuracy, min: 0.99}]"], files_project, check=False,
                 env_update=prefect_env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "error: stage 'gate' failed" in failed.stderr
    assert "floor: target_holdout accuracy" in failed.stderr and "needs >= 0.990" in failed.stderr
    verdict = json.loads((files_project / "reports" / "verdict.json").read_text())
    assert verdict["verdict"] == "FAIL" and verdict["failed"] == ["floor: target_holdout accuracy"]
    # Everything else, the candidate model included, is as before the run.
    after = tree_digest(files_project)
    assert {k: v for k, v in after.items() if k != "reports/verdict.json"} == {
        k: v for k, v in before.items() if k != "reports/verdict.json"}


def test_inconclusive_gate_without_anyone_to_ask_applies_the_policy(files_project, prefect_env):
    # A floor at exactly the candidate's measured accuracy: the evidence cannot say which side it is on.
    accuracy = json.loads((files_project / "reports" / "evaluate.json").read_text())[
        "splits"]["target_holdout"]["models"]["candidate"]["overall"]["accuracy"]
    floor = f"gate.floors=[{{split: target_holdout, metric: accuracy, min: {accuracy}}}]"
    failed = run([REGRAFT, "run", "--no-push", "--set", floor, "--set", "gate.on_inconclusive=reject"],
                 files_project, check=False, env_update=prefect_env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "gate INCONCLUSIVE and rejected by policy: gate.on_inconclusive=reject" in failed.stderr
    verdict = json.loads((files_project / "reports" / "verdict.json").read_text())
    assert verdict["verdict"] == "INCONCLUSIVE" and verdict["inconclusive"] == ["floor: target_holdout accuracy"]
    decision = json.loads((files_project / "reports" / "decision.json").read_text())
    assert decision["approved"] is False and decision["by"] == "policy"
    approved = run([REGRAFT, "run", "--no-push", "--set", floor, "--set", "gate.on_inconclusive=approve"],
                   files_project, env_update=prefect_env)
    assert "decision: approved by policy" in approved.stdout
    status = run(DVC + ["status", "gate", "decide"], files_project).stdout
    assert "changed outs" not in status, status  # verdict and decision are each their stage's own output


def test_the_packaged_model_card_carries_the_target_holdout_groups_and_verdict(files_project):
    """The card in the packaged model (huggingface_hub ModelCard): model-index entries for the target holdout and
    each group, equal to reports/evaluate.json, and the verdict; its sha256 is the one the registry checks."""
    from huggingface_hub import ModelCard

    from tasks.registry import read_record, verify_files

    tag = json.loads((files_project / "reports" / "package.json").read_text())["model"]
    name, version = tag.split(":")
    folder = files_project / ".regraft" / "bentoml" / "models" / name / version
    card = ModelCard.load(folder / "README.md")
    evaluation = json.loads((files_project / "reports" / "evaluate.json").read_text())
    candidate = evaluation["splits"]["target_holdout"]["models"]["candidate"]
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("target holdout", "macro_f1")] == round(candidate["overall"]["macro_f1"], 4)
    for value, group in candidate["groups"]["condition"]["groups"].items():
        assert results[(f"target holdout, condition = {value}", "macro_f1")] == round(group["macro_f1"], 4)
    verdict = json.loads((files_project / "reports" / "verdict.json").read_text())["verdict"]
    assert f"packaged after the gate said **{verdict}**" in card.text
    assert verify_files(folder, read_record(files_project / "registry" / "registry.json")["models"][tag]["sha256"]) == []
