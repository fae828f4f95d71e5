"""A DVC remote on S3 (dvc-s3) against a local S3 API server (moto) on loopback: a run pushes its data
and model from one clone, a fresh clone pulls them, and the bytes are identical."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import quick_project, run

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")
DVC = [sys.executable, "-m", "dvc"]
BUCKET = "regraft-artifacts"
# moto accepts any credentials; dvc-s3 (boto) reads them from the environment as on a real machine.
AWS = {"AWS_ACCESS_KEY_ID": "regraft-test", "AWS_SECRET_ACCESS_KEY": "regraft-test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint(tmp_path):
    from tasks.processes import free_port, stop_process_group, wait_until_healthy

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
