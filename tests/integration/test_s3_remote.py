"""A DVC remote on S3 (dvc-s3) against a local S3 API server (moto) on loopback: a run pushes its data
and model from one clone, a fresh clone pulls them, and the bytes are identical; a serving host with only
the code and the remote follows the trainer's promotions; two hosts write the remote record at once."""

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
from tests.conftest import make_project, package, quick_project, run

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")
DVC = [sys.executable, "-m", "dvc"]
BUCKET = "regraft-artifacts"
# moto accepts any credentials; dvc-s3 (boto) reads them from the environment as on a real machine.
AWS = {"AWS_ACCESS_KEY_ID": "regraft-test", "AWS_SECRET_ACCESS_KEY": "regraft-test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint(tmp_path):
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=(tmp_path / "moto.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(f"{url}/moto-api/", server, 60, tmp_path / "moto.log")
    import boto3

    boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"},
                 region_name=AWS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
    yield url
    stop_process_group(server, grace_seconds=30)


def digests(project: Path, folders: list[str]) -> dict[str, str]:
    return {str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted((project / folder).rglob("*")) if path.is_file()}


def test_push_from_one_clone_and_pull_into_a_fresh_clone_gives_identical_model_bytes(tmp_path, tiny_bert, s3_endpoint,
                                                                                    prefect_env, monkeypatch):
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    project = quick_project(tmp_path / "first", tiny_bert)
    # The S3 remote is the project's default: the flow's dvc-push task sends everything there.
    run(DVC + ["remote", "add", "--force", "-d", "s3", f"s3://{BUCKET}/regraft"], project)
    run(DVC + ["remote", "modify", "s3", "endpointurl", s3_endpoint], project)
    finished = run([REGRAFT, "run"], project, env_update=prefect_env)
    assert "data pushed to DVC remote 's3'" in finished.stdout, finished.stdout[-3000:]

    git = ["git", "-c", "user.name=regraft", "-c", "user.email=regraft@localhost"]
    run([*git, "add", "-A"], project)
    run([*git, "commit", "-qm", "a retrained model"], project)
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(project), str(fresh)], tmp_path)
    assert not (fresh / "models" / "candidate").exists()  # git carries only the pointers (dvc.lock)

    pulled = run(DVC + ["pull"], fresh)
    assert "failed" not in pulled.stdout.lower(), pulled.stdout
    folders = ["data", "models/candidate"]
    original, copy = digests(project, folders), digests(fresh, folders)
    assert any(name.endswith("model.safetensors") for name in copy)
    assert copy == original
    assert "Cache and remote 's3' are in sync" in run(DVC + ["status", "--cloud"], fresh).stdout


SERVED_TEXTS = ["works well for my pain", "terrible headache and nausea", "no change at all", "review number 7"]


def offline_predictions(project: Path, tag: str) -> dict[str, dict]:
    """What the trainer's own copy of a model predicts for each of SERVED_TEXTS (no server involved)."""
    from tasks.serving import load_model, predict

    name, version = tag.split(":")
    loaded = load_model(project / ".regraft" / "bentoml" / "models" / name / version, tag, 64)
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

    host = make_project(tmp_path / "host", tmp_path / "unused")
    port = free_port()
    # The serving host names the remote in package.remote (no DVC needed) and reaches S3 through AWS_* variables.
    write_overrides(host / "params.yaml", {"model.max_length": 64, "serve.port": port, "serve.reload_seconds": 0.5,
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
        assert row["label"] == offline["label"], (text, row, offline)
        assert all(abs(row["probabilities"][k] - p) < 1e-4 for k, p in offline["probabilities"].items())
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
