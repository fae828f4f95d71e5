"""The retrain flow for real: a git + DVC repo with a local remote, a real Prefect API, the CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import quick_project, run

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
    from flows.retrain import retrain
    from flows.run_form import RetrainParameters

    project = quick_project(tmp_path_factory.mktemp("flow"), tiny_bert)
    (project.parent / "params-before-run.yaml").write_bytes((project / "params.yaml").read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REGRAFT_PROJECT", str(project))  # what `regraft run` and `regraft ui` set
        state = retrain(parameters=RetrainParameters(split_seed=7), return_state=True)
    return project, state


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


def test_dvc_repro_writes_what_the_flow_writes(flow_project, tmp_path, tiny_bert):
    by_flow, _ = flow_project
    by_dvc = quick_project(tmp_path, tiny_bert, **{"ingest.split.seed": 7})
    # Up to finetune: the stages after it read what it wrote (the flow test covers them), and stopping there
    # keeps this test to the data and model outputs it compares.
    run(DVC + ["repro", "finetune"], by_dvc)
    assert data_hashes(by_flow) == data_hashes(by_dvc)
    splits = {f"data/{name}.parquet" for name in ("source_train", "source_holdout", "target_train", "target_holdout")}
    assert splits | {"data/shift_weights.parquet"} == set(data_hashes(by_flow))
    assert (by_dvc / "models" / "candidate" / "model.safetensors").is_file()
    # Nothing changed, so a second repro has nothing to do.
    assert "didn't change, skipping" in run(DVC + ["repro", "finetune"], by_dvc).stdout


def test_the_flow_launches_torchrun_when_train_nproc_is_above_one(tmp_path, tiny_bert, prefect_env):
    """train.nproc: 2 through `regraft run`: the finetune stage relaunches itself as two torchrun (gloo)
    processes and the run completes with the data-parallel model."""
    project = quick_project(tmp_path, tiny_bert, **{"train.nproc": 2, "train.threads": 1})
    finished = run([REGRAFT, "run", "--no-push"], project, env_update=prefect_env)
    assert "finetune: starting 2 processes" in finished.stdout + finished.stderr, finished.stderr[-3000:]
    report = json.loads((project / "reports" / "finetune.json").read_text())
    assert report["processes"] == 2
    assert json.loads((project / "reports" / "package.json").read_text())["smoke_test"]["mismatches"] == 0
