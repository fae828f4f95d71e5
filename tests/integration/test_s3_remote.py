"""A DVC remote on S3 (dvc-s3) against a local S3 API server (moto) on loopback: a work pool's runs start in empty
folders with only git and the remote, a project's event starts its own retrain only, two runs of one project take
turns even when the first one's machine dies, and everything a run made is in the remotes afterwards (a fresh clone
gets it back byte for byte); a serving host with only the code and the remote follows its project's promotions and
no other's; two hosts write the remote record at once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from tasks.processes import free_port, stop_process_group, wait_until_healthy
from tasks.variants import VARIANT_MAX_BATCH_SPREAD
from tests.conftest import AWS, make_project, moto_s3, package, quick_project, run, shift_event

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


@pytest.fixture
def team_server(tmp_path):
    """A Prefect server as a team runs one: its own database, all its services (the one that frees expired
    concurrency leases among them), every API call asking for the credential. Yields the settings that clients and
    workers use; this process's Prefect client talks to it meanwhile."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    home, port, credential = tmp_path / "prefect-server", free_port(), f"team:{uuid.uuid4().hex}"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_API_AUTH_STRING=credential,
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=(home / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_healthy(f"{api}/health", server, 180, home / "server.log")
        assert httpx.post(f"{api}/flow_runs/filter", json={}).status_code == 401  # no credential, no answer
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: credential}):
            yield {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": credential}
    finally:
        stop_process_group(server, grace_seconds=30)


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
    # One job at a time per worker, so each run takes a worker of its own.
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", "regraft-process", "--limit", "1"], cwd=folder / "cwd",
                            env=env,
                            stdout=(folder / "worker.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def freeze_machine(worker: subprocess.Popen) -> list[psutil.Process]:
    """A worker and everything it started (the flow run, its `dvc repro`, the stage's own processes) stopped where
    they are (SIGSTOP), as if the machine froze; children started while freezing are frozen too."""
    frozen: dict[int, psutil.Process] = {}
    try:
        while True:
            found = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
            new = [p for p in found if p.pid not in frozen]
            if not new:
                return list(frozen.values())
            for process in new:
                with contextlib.suppress(psutil.Error):
                    process.suspend()
                frozen[process.pid] = process
    except BaseException:
        thaw(list(frozen.values()))  # nothing left stopped when the worker is gone
        raise


def thaw(frozen: list[psutil.Process]) -> None:
    for process in frozen:
        with contextlib.suppress(psutil.Error):
            process.resume()


def kill_machine(worker: subprocess.Popen, flow_run_id: str, frozen: list[psutil.Process]) -> None:
    """What a machine that dies does to a worker: it and everything it started (`frozen`: stopped first by
    freeze_machine, so nothing started a process meanwhile) stop at once, with no cleanup."""
    for process in frozen:
        with contextlib.suppress(psutil.Error):
            process.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    # A process of the run whose parent exited between two looks above is no child any more: found by its run.
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and \
                    process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                process.kill()


def smoke_test_done(worker: subprocess.Popen, folder: Path) -> bool:
    """Whether the package stage's smoke test has run on this worker's machine (`folder`: the worker's, with its
    runs' clones): its server's log is in the run's state folder and no `bentoml serve` is left among the worker's
    processes."""
    try:
        if not any(folder.rglob("smoke/server.log")):
            return False
    except FileNotFoundError:  # a folder went away during the walk (BentoML's build folders come and go): not yet
        return False
    for process in psutil.Process(worker.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = process.cmdline()
            if "bentoml" in command and "serve" in command:
                return False
    return True


def worker_of(workers: dict[int, subprocess.Popen], flow_run_id: str) -> int:
    """Which worker's job runs this flow run (the process worker gives its job PREFECT__FLOW_RUN_ID)."""
    for n, worker in workers.items():
        for child in psutil.Process(worker.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                    return n
    raise AssertionError(f"no worker runs {flow_run_id}")


@pytest.mark.timeout(1800)
def test_work_pool_runs_of_two_projects_need_only_git_and_the_remote_and_leave_everything_there(
        tmp_path, tiny_bert, s3_endpoint, team_server, monkeypatch):
    """Two projects deployed from deploy/prefect.yaml by `prefect deploy` (each with its repository and branch fixed
    then) on one Prefect server with its credential on, three `prefect worker`s of one process pool started in
    empty folders. A shift event of project A starts A's retrain (and not B's); two retrains of B start at once:
    one holds B's slot, the other waits for it; the holder's machine dies in its package stage; the waiter takes
    over once the slot's lease has expired. Each run clones its project from a bare git repository and pulls and
    pushes through its S3 prefix. Afterwards no clone is left on a live worker; each project's registry record
    holds one complete model, its own run's; and a fresh clone gets A's run back from git and the remote: its
    record, its dvc.lock, and the model's bytes the registry recorded."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    from tasks.remote import S3Remote, download_archive

    prefect_env = team_server
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    run([PREFECT, "work-pool", "create", "regraft-process", "--type", "process", "--overwrite"], tmp_path,
        env_update=prefect_env)
    projects = ("pool-a", "pool-b")
    bare = {name: hermetic_project(tmp_path, name, tiny_bert, s3_endpoint, prefect_env) for name in projects}
    remotes = {name: S3Remote(f"s3://{BUCKET}/{name}/regraft-models", s3_endpoint) for name in projects}
    workers = {n: start_worker(tmp_path / f"worker-{n}", prefect_env) for n in (1, 2, 3)}
    api_url = prefect_env["PREFECT_API_URL"]

    async def runs_of(client, deployment: str) -> list:
        found = await client.read_deployment_by_name(deployment)
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))

    async def states_of(client, ids: list) -> dict:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        return {str(r.id): r for r in runs}

    async def started_by_the_event() -> str:
        """A's shift event, sent again while no run of A's retrain appeared within a minute (a trigger made by
        `prefect deploy` a moment ago may not listen yet); B's deployment gets no run from it."""
        async with get_client() as client:
            for _ in range(3):
                sent = httpx.post(f"{api_url}/events", json=[shift_event("pool-a")],
                                  auth=tuple(prefect_env["PREFECT_API_AUTH_STRING"].split(":", 1)))
                assert sent.status_code == 204, sent.text
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if started := await runs_of(client, "retrain/pool-a-retrain"):
                        return str(started[0].id)
                    await asyncio.sleep(2)
        raise AssertionError("A's shift event started no retrain of A")

    def uploaded_archives(name: str) -> list[str]:
        remote = remotes[name]
        listed = remote.client.list_objects_v2(Bucket=remote.bucket, Prefix=remote.key("models/"))
        return [item["Key"] for item in listed.get("Contents", [])]

    async def kill_the_holder_while_it_publishes(b_runs: list[str]) -> tuple[str, str, str, float]:
        """One of B's two runs holds the project (its slot, then its lease in the remote): the moment its package
        stage has put the model's archive into the remote, before the Bento's and the registry record, the
        machine of its worker dies."""
        async with get_client() as client:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                lease, _ = remotes["pool-b"].read_object("leases/pool-b.json")
                holder = (lease or {}).get("what", "").removeprefix("retrain run ")
                if holder in b_runs and not lease.get("released_at"):
                    tasks = await client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[holder])))
                    if any(t.name.startswith("package") and t.state.is_running() for t in tasks):
                        machine = worker_of(workers, holder)
                        # The export follows the stage's smoke test; from then on the remote is looked at only while
                        # the holder's machine is frozen, so its archive is caught there before the Bento and the
                        # record follow it (a tiny model's take well under a second, less than one look under load).
                        while not smoke_test_done(workers[machine], tmp_path / f"worker-{machine}"):
                            assert time.monotonic() < deadline, "the holder's smoke test never ended"
                            time.sleep(0.1)
                        while True:
                            frozen = freeze_machine(workers[machine])
                            try:
                                archives = uploaded_archives("pool-b")
                            except BaseException:
                                thaw(frozen)  # nothing left stopped when the look fails
                                raise
                            if archives:
                                break
                            thaw(frozen)
                            assert time.monotonic() < deadline, "the holder never exported its model"
                            time.sleep(0.05)
                        (waiter,) = set(b_runs) - {holder}
                        kill_machine(workers.pop(machine), holder, frozen)
                        killed_at = time.time()
                        record, _ = remotes["pool-b"].read_record()
                        assert not (record or {}).get("models"), f"the holder registered before it died: {record}"
                        # The dead run still holds the project's slot: only its lease's expiry frees it.
                        limit = await client.read_global_concurrency_limit_by_name("regraft-project-pool-b")
                        assert limit.active_slots == 1, limit
                        return holder, waiter, Path(archives[0]).stem, killed_at
                await asyncio.sleep(1)
        raise AssertionError("no run of B reached its package stage")

    async def final_states(ids: list[str]) -> dict:
        async with get_client() as client:
            while True:
                states = {i: r.state for i, r in (await states_of(client, ids)).items()}
                if all(state.is_final() for state in states.values()):
                    return states
                await asyncio.sleep(3)

    try:
        # The form's push=False does not keep a hermetic run's work on the worker.
        b_runs = [str(run_deployment("retrain/pool-b-retrain", parameters={"parameters": {"push": False}},
                                     timeout=0).id) for _ in range(2)]
        a_run = asyncio.run(started_by_the_event())
        holder, waiter, orphan, killed_at = asyncio.run(kill_the_holder_while_it_publishes(b_runs))
        states = asyncio.run(asyncio.wait_for(final_states([a_run, waiter]), 900))

        async def logs_and_runs():
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
            async with get_client() as client:
                logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[waiter])))
                stages = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[waiter])))
                return (logs, [t.start_time.timestamp() for t in stages if t.start_time],
                        await runs_of(client, "retrain/pool-b-retrain"),
                        await runs_of(client, "retrain/pool-a-retrain"))
        waiter_logs, waiter_stages, b_deployment_runs, a_deployment_runs = asyncio.run(logs_and_runs())
    finally:
        for worker in workers.values():
            stop_process_group(worker, grace_seconds=30)
    logs = "\n".join((tmp_path / f"worker-{n}" / "worker.log").read_text()[-4000:] for n in (1, 2, 3))
    assert all(state.is_completed() for state in states.values()), (states, logs)
    # The event started A's retrain only: B's deployment has the two runs asked for, A's the one the event made.
    assert sorted(str(r.id) for r in b_deployment_runs) == sorted(b_runs)
    assert [str(r.id) for r in a_deployment_runs] == [a_run]
    # B's two runs never overlapped: the waiter waited for the slot until the holder's lease expired, then took
    # the project's lease in the remote over from the dead run and said so.
    said = [(log.timestamp.timestamp(), log.message) for log in waiter_logs]
    (took_over,) = [t for t, m in said if "took over the project's lease" in m and f"retrain run {holder}" in m]
    # Not before the slot's lease ran out (60 s after the dead run's last renewal, every 45 s; the server frees
    # expired ones every 15 s): the dead run's lease in the remote alone would have let the waiter in at once.
    assert took_over - killed_at > 10 and min(waiter_stages) > killed_at, (said, killed_at)
    live = [n for n in (1, 2, 3)
            if "pushed experiment run-" in (tmp_path / f"worker-{n}" / "worker.log").read_text()]
    assert len(live) == 2, logs  # A's run and B's waiter, on the two workers that lived
    for n in live:  # nothing of either run is left on a live worker: the clone went with the job's folder
        folder = tmp_path / f"worker-{n}"
        assert list((folder / "cwd").iterdir()) == []
        assert not [p for p in (folder / "tmp").rglob("*") if p.name in ("dvc.yaml", "model.safetensors")]

    for name, flow_run in (("pool-a", a_run), ("pool-b", waiter)):
        # Each project's registry record in its remote holds one model, its own finished run's, complete: every
        # archive the record names is in the remote with the sha256 it recorded. The dead run registered nothing:
        # the archive it had uploaded is named by no record, so no host ever imports it.
        record, _ = remotes[name].read_record()
        assert len(record["models"]) == 1 and [e["action"] for e in record["history"]] == ["register"], record
        (tag, entry), = record["models"].items()
        assert tag.split(":")[1] != orphan and Path(entry["remote"]["model"]["key"]).stem != orphan, (tag, orphan)
        with tempfile.TemporaryDirectory() as scratch:
            for kind in ("model", "bento"):
                download_archive(remotes[name], entry["remote"][kind], Path(scratch))
        # The project's lease in the remote (one run at a time across workers) was held by its run and given back.
        lease, _ = remotes[name].read_object(f"leases/{name}.json")
        assert lease["what"] == f"retrain run {flow_run}" and lease["released_at"], lease

    # A fresh clone lists the run in git and gets it back, with the data and the model from the DVC remote.
    name = "pool-a"
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", bare[name].as_uri(), str(fresh)], tmp_path)
    experiment = f"run-{a_run[:8]}"
    assert experiment in run(DVC + ["exp", "list", "origin"], fresh).stdout
    run(DVC + ["exp", "pull", "origin", experiment], fresh)
    run(DVC + ["exp", "apply", experiment], fresh)
    assert json.loads((fresh / "reports" / "run.json").read_text())["run_id"] == a_run
    assert (fresh / "reports" / "report.html").is_file()
    pulled = run(DVC + ["pull"], fresh)
    assert "failed" not in pulled.stdout.lower(), pulled.stdout
    model = fresh / "models" / "candidate" / "model.safetensors"
    assert model.is_file() and (fresh / "data").is_dir()
    record, _ = remotes[name].read_record()
    (entry,) = record["models"].values()
    recorded = [digest for path, digest in entry["sha256"].items() if path.endswith("model.safetensors")]
    assert recorded == [hashlib.sha256(model.read_bytes()).hexdigest()], entry["sha256"]
    assert "Cache and remote 's3' are in sync" in run(DVC + ["status", "--cloud"], fresh).stdout
    # The checkout has every stage's data, model and report as the run left them; only the folders of pictures and
    # pages (GX data docs, plots: in the HTML report and the run's artifacts) are not carried in git for every run.
    status = json.loads(run(DVC + ["status", "--json"], fresh).stdout)
    changed = [(kind, path) for items in status.values() for item in items if item != "always changed"
               for kind, paths in item.items() for path in paths]
    assert {kind for kind, _ in changed} <= {"changed outs", "changed deps"}, status
    assert {path for _, path in changed} <= {"reports/data_docs", "reports/shift", "reports/evaluate"}, status
    assert all((fresh / "reports" / f"{stage}.json").is_file()
               for stage in ("ingest", "validate", "shift", "finetune", "evaluate", "package"))


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


