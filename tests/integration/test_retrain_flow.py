"""The retrain flow for real: a git + DVC repo with a local remote, a real Prefect API, the CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project, quick_project, run, tree_digest

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")
DVC = [sys.executable, "-m", "dvc"]
STAGES = ["ingest", "validate", "shift", "finetune", "evaluate", "gate", "decide", "package"]


def data_hashes(project: Path) -> dict[str, str]:
    """md5 of every data output recorded in dvc.lock (reports such as Data Docs carry run times)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if out["path"].startswith("data/")}


def test_flow_order_is_dvcs_order(project):
    from flows.dag import stage_order

    dry = run(DVC + ["repro", "--dry", "--force"], project).stdout
    dvc_order = re.findall(r"Running stage '([^']+)'", dry)
    assert stage_order(project) == dvc_order == STAGES
    # A stage added to dvc.yaml is picked up by the flow without touching flows/.
    dag = yaml.safe_load((project / "dvc.yaml").read_text())
    dag["stages"]["report"] = {"cmd": "echo", "deps": ["${paths.reports}/package.json"]}
    dag["stages"] = {"report": dag["stages"].pop("report"), **dag["stages"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    dry = run(DVC + ["repro", "--dry", "--force"], project).stdout
    assert stage_order(project) == re.findall(r"Running stage '([^']+)'", dry) == [*STAGES, "report"]


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, tiny_bert, prefect_api):
    """A quick project after one run of the retrain flow in this process (another holdout split: seed 7)."""
    from flows.retrain import RetrainParameters, retrain

    project = quick_project(tmp_path_factory.mktemp("flow"), tiny_bert)
    (project.parent / "params-before-run.yaml").write_bytes((project / "params.yaml").read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REGRAFT_PROJECT", str(project))  # what `regraft run` and `regraft ui` set
        state = retrain(parameters=RetrainParameters(split_seed=7), return_state=True)
    return project, state


@pytest.mark.xdist_group("flow")
def test_flow_runs_each_stage_as_a_task_with_artifacts(flow_project):
    from prefect import get_client

    project, state = flow_project
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages"] == STAGES
    assert result["reports"]["decide"]["approved"] and result["reports"]["gate"]["verdict"] in ("PASS", "INCONCLUSIVE")
    assert result["reports"]["validate"]["success"]
    assert result["pushed_to"] == "local"
    # The override belongs to the run: params.yaml is byte-identical to before it; dvc.lock and
    # reports/run.json say what the run used.
    assert (project / "params.yaml").read_bytes() == (project.parent / "params-before-run.yaml").read_bytes()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["params"]["params.yaml"]["ingest"]["split"]["seed"] == 7
    record = json.loads((project / "reports" / "run.json").read_text())
    assert record["overrides"] == {"ingest.split.seed": 7} and record["params"]["ingest"]["split"]["seed"] == 7
    assert not (project / ".regraft" / "runs").exists() or not any((project / ".regraft" / "runs").iterdir())
    assert (project.parent / "remote" / "files" / "md5").is_dir()
    assert "Cache and remote 'local' are in sync" in run(DVC + ["status", "--cloud"], project).stdout

    import anyio

    async def query():
        async with get_client() as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            artifacts = {a.key for a in await client.read_artifacts()}
            return sorted(r.name for r in runs), artifacts

    task_names, artifact_keys = anyio.run(query)
    assert set(STAGES) <= set(task_names)
    assert {"ingest-report", "validate-report", "shift-report", "finetune-report", "evaluate-report",
            "verdict-report", "decision-report", "package-report", "run-report", "run-parameters"} <= artifact_keys
    page = (project / "reports" / "report.html").read_text()
    assert "<h1>Gate: PASS" in page or "Gate: INCONCLUSIVE" in page
    assert page.count("data:image/png;base64,") >= 5  # shift plots, training curves, group charts


@pytest.mark.xdist_group("flow")
def test_dvc_repro_writes_what_the_flow_writes(flow_project, tmp_path, tiny_bert):
    by_flow, _ = flow_project
    by_dvc = quick_project(tmp_path, tiny_bert, **{"ingest.split.seed": 7})
    run(DVC + ["repro"], by_dvc)
    assert data_hashes(by_flow) == data_hashes(by_dvc)
    splits = {f"data/{name}.parquet" for name in ("source_train", "source_holdout", "target_train", "target_holdout")}
    assert splits | {"data/shift_weights.parquet"} == set(data_hashes(by_flow))
    assert (by_dvc / "models" / "candidate" / "model.safetensors").is_file()
    # Nothing changed, so a second repro has nothing to do.
    assert "didn't change, skipping" in run(DVC + ["repro"], by_dvc).stdout


def test_the_demo_runs_end_to_end_with_the_bundled_model(tmp_path):
    """`make demo`'s path: the real all-MiniLM-L6-v2 on the demo data, every stage, a temporary Prefect API.
    Cheaper than the demo where it changes no wiring: one epoch (fp32 LoRA on a CPU without bf16 takes 80 s an
    epoch), fewer null splits and resamples, and gate criteria that do not depend on how far one epoch gets."""
    from tasks.config import write_overrides

    project = make_project(tmp_path / "demo", tmp_path / "remote")
    write_overrides(project / "params.yaml", {
        "train.epochs": 1, "shift.null_splits": 5, "shift.bootstrap": 50, "evaluate.bootstrap": 200,
        "gate.floors": [], "gate.worst_group.floor": 0.0, "gate.disparity.max_gap": 1.0})
    done = run([REGRAFT, "run"], project)
    assert "regraft run finished: " + " -> ".join(STAGES) in done.stdout
    assert re.search(r"domain shift: (moderate|severe)", done.stdout)
    # The demo's shift is severe and its target small, so `auto` adapts with LoRA.
    assert "finetune: lora on CPU" in done.stdout
    assert re.search(r"target_holdout\s+108\s+negative 38, neutral 10, positive 60", done.stdout)
    assert "validation passed: 78 expectations on 4 splits" in done.stdout
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
    })
    run([REGRAFT, "run", "--no-push"], project, env_update=prefect_env)
    return project


