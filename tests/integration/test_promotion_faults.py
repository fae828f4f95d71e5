"""Faults in promote, rollback and package, each injected at a named step (tasks.files.crash_point), never by
timing: a kill -9 at every step of promote and rollback, the remote unreachable mid-promotion, a full disk
while packaging. Each test checks what is left (registry record, journal, production files, store) and what the
next command does: `regraft models` reports it and exits 1, the next promote or rollback finishes it and says so.
These rows are the fault table of docs/operations.md.

Every command runs as `regraft` in its own process, forked from one driver that has imported regraft once
(a fresh `regraft` pays 2-3 s of imports; a fork, a fraction of that): a kill at a crash point kills only it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.processes import free_port
from tests.conftest import AWS as S3_CREDENTIALS
from tests.conftest import REPO, moto_s3

pytestmark = pytest.mark.integration

# Forks one process per command from a process that has already imported regraft; prints each exit status
# (a negative number: killed by that signal).
DRIVER = r"""
import json, os, runpy, sys, traceback
sys.path.insert(0, os.getcwd())
import bentoml, flows.cli, tasks.promotion, tasks.registry  # bentoml finds its store (BENTOML_HOME) on first use
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            if job.get("code"):
                exec(job["code"], {"__name__": "__job__"})
                code = 0
            elif job.get("module"):
                runpy.run_module(job["module"], run_name="__main__")
                code = 0
            else:
                code = flows.cli.main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""

KILLED = -9
PROMOTE_STEPS = ["promote:journaled", "replace:built", "replace:old-moved-away", "promote:installed",
                 "record:remote-written", "promote:recorded"]
AWS = {**S3_CREDENTIALS, "AWS_MAX_ATTEMPTS": "1"}  # one attempt: an unreachable remote fails at once, not after retries
BUCKET = "regraft-faults"


class Commands:
    """`regraft ...`, `python -m ...` or a snippet, each in a forked process with its own output files."""

    def __init__(self, folder: Path):
        from flows.dvc_stage import stage_environment

        env = stage_environment()
        env.pop("PREFECT_API_URL", None)
        self.folder, self.count = folder, 0
        self.driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, cwd: Path, *argv: str, env: dict | None = None, **job) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        self.driver.stdin.write(json.dumps({"cwd": str(cwd), "argv": list(argv), "env": env or {}, "stdout": str(out),
                                            "stderr": str(err), **job}) + "\n")
        self.driver.stdin.flush()
        code = json.loads(self.driver.stdout.readline())
        return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.driver.stdin.close()
        self.driver.wait(timeout=30)


@pytest.fixture(scope="module")
def regraft(tmp_path_factory):
    commands = Commands(tmp_path_factory.mktemp("commands"))
    yield commands
    commands.close()


# Two packaged models (small fake files: promotion never loads them) in the project's BentoML store,
# registered in the project's record and its shared remote, as the package stage leaves them.
PACKAGE_TWO = r"""
import json, os
from pathlib import Path
from tasks.config import load_params
from tasks.packaging import bentoml_environment
from tasks.registry import file_digests, register
from tasks.remote import model_remote
params = load_params(Path("params.yaml"))
os.environ.update(bentoml_environment(params))
import bentoml
for name in ("a", "b"):
    with bentoml.models.create(params.package.model_name) as model:
        Path(model.path, "config.json").write_text(json.dumps({"name": name}))
        Path(model.path, "model.safetensors").write_bytes(name.encode() * 4096)
    digests = {k: v for k, v in file_digests(Path(model.path)).items() if k != "model.yaml"}
    register(params.paths.registry, str(model.tag), {"verdict": "PASS", "sha256": digests}, remote=model_remote(params))
    print(model.tag)
"""


def new_project(regraft, base: Path, remote: str, env: dict | None = None) -> tuple[Path, list[str]]:
    from tasks.config import write_overrides

    project = base / "project"
    project.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, project / name)
    write_overrides(project / "params.yaml", {"package.remote": remote})
    done = regraft(project, code=PACKAGE_TWO, env=env)
    assert done.returncode == 0, done.stderr
    return project, done.stdout.split()