def another_project_with_the_same_model(base: Path, trainer: Path, tag: str, endpoint: str) -> Path:
    """A second project whose model remote is its own prefix of the same bucket, holding the trainer's model `tag`
    (its archives copied there and registered in its own record), ready to promote it."""
    from tasks.config import write_overrides
    from tasks.registry import register
    from tasks.remote import S3Remote

    other = make_project(base / "other", base / "unused")
    url = f"s3://{BUCKET}/other/regraft-models"
    write_overrides(other / "params.yaml", {"project.name": "other", "package.remote": url})
    entry = json.loads((trainer / "registry" / "registry.json").read_text())["models"][tag]
    source, destination = S3Remote(f"s3://{BUCKET}/regraft/regraft-models", endpoint), S3Remote(url, endpoint)
    for kind in ("model", "bento"):
        local = base / Path(entry["remote"][kind]["key"]).name
        source.get_file(entry["remote"][kind]["key"], local)
        destination.put_file(local, entry["remote"][kind]["key"])
    register(other / "registry" / "registry.json", tag, {**entry, "remote": {**entry["remote"], "url": url}},
             remote=destination)
    return other


def test_a_serving_host_with_only_the_remote_follows_the_trainers_promotions(tmp_path, tiny_bert, s3_endpoint,
                                                                            monkeypatch):
    """Clone A packages two models and promotes the first; clone B has the code and the S3 remote only (no
    training, no store, no registry) and serves. Another project on the same bucket promotes A's second model in
    its own record: B does not move. A promotes the second and rolls back while B is under load: B switches both
    times, no request fails, and every answer equals A's offline prediction for that model."""
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
    other = another_project_with_the_same_model(tmp_path, trainer, tags[1], s3_endpoint)

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
        # The other project's promotion is in its own record: this host follows its own project's only.
        before = len(served)
        assert "is now in production" in run([REGRAFT, "promote", tags[1], "--reason", "theirs"], other,
                                             env_update={"AWS_ENDPOINT_URL": s3_endpoint}).stdout
        time.sleep(6)  # twelve of the host's reload periods, longer than its switches below take
        assert {row["model_version"] for _, row in served[before:]} == {tags[0]}
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
