"""A DVC remote on S3 (dvc-s3) against a local S3 API server (moto) on loopback: a work pool's run starts in an
empty folder with only git and the remote, and everything it made is in the remotes afterwards (a fresh clone
gets it back byte for byte); a serving host with only the code and the remote follows the trainer's promotions;
two hosts write the remote record at once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tasks.processes import free_port, stop_process_group, wait_until_healthy
from tasks.variants import VARIANT_MAX_BATCH_SPREAD
from tests.conftest import AWS, make_project, moto_s3, package, quick_project, run

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")
PREFECT = str(Path(sys.executable).parent / "prefect")
DVC = [sys.executable, "-m", "dvc"]
BUCKET = "regraft-artifacts"
GIT = ["git", "-c", "user.name=regraft", "-c", "user.email=regraft@localhost"]


@pytest.fixture
def s3_endpoint(tmp_path):
    with moto_s3(tmp_path / "moto.log", BUCKET) as url:
        yield url


def hermetic_project(base: Path, name: str, tiny_bert: Path, s3_endpoint: str, prefect_env: dict) -> Path:
    """A project in its own bare git repository (the team's git server) with its own prefix of the S3 bucket as
    its DVC remote, and its retrain deployment created by `prefect deploy` from deploy/prefect.yaml."""
    from tasks.config import write_overrides

    team = quick_project(base / name, tiny_bert)
    write_overrides(team / "params.yaml", {"project.name": name})
    run(DVC + ["remote", "add", "--force", "-d", "s3", f"s3://{BUCKET}/{name}"], team)
    run(DVC + ["remote", "modify", "s3", "endpointurl", s3_endpoint], team)
    run([*GIT, "add", "-A"], team)
    run([*GIT, "commit", "-qm", "the project"], team)
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], team).stdout.strip()
    bare = base / "git-server" / f"{name}.git"
    run(["git", "clone", "-q", "--bare", str(team), str(bare)], base)
    deploy_env = {**prefect_env, "REGRAFT_PROJECT_NAME": name, "REGRAFT_GIT_URL": bare.as_uri(),
                  "REGRAFT_GIT_BRANCH": branch}
    # The retrain deployment alone (by its name in the file): the scheduled ones would start runs of their own.
    run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml",
         "--name", "{{ $REGRAFT_PROJECT_NAME }}-retrain"], team, env_update=deploy_env)
    return bare


def start_worker(folder: Path, prefect_env: dict) -> subprocess.Popen:
    """`prefect worker start` of the process pool in an empty folder, with no project and no REGRAFT_ setting; its
    jobs' folders under folder/tmp."""
    (folder / "cwd").mkdir(parents=True)
    (folder / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGRAFT_", "PREFECT_"))}
    env.update(prefect_env, TMPDIR=str(folder / "tmp"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    # One job at a time per worker, so two runs take both workers.
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", "regraft-process", "--limit", "1"], cwd=folder / "cwd",
                            env=env,
                            stdout=(folder / "worker.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_work_pool_runs_of_two_projects_need_only_git_and_the_remote_and_leave_everything_there(
        tmp_path, tiny_bert, s3_endpoint, prefect_env, monkeypatch):
    """Two projects deployed from deploy/prefect.yaml by `prefect deploy` (each with its repository and branch fixed
    then) on one Prefect server, two `prefect worker`s of one process pool started in empty folders: both retrains
    at once, each cloning its project from a bare git repository and pulling and pushing through its S3 prefix.
    Afterwards no clone is left on either worker; each project's registry record holds its own run's model only;
    and a fresh clone gets a run back from git and the remote: its record, its dvc.lock, and the model's bytes the
    registry recorded."""
    import asyncio

    from prefect import get_client
    from prefect.deployments import run_deployment

    from tasks.remote import S3Remote

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    run([PREFECT, "work-pool", "create", "regraft-process", "--type", "process", "--overwrite"], tmp_path,
        env_update=prefect_env)
    projects = ("pool-a", "pool-b")
    bare = {name: hermetic_project(tmp_path, name, tiny_bert, s3_endpoint, prefect_env) for name in projects}
    workers = [start_worker(tmp_path / f"worker-{n}", prefect_env) for n in (1, 2)]
    try:
        # The form's push=False does not keep a hermetic run's work on the worker.
        runs = {name: run_deployment(f"retrain/{name}-retrain", parameters={"parameters": {"push": False}}, timeout=0)
                for name in projects}

        async def final_states():
            async with get_client() as client:
                while True:
                    states = {name: (await client.read_flow_run(r.id)).state for name, r in runs.items()}
                    if all(state.is_final() for state in states.values()):
                        return states
                    await asyncio.sleep(3)

        states = asyncio.run(asyncio.wait_for(final_states(), 900))
    finally:
        for worker in workers:
            stop_process_group(worker, grace_seconds=30)
    logs = "\n".join((tmp_path / f"worker-{n}" / "worker.log").read_text()[-4000:] for n in (1, 2))
    assert all(state.is_completed() for state in states.values()), (states, logs)
    for n in (1, 2):  # each worker ran one of them
        assert (tmp_path / f"worker-{n}" / "worker.log").read_text().count("pushed experiment run-") == 1, logs
    for n in (1, 2):  # nothing of either run is left on a worker: the clone went with the job's folder
        folder = tmp_path / f"worker-{n}"
        assert list((folder / "cwd").iterdir()) == []
        assert not [p for p in (folder / "tmp").rglob("*") if p.name in ("dvc.yaml", "model.safetensors")]

    for name, flow_run in runs.items():
        # Each project's registry record in its remote holds its own run's packaged model only.
        remote = S3Remote(f"s3://{BUCKET}/{name}/regraft-models", s3_endpoint)
        record, _ = remote.read_record()
        assert len(record["models"]) == 1 and [e["action"] for e in record["history"]] == ["register"], record
        # The project's lease in the remote (one run at a time across workers) was held by its run and given back.
        lease, _ = remote.read_object(f"leases/{name}.json")
        assert lease["what"] == f"retrain run {flow_run.id}" and lease["released_at"], lease

    # A fresh clone lists the run in git and gets it back, with the data and the model from the DVC remote.
    name, flow_run = "pool-a", runs["pool-a"]
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", bare[name].as_uri(), str(fresh)], tmp_path)
    experiment = f"run-{str(flow_run.id)[:8]}"
    assert experiment in run(DVC + ["exp", "list", "origin"], fresh).stdout
    run(DVC + ["exp", "pull", "origin", experiment], fresh)
    run(DVC + ["exp", "apply", experiment], fresh)
    assert json.loads((fresh / "reports" / "run.json").read_text())["run_id"] == str(flow_run.id)
    assert (fresh / "reports" / "report.html").is_file()
    pulled = run(DVC + ["pull"], fresh)
    assert "failed" not in pulled.stdout.lower(), pulled.stdout
    model = fresh / "models" / "candidate" / "model.safetensors"
    assert model.is_file() and (fresh / "data").is_dir()
    record, _ = S3Remote(f"s3://{BUCKET}/{name}/regraft-models", s3_endpoint).read_record()
    (entry,) = record["models"].values()
    recorded = [digest for path, digest in entry["sha256"].items() if path.endswith("model.safetensors")]
    assert recorded == [hashlib.sha256(model.read_bytes()).hexdigest()], entry["sha256"]
    assert "Cache and remote 's3' are in sync" in run(DVC + ["status", "--cloud"], fresh).stdout


SERVED_TEXTS = ["works well for my pain", "terrible headache and nausea", "no change at all", "review number 7"]


def served_precision(project: Path, tag: str) -> str:
    """The precision a host serves a model in, from its record (the same machine here, so the same choice)."""
    from tasks.serving import serving_precision

    return serving_precision(json.loads((project / "registry" / "registry.json").read_text())["models"][tag]["serving"])[0]


def offline_predictions(project: Path, tag: str) -> dict[str, dict]:
    """What the trainer's own copy of a model predicts for each of SERVED_TEXTS (no server involved), in the
    precision the serving host serves it in."""
    from tasks.serving import load_model, predict

    name, version = tag.split(":")
    loaded = load_model(project / ".regraft" / "bentoml" / "models" / name / version, tag, 64,
                        served_precision(project, tag))
    return dict(zip(SERVED_TEXTS, predict(loaded, SERVED_TEXTS)))


def steady_load(url: str, stop: threading.Event, served: list, failures: list, clients: int = 6) -> list[threading.Thread]:
    def client(offset: int):
        with httpx.Client(base_url=url, timeout=60) as http:
            i = offset
            while not stop.is_set():
                text = SERVED_TEXTS[i % len(SERVED_TEXTS)]
                i += 1
                try:
                    response = http.post("/predict", json={"texts": [text]})
                except httpx.HTTPError as exc:
                    failures.append((type(exc).__name__, str(exc)))
                    continue
                if response.status_code != 200:
                    failures.append((response.status_code, response.text[:200]))
                else:
                    served.append((text, response.json()[0]))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    return threads


# Installed as sitecustomize on the serving host: importing what deploy/Dockerfile.serve leaves out fails.
SERVING_ONLY = """
import sys
# None in sys.modules: `import` fails and importlib.util.find_spec answers None, as when not installed.
for name in ("prefect", "dvc", "great_expectations", "moto", "playwright", "fairlearn", "peft", "matplotlib"):
    sys.modules[name] = None
"""


def use_s3_remote(project: Path, endpoint: str) -> None:
    run(DVC + ["remote", "add", "--force", "-d", "s3", f"s3://{BUCKET}/regraft"], project)
    run(DVC + ["remote", "modify", "s3", "endpointurl", endpoint], project)


def wait_for_model(url: str, tag: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/healthz").json().get("model_version") != tag:
        assert time.monotonic() < deadline, f"the serving host never switched to {tag}"
        time.sleep(0.2)


def test_a_serving_host_with_only_the_remote_follows_the_trainers_promotions(tmp_path, tiny_bert, s3_endpoint,
                                                                            monkeypatch):
    """Clone A packages two models and promotes the first; clone B has the code and the S3 remote only (no
    training, no store, no registry) and serves. A promotes the second and rolls back while B is under load:
    B switches both times, no request fails, and every answer equals A's offline prediction for that model."""
    from tasks.config import write_overrides

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    trainer = make_project(tmp_path / "trainer", tmp_path / "unused")
    use_s3_remote(trainer, s3_endpoint)
    write_overrides(trainer / "params.yaml", {"model.max_length": 64})
    run([sys.executable, "-m", "pipelines.ingest"], trainer)
    tags = [package(trainer, tiny_bert, seed) for seed in (1, 2)]
    run([REGRAFT, "promote", tags[0], "--reason", "first"], trainer)
    expected = {tag: offline_predictions(trainer, tag) for tag in tags}
    precisions = {tag: served_precision(trainer, tag) for tag in tags}

    host = make_project(tmp_path / "host", tmp_path / "unused")
    port = free_port()
    # The serving host names the remote in package.remote (no DVC needed) and reaches S3 through AWS_* variables.
    write_overrides(host / "params.yaml", {"model.max_length": 64, "serve.port": port, "serve.reload_seconds": 0.5,
                                           "serve.workers": 1,  # /healthz is then the one worker answering
                                           "package.remote": f"s3://{BUCKET}/regraft/regraft-models"})
    assert not (host / "registry").exists() and not (host / ".regraft").exists()
    log = (tmp_path / "host-serve.log").open("w")
    # What the slim serving image leaves out cannot be imported here: serving must not need it.
    blocker = tmp_path / "serving-only"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SERVING_ONLY)
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen([REGRAFT, "serve"], cwd=host, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=env)
    url = f"http://127.0.0.1:{port}"
    stop, served, failures = threading.Event(), [], []
    try:
        wait_until_healthy(f"{url}/healthz", server, 180, tmp_path / "host-serve.log")
        assert httpx.get(f"{url}/healthz").json()["model_version"] == tags[0]
        clients = steady_load(url, stop, served, failures)
        time.sleep(2)
        run([REGRAFT, "promote", tags[1], "--reason", "better"], trainer)
        wait_for_model(url, tags[1])
        time.sleep(2)
        run([REGRAFT, "rollback", "--reason", "undo"], trainer)
        wait_for_model(url, tags[0])
        time.sleep(2)
        stop.set()
        for client in clients:
            client.join()
    finally:
        stop.set()
        stop_process_group(server, grace_seconds=30)
        log.close()
    assert failures == []
    versions = [row["model_version"] for _, row in served]
    assert set(versions) == set(tags), set(versions)
    switches = [tag for i, tag in enumerate(versions) if i == 0 or versions[i - 1] != tag]
    assert len(switches) >= 3, switches  # tags[0] -> tags[1] -> tags[0] (answers from two clients may interleave)
    for text, row in served:
        offline = expected[row["model_version"]][text]
        # In fp32 the same text gets the same answer in any batch; a checked reduced-precision variant within its bound.
        tolerance = 1e-4 if precisions[row["model_version"]] == "fp32" else VARIANT_MAX_BATCH_SPREAD
        top, second = sorted(offline["probabilities"].values())[-2:][::-1]
        assert row["label"] == offline["label"] or top - second < tolerance, (text, row, offline)
        assert all(abs(row["probabilities"][k] - p) < tolerance for k, p in offline["probabilities"].items())
    record = json.loads((host / "registry" / "registry.json").read_text())
    assert record["production"] == tags[0] and [e["action"] for e in record["history"]][-2:] == ["promote", "rollback"]
    models = run([REGRAFT, "models"], host, env_update={"AWS_ENDPOINT_URL": s3_endpoint}).stdout
    assert f"production: {tags[0]}" in models  # the remote's record, read from B


def test_two_hosts_writing_the_remote_record_at_once_lose_no_update(tmp_path, s3_endpoint, monkeypatch):
    """Twenty registrations from two hosts (two local registry copies) at once against the real S3 API: the
    conditional writes retry every conflict, and the remote record ends with all twenty."""
    from tasks.registry import register
    from tasks.remote import S3Remote

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    remote = S3Remote(f"s3://{BUCKET}/shared", s3_endpoint)

    def host(name: str) -> None:
        for i in range(10):
            register(tmp_path / name / "registry.json", f"model:{name}{i}", {"verdict": "PASS"}, remote=remote)

    hosts = [threading.Thread(target=host, args=(name,)) for name in ("a", "b")]
    for thread in hosts:
        thread.start()
    for thread in hosts:
        thread.join()
    record, _ = remote.read_record()
    assert len(record["models"]) == 20 and len(record["history"]) == 20