@pytest.fixture(scope="module")
def templates(regraft, tmp_path_factory):
    """Projects (with a directory remote beside them) to copy for each case: A in production; then B over A."""
    base = tmp_path_factory.mktemp("templates")
    project, tags = new_project(regraft, base / "a", "../remote")
    assert regraft(project, "promote", tags[0]).returncode == 0
    shutil.copytree(base / "a", base / "b")
    assert regraft(base / "b" / "project", "promote", tags[1]).returncode == 0
    return {"promote": base / "a", "rollback": base / "b"}, tags


def state(project: Path) -> dict:
    """What is left: the records (here and in the remote), the journal, whose files are in production."""
    from tasks.registry import journal_file, read_record, verify_files

    registry, champion = project / "registry" / "registry.json", project / "models" / "production"
    record = read_record(registry)
    files = None
    if champion.is_dir():
        files = next((tag for tag, entry in record["models"].items() if not verify_files(champion, entry["sha256"])), "?")
    return {"record": record["production"], "remote": read_record(project.parent / "remote" / "registry.json")["production"],
            "journal": json.loads(journal_file(registry).read_text()) if journal_file(registry).is_file() else None,
            "files": files, "history": [(e["action"], e["tag"]) for e in record["history"] if e["action"] != "register"],
            "leftovers": sorted(p.name for p in champion.parent.glob(f".{champion.name}.*"))}


# What a kill at each step leaves: (this machine's record, the remote's record, the production files), for a
# promotion from `old` to `new` (a rollback is the same steps with the roles of the two models swapped).
LEFT = {"promote:journaled": ("old", "old", "old"), "replace:built": ("old", "old", "old"),
        "replace:old-moved-away": ("old", "old", None), "promote:installed": ("old", "old", "new"),
        "record:remote-written": ("old", "new", "new"), "promote:recorded": ("new", "new", "new")}


@pytest.mark.parametrize("action", ["promote", "rollback"])
@pytest.mark.parametrize("step", PROMOTE_STEPS)
def test_a_kill_at_each_step_is_reported_then_finished_by_the_next_command(regraft, templates, tmp_path, action, step):
    folders, (a, b) = templates
    shutil.copytree(folders[action], tmp_path / "case")
    project = tmp_path / "case" / "project"
    old, new = (a, b) if action == "promote" else (b, a)
    command = ["promote", b] if action == "promote" else ["rollback"]
    before = state(project)

    killed = regraft(project, *command, env={"REGRAFT_CRASH_AT": step})
    assert killed.returncode == KILLED, (killed.stdout, killed.stderr)
    left = state(project)
    names = {"old": old, "new": new, None: None}
    assert (left["record"], left["remote"], left["files"]) == tuple(names[x] for x in LEFT[step])
    assert left["journal"]["tag"] == new and left["journal"]["previous"] == old and left["journal"]["action"] == action

    reported = regraft(project, "models", "--json")
    what = f"{'promotion of' if action == 'promote' else 'rollback to'} {new}"
    assert reported.returncode == 1, reported.stderr
    assert f"the {what} (from {old}) was interrupted: started at {left['journal']['at']}" in reported.stderr
    assert "The next `regraft promote` or `regraft rollback` (or retrain run) first finishes it" in reported.stderr
    assert reported.stderr.count("error:") == 1
    assert json.loads(reported.stdout)["interrupted_promotion"]["tag"] == new

    finished = regraft(project, *command)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"finished the interrupted {what} started at {left['journal']['at']}")
    assert f"{action}: {new} is now in production (was {old})" in finished.stdout
    after = state(project)
    assert (after["record"], after["remote"], after["files"], after["journal"], after["leftovers"]) == (new, new, new, None, [])
    assert after["history"] == before["history"] + [(action, new)]  # completed once, not twice, nor rolled back again
    assert regraft(project, "models").returncode == 0