def corrupt_target(case: str, path: Path, source: Path) -> None:
    import pandas as pd

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
    "holdout/train overlap": "also appear in a train split (train/holdout leakage)",
}


@pytest.mark.xdist_group("files")
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


@pytest.mark.xdist_group("files")
def test_validate_command_on_one_file(files_project, prefect_env):
    good = run([REGRAFT, "validate", "inputs/target.csv"], files_project)
    assert "Validation passed" in good.stdout
    bad = files_project / "bad.csv"
    corrupt_target("unknown label", bad, bad) if bad.exists() else None
    bad.write_bytes((files_project / "inputs" / "target.csv").read_bytes().replace(b",positive,", b",great,", 1))
    failed = run([REGRAFT, "validate", str(bad)], files_project, check=False)
    assert failed.returncode == 1
    assert "bad: column 'label' has 1 values outside the configured labels" in failed.stderr


@pytest.mark.xdist_group("files")
def test_bad_override_fails_before_anything_runs(files_project, prefect_env):
    before = tree_digest(files_project)
    failed = run([REGRAFT, "run", "--set", "ingest.split.holdout_fraction=2"], files_project, check=False, env_update=prefect_env)
    assert failed.returncode == 2
    assert "ingest.split.holdout_fraction: Input should be less than 1 (got 2)" in failed.stderr
    assert tree_digest(files_project) == before


@pytest.mark.xdist_group("files")
def test_shift_command_prints_json_with_a_verdict(files_project, prefect_env):
    import json

    out = run([REGRAFT, "shift", "inputs/source.csv", "inputs/target.csv", "--json"], files_project)
    report = json.loads(out.stdout)
    assert report["verdict"] in {"none", "moderate", "severe"}
    label = next(t for t in report["tests"] if t["name"] == "label_shift")
    # The demo's label mix really changes after 2015.
    assert label["flagged"] and label["p_value"] < 1e-3
    readable = run([REGRAFT, "shift", "inputs/source.csv", "inputs/target.csv"], files_project)
    assert readable.stdout.startswith("# Domain shift: ")
    missing = run([REGRAFT, "shift", "inputs/source.csv", "inputs/nope.csv"], files_project, check=False)
    assert missing.returncode == 2 and "nope.csv: file not found" in missing.stderr


@pytest.mark.xdist_group("files")
def test_severe_shift_blocks_training_when_configured(files_project, prefect_env):
    before = tree_digest(files_project)
    failed = run([REGRAFT, "run", "--no-push", "--set", "shift.on_severe=block", "--set", "shift.severe_ratio=1.001"],
                 files_project, check=False, env_update=prefect_env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "error: stage 'shift' failed" in failed.stderr
    assert "severe domain shift and shift.on_severe=block, so training does not start" in failed.stderr
    assert "label_shift: total variation of class priors" in failed.stderr
    assert tree_digest(files_project) == before


@pytest.mark.xdist_group("files")
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


@pytest.mark.xdist_group("files")
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


def test_the_flow_launches_torchrun_when_train_nproc_is_above_one(tmp_path, tiny_bert, prefect_env):
    """train.nproc: 2 through `regraft run`: the finetune stage relaunches itself as two torchrun (gloo)
    processes and the run completes with the data-parallel model."""
    project = quick_project(tmp_path, tiny_bert, **{"train.nproc": 2, "train.threads": 1})
    finished = run([REGRAFT, "run", "--no-push"], project, env_update=prefect_env)
    assert "finetune: starting 2 processes" in finished.stdout + finished.stderr, finished.stderr[-3000:]
    report = json.loads((project / "reports" / "finetune.json").read_text())
    assert report["processes"] == 2
    assert json.loads((project / "reports" / "package.json").read_text())["smoke_test"]["mismatches"] == 0