def test_a_kill_mid_promotion_then_a_rollback_finishes_it_and_puts_the_old_model_back(regraft, templates, tmp_path):
    folders, (a, b) = templates
    shutil.copytree(folders["promote"], tmp_path / "case")
    project = tmp_path / "case" / "project"
    assert regraft(project, "promote", b, env={"REGRAFT_CRASH_AT": "promote:installed"}).returncode == KILLED
    undone = regraft(project, "rollback")
    assert undone.returncode == 0, undone.stderr
    assert undone.stdout.startswith(f"finished the interrupted promotion of {b}")
    assert f"rollback: {a} is now in production (was {b})" in undone.stdout
    after = state(project)
    assert (after["record"], after["files"], after["journal"]) == (a, a, None)
    assert after["history"][-2:] == [("promote", b), ("rollback", a)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 API (moto) on loopback, with one bucket."""
    with moto_s3(tmp_path_factory.mktemp("moto") / "moto.log", BUCKET) as url:
        yield url


# `regraft promote B` whose S3 remote stops answering at a step (every request from then on goes to a closed
# port, as when the network drops): botocore's own connection error, the code's own handling.
PROMOTE_AS_THE_REMOTE_GOES = r"""
import os, sys
import tasks.registry, tasks.remote
from flows.cli import main
gone = []
opened = tasks.remote.S3Remote.__init__
def init(self, *args, **kwargs):
    opened(self, *args, **kwargs)
    def redirect(request, **_):
        if gone:
            request.url = request.url.replace(os.environ["AWS_ENDPOINT_URL"], os.environ["CLOSED_URL"])
    self.client.meta.events.register("before-send.s3", redirect)
tasks.remote.S3Remote.__init__ = init
step = tasks.registry.crash_point
def cut_at(name):
    step(name)
    if name == os.environ["REMOTE_GONE_AT"]:
        gone.append(name)
tasks.registry.crash_point = cut_at
sys.exit(main(["promote", os.environ["TAG"]]))
"""


def test_the_remote_unreachable_mid_promotion_leaves_a_journal_that_the_next_promote_finishes(regraft, s3, tmp_path):
    from tasks.registry import read_record

    env = {**AWS, "AWS_ENDPOINT_URL": s3}
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    project, (a, b) = new_project(regraft, tmp_path, f"s3://{BUCKET}/{tmp_path.name}", env)
    assert regraft(project, "promote", a, env=env).returncode == 0

    cut = regraft(project, code=PROMOTE_AS_THE_REMOTE_GOES,
                  env={**env, "CLOSED_URL": closed, "REMOTE_GONE_AT": "promote:installed", "TAG": b})
    assert cut.returncode == 2 and "Could not connect to the endpoint URL" in cut.stderr, cut.stderr
    assert cut.stderr.count("error:") == 1 and "Traceback" not in cut.stderr
    left = state(project)
    assert (left["record"], left["files"], left["journal"]["tag"]) == (a, b, b)

    # While the remote is still unreachable: models reports the interruption from this machine's copy; promote
    # refuses before it changes anything.
    down = {**env, "AWS_ENDPOINT_URL": closed}
    reported = regraft(project, "models", env=down)
    assert reported.returncode == 1 and f"warning: s3://{BUCKET}" in reported.stderr, reported.stderr
    assert f"the promotion of {b} (from {a}) was interrupted" in reported.stderr
    refused = regraft(project, "promote", b, env=down)
    assert refused.returncode == 2 and "reading the registry record failed" in refused.stderr, refused.stderr
    assert state(project) == left

    finished = regraft(project, "promote", b, env=env)  # the remote is back
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"finished the interrupted promotion of {b}")
    after = state(project)
    assert (after["record"], after["files"], after["journal"]) == (b, b, None)
    assert regraft(project, "models", "--json", env=env).returncode == 0
    assert json.loads(regraft(project, "models", "--json", env=env).stdout)["production"] == b
    assert read_record(project / "registry" / "registry.json")["history"][-1]["tag"] == b


def test_a_full_disk_while_packaging_leaves_the_store_the_record_and_the_reports_as_they_were(regraft, templates,
                                                                                             tmp_path):
    from tasks.files import sha256_of, write_json
    from tasks.gate import decide_on_verdict
    from tasks.reports import Verdict, read_report, write_report
    from tests.conftest import tree_digest

    folders, (a, b) = templates
    shutil.copytree(folders["promote"], tmp_path / "case")
    project = tmp_path / "case" / "project"
    candidate = project / "models" / "candidate"
    candidate.mkdir(parents=True)
    (candidate / "config.json").write_text("{}")
    (candidate / "model.safetensors").write_bytes(b"c" * 4096)
    verdict = project / "reports" / "verdict.json"
    write_report(verdict, Verdict(verdict="PASS", champion=False, criteria=[], failed=[], inconclusive=[],
                                  insufficient_data=[], notes=[]))
    write_report(project / "reports" / "decision.json", decide_on_verdict(read_report(verdict, Verdict),
                                                                           sha256_of(verdict), "reject"))
    write_json(project / "reports" / "package.json", {"stage": "package", "model": b})  # an earlier result
    kept = ("reports", "registry", "models", ".regraft/bentoml")
    before, records = tree_digest(project, kept), state(project)

    full = regraft(project, module="pipelines.package", env={"REGRAFT_DISK_FULL_AT": "package:model-copied"})
    assert full.returncode == 70, full.stderr  # not an input error, and not a bug: one line, no traceback
    assert "error: the disk is full (No space left on device" in full.stderr and "Traceback" not in full.stderr
    assert full.stderr.count("error:") == 1
    assert tree_digest(project, kept) == before  # the half-saved model is not in the store, nothing registered
    assert state(project) == records
    assert regraft(project, "models").returncode == 0


def test_the_remote_unreachable_mid_push_fails_the_push_and_the_next_push_completes(s3, tmp_path, monkeypatch):
    """The retrain flow's last step, `dvc push`, while the remote does not answer: the push (so the run) fails
    with DVC's own message, and nothing a run needs is only remote. The objects DVC keeps are content-addressed:
    the next push sends whatever did not arrive."""
    from flows.dvc_stage import dvc_command
    from flows.run_record import push_outputs
    from tasks.errors import InternalError

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for part in range(3):
        (project / "data" / f"part-{part}.txt").write_text(f"rows of part {part}\n" * 100)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["git", "init", "-q"], dvc_command("init", "-q"), dvc_command("add", "-q", "data"),
                 dvc_command("remote", "add", "-d", "shared", f"s3://{BUCKET}/{tmp_path.name}"),
                 dvc_command("remote", "modify", "--local", "shared", "endpointurl", closed)):
        subprocess.run(argv, cwd=project, check=True, capture_output=True)

    with pytest.raises(InternalError, match="dvc push to remote 'shared' failed"):
        push_outputs.fn(project)
    local = subprocess.run(dvc_command("status", "--json"), cwd=project, capture_output=True, text=True)
    assert json.loads(local.stdout or "{}") == {}, local.stdout  # the workspace and the local cache hold it all

    subprocess.run(dvc_command("remote", "modify", "--local", "shared", "endpointurl", s3), cwd=project, check=True)
    monkeypatch.setattr("flows.run_record.get_run_logger", lambda: __import__("logging").getLogger("push"))
    assert push_outputs.fn(project) == "shared"
    done = subprocess.run(dvc_command("status", "--cloud", "--json"), cwd=project, capture_output=True, text=True)
    assert json.loads(done.stdout or "{}") == {}, done.stdout


# A model whose gate said FAIL, registered beside the two (promotion never reaches its files).
REGISTER_FAILED = r"""
from pathlib import Path
from tasks.config import load_params
from tasks.registry import register
from tasks.remote import model_remote
params = load_params(Path("params.yaml"))
register(params.paths.registry, "regraft-classifier:failed", {"verdict": "FAIL", "sha256": {}}, remote=model_remote(params))
"""

# What `regraft serve` does first on a host: the remote's production model and shadow candidate in its store.
JOIN_AS_A_SERVING_HOST = r"""
import json
from pathlib import Path
from tasks.config import load_params
from tasks.promotion import install_served_models
from tasks.remote import model_remote
params = load_params(Path("params.yaml"))
remote = model_remote(params)
print(json.dumps(install_served_models(params, remote, remote.read_record()[0])))
"""


def test_a_bad_shadow_exits_2_naming_the_problem_with_the_registry_byte_identical(regraft, templates, tmp_path):
    """`regraft promote TAG --shadow` refuses, before anything changes (this machine's record and the remote's byte for
    byte), a model without a PASS, one whose files fail their sha256, the production model itself and a second
    shadow; `--shadow-off` with no shadow running. A host started while the shadow runs joins it; promoting the
    shadow candidate ends the shadow, both steps in the history."""
    from tasks.config import write_overrides
    from tasks.registry import read_record

    folders, (a, b) = templates
    shutil.copytree(folders["promote"], tmp_path / "case")  # A in production
    project = tmp_path / "case" / "project"
    assert regraft(project, code=REGISTER_FAILED).returncode == 0
    records = [project / "registry" / "registry.json", project.parent / "remote" / "registry.json"]
    name, version = b.split(":")
    weights = project / ".regraft" / "bentoml" / "models" / name / version / "model.safetensors"

    def refused(argv: list[str], message: str) -> None:
        before = [path.read_bytes() for path in records]
        done = regraft(project, "promote", *argv)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stdout, done.stderr)
        assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
        assert [path.read_bytes() for path in records] == before, argv

    refused(["regraft-classifier:failed", "--shadow"], "its gate verdict is FAIL")
    refused([a, "--shadow"], f"{a} is the production model itself")
    refused(["--shadow-off"], "no shadow candidate is running")
    refused(["--shadow"], "name the model TAG")
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + b"tampered")
    try:
        refused([b, "--shadow"], "model.safetensors: checksum differs")
    finally:
        weights.write_bytes(original)

    started = regraft(project, "promote", b, "--shadow")
    assert started.returncode == 0 and f"shadow: {b} now predicts beside {a}" in started.stdout, started.stderr
    refused([b, "--shadow"], f"{b} is already the shadow candidate")
    refused([a, "--shadow-off"], f"{a} is not the shadow candidate; {b} is")

    # A second serving host: no record of its own, the models already in its store (importing them from the remote's
    # archives is test_s3_remote's), the remote's record to follow.
    host = tmp_path / "host" / "project"
    shutil.copytree(project / ".regraft" / "bentoml", host / ".regraft" / "bentoml")
    shutil.copy2(project / "params.yaml", host / "params.yaml")
    write_overrides(host / "params.yaml", {"package.remote": str(project.parent / "remote")})
    joined = regraft(host, code=JOIN_AS_A_SERVING_HOST)
    assert json.loads(joined.stdout) == {"production": a, "shadow": b, "canary": None, "problem": None}, joined.stderr
    assert read_record(host / "registry" / "registry.json")["shadow"]["tag"] == b  # what its service follows

    promoted = regraft(project, "promote", b, "--reason", "held up on live traffic")
    assert promoted.returncode == 0, promoted.stderr
    assert (f"shadow-off: {b} no longer shadows production (promoted to production: held up on live traffic)\n"
            f"promote: {b} is now in production (was {a})") in promoted.stdout
    assert state(project)["history"][-3:] == [("shadow", b), ("shadow-off", b), ("promote", b)]
    assert read_record(records[1])["shadow"] is None


# What a retrain run does before its stages: the champion from the remote's record.
INSTALL_CHAMPION = r"""
from pathlib import Path
from tasks.config import load_params
from tasks.promotion import install_champion_from_remote
print(install_champion_from_remote(load_params(Path("params.yaml"))))
"""


def test_a_worker_with_no_or_altered_production_files_gates_against_the_remotes_production_model(regraft, templates,
                                                                                                 tmp_path):
    folders, (a, b) = templates
    shutil.copytree(folders["promote"], tmp_path / "case")  # A in production, in the remote's record too
    project = tmp_path / "case" / "project"
    shutil.rmtree(project / "models" / "production")  # a worker that never had it
    (project / "registry" / "registry.json").unlink()  # nor this machine's copy of the record
    done = regraft(project, code=INSTALL_CHAMPION)
    assert done.returncode == 0 and f"installed the production model {a} from the remote" in done.stdout, done.stderr
    assert state(project)["files"] == a and state(project)["record"] == a
    (project / "models" / "production" / "config.json").write_text('{"name": "altered"}')
    again = regraft(project, code=INSTALL_CHAMPION)
    assert f"installed the production model {a}" in again.stdout and state(project)["files"] == a, again.stderr
    assert regraft(project, code=INSTALL_CHAMPION).stdout.strip() == "None"  # in place: nothing to do
