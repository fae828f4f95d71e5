"""The registry record: promotion rules, checksums, one production model, history, rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.registry import (
    ARCHIVED, CANDIDATE, PRODUCTION, RegistryError, file_digests, previous_production, promote, read_record, register,
)

pytestmark = pytest.mark.unit


def model_folder(base: Path, name: str) -> Path:
    folder = base / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name}))
    (folder / "model.safetensors").write_bytes(name.encode() * 100)
    return folder


@pytest.fixture
def registry(tmp_path):
    record = tmp_path / "registry" / "registry.json"
    models = {}
    for name, verdict, approved in (("a", "PASS", None), ("b", "PASS", None), ("failed", "FAIL", None),
                                    ("unsure", "INCONCLUSIVE", False), ("approved", "INCONCLUSIVE", True)):
        folder = model_folder(tmp_path / "store", name)
        decision = None if approved is None else {"approved": approved, "by": "ana", "reason": "x"}
        register(record, name, {"verdict": verdict, "decision": decision, "sha256": file_digests(folder)})
        models[name] = folder
    return record, models, tmp_path / "models" / "production"


def test_promote_copies_the_files_and_keeps_one_production_model(registry):
    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    promote(record_path, "b", models["b"], champion, "ana", "better")
    record = read_record(record_path)
    assert record["production"] == "b"
    assert [t for t, m in record["models"].items() if m["stage"] == PRODUCTION] == ["b"]
    assert record["models"]["a"]["stage"] == ARCHIVED and record["models"]["failed"]["stage"] == CANDIDATE
    assert file_digests(champion) == file_digests(models["b"])
    promoted = [e for e in record["history"] if e["action"] == "promote"]
    assert [(e["tag"], e["previous"], e["by"], e["reason"]) for e in promoted] == [
        ("a", None, "ana", "first"), ("b", "a", "ana", "better")]


@pytest.mark.parametrize("tag,message", [
    ("failed", "its gate verdict is FAIL"),
    ("unsure", "INCONCLUSIVE and was not approved"),
    ("nope", "no such model in the registry"),
])
def test_refuses_a_model_without_a_pass_or_an_approval(registry, tag, message):
    record_path, models, champion = registry
    with pytest.raises(RegistryError, match=message):
        promote(record_path, tag, models.get(tag, models["a"]), champion, "ana", "try")
    assert read_record(record_path)["production"] is None and not champion.exists()


def test_an_approved_inconclusive_model_can_be_promoted(registry):
    record_path, models, champion = registry
    promote(record_path, "approved", models["approved"], champion, "ana", "approved by a person")
    assert read_record(record_path)["production"] == "approved"


def test_refuses_a_model_whose_files_fail_their_checksum(registry):
    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    (models["b"] / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="model.safetensors: checksum differs"):
        promote(record_path, "b", models["b"], champion, "ana", "x")
    # Production is untouched.
    assert read_record(record_path)["production"] == "a" and file_digests(champion) == file_digests(models["a"])


def test_rollback_target_is_the_previous_production_model(registry):
    record_path, models, champion = registry
    assert previous_production(read_record(record_path)) is None
    promote(record_path, "a", models["a"], champion, "ana", "first")
    promote(record_path, "b", models["b"], champion, "ana", "second")
    assert previous_production(read_record(record_path)) == "a"
    promote(record_path, "a", models["a"], champion, "ana", "undo", action="rollback")
    record = read_record(record_path)
    assert record["production"] == "a" and record["history"][-1]["action"] == "rollback"
    assert previous_production(record) == "b"


def shadow_entries(record: dict) -> list[tuple]:
    return [(e["action"], e["tag"], e.get("beside")) for e in record["history"] if e["action"].startswith("shadow")]


def test_a_shadow_is_recorded_beside_production_and_ended_in_the_history(registry, tmp_path):
    from tasks.registry import shadow_of, start_shadow, stop_shadow
    from tasks.remote import DirectoryRemote

    record_path, models, champion = registry
    remote = DirectoryRemote(tmp_path / "shared")  # every serving host reads the remote's record
    promote(record_path, "a", models["a"], champion, "ana", "first", remote=remote)
    start_shadow(record_path, "b", models["b"], "ana", "try it on live traffic", remote=remote)
    shared = remote.read_record()[0]
    assert shadow_of(shared) == "b" and shared["shadow"]["beside"] == "a" and shared["production"] == "a"
    assert shared["models"]["b"]["stage"] == CANDIDATE and file_digests(champion) == file_digests(models["a"])
    assert shared["history"][-1] | {"at": None} == {"at": None, "action": "shadow", "tag": "b", "previous": None,
                                                     "beside": "a", "verdict": "PASS", "by": "ana",
                                                     "reason": "try it on live traffic"}
    assert read_record(record_path) == shared  # this machine's mirror
    with pytest.raises(RegistryError, match="a is not the shadow candidate; b is"):
        stop_shadow(record_path, "a", "ana", "x", remote=remote)
    record = stop_shadow(record_path, "b", "ana", "enough", remote=remote)
    assert shadow_of(record) is None and record["production"] == "a"
    assert shadow_entries(record) == [("shadow", "b", "a"), ("shadow-off", "b", None)]
    with pytest.raises(RegistryError, match="no shadow candidate is running"):
        stop_shadow(record_path, None, "ana", "again", remote=remote)


@pytest.mark.parametrize("ending", ["promote the shadow", "promote another", "rollback"])
def test_a_change_of_production_ends_the_shadow_first_in_the_history(registry, ending):
    from tasks.registry import shadow_of, start_shadow

    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    start_shadow(record_path, "b", models["b"], "ana", "live")
    if ending == "promote the shadow":
        record = promote(record_path, "b", models["b"], champion, "ana", "it held up")
        reason = "promoted to production: it held up"
    elif ending == "promote another":
        record = promote(record_path, "approved", models["approved"], champion, "ana", "other")
        reason = "promote of approved: other"
    else:
        promote(record_path, "approved", models["approved"], champion, "ana", "other")
        start_shadow(record_path, "b", models["b"], "ana", "again, beside the new one")
        record = promote(record_path, "a", models["a"], champion, "ana", "undo", action="rollback")
        reason = "rollback of a: undo"
    assert shadow_of(record) is None
    # The promotion stays the last entry (what `regraft promote` reports); the end of the shadow comes just before it.
    ended, changed = record["history"][-2:]
    assert (ended["action"], ended["tag"], ended["reason"], ended["at"]) == ("shadow-off", "b", reason, changed["at"])
    assert changed["action"] in ("promote", "rollback")


@pytest.mark.parametrize("tag,message", [
    ("failed", "its gate verdict is FAIL"),
    ("unsure", "INCONCLUSIVE and was not approved"),
    ("nope", "no such model in the registry"),
    ("a", "a is the production model itself"),
    ("b", "model.safetensors: checksum differs"),
    ("approved", "b is already the shadow candidate"),
])
def test_a_shadow_is_refused_with_the_problem_named_and_the_record_unchanged(registry, tag, message):
    from tasks.registry import start_shadow

    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    if tag == "approved":
        start_shadow(record_path, "b", models["b"], "ana", "live")
    else:
        (models["b"] / "model.safetensors").write_bytes(b"tampered")
    before = record_path.read_bytes()
    with pytest.raises(RegistryError, match=message):
        start_shadow(record_path, tag, models.get(tag, models["a"]), "ana", "try")
    assert record_path.read_bytes() == before


def test_a_shadow_needs_a_production_model(registry):
    from tasks.registry import start_shadow

    record_path, models, _ = registry
    with pytest.raises(RegistryError, match="there is no production model to shadow"):
        start_shadow(record_path, "b", models["b"], "ana", "try")


def test_a_promotion_on_one_host_reaches_another_through_a_directory_remote(registry, tmp_path):
    """Host A adopts a remote (its existing record is published on the first write), promotes, and host B,
    with an empty registry of its own, sees the remote's record; B's rollback is seen by A in turn."""
    from tasks.registry import sync_record
    from tasks.remote import DirectoryRemote

    record_path, models, champion = registry
    remote = DirectoryRemote(tmp_path / "shared")
    promote(record_path, "a", models["a"], champion, "ana", "first", remote=remote)
    other = tmp_path / "host-b" / "registry.json"
    seen = sync_record(other, remote)
    assert seen["production"] == "a" and set(seen["models"]) == {"a", "b", "failed", "unsure", "approved"}
    promote(other, "b", models["b"], tmp_path / "host-b" / "production", "bo", "from B", remote=remote)
    assert sync_record(record_path, remote)["production"] == "b"
    assert [e["by"] for e in read_record(record_path)["history"] if e["action"] == "promote"] == ["ana", "bo"]


def test_a_serving_host_never_mirrors_a_record_the_remote_has_replaced(registry, tmp_path):
    """A serving host reads the remote's record, installs its models, then mirrors it; a promotion written meanwhile
    (on this machine too: trainer and service may share a project) must not be undone by that stale copy."""
    from tasks.registry import mirror_remote_record
    from tasks.remote import DirectoryRemote

    record_path, models, champion = registry
    remote = DirectoryRemote(tmp_path / "shared")
    promote(record_path, "a", models["a"], champion, "ana", "first", remote=remote)
    read_by_the_follower, _ = remote.read_record()
    promote(record_path, "b", models["b"], champion, "ana", "while the follower installs a", remote=remote)
    before = record_path.read_bytes()
    assert mirror_remote_record(record_path, read_by_the_follower, remote) is False
    assert record_path.read_bytes() == before and read_record(record_path)["production"] == "b"
    host = tmp_path / "host-b" / "registry.json"  # a host with no record of its own mirrors the remote's current one
    assert mirror_remote_record(host, read_by_the_follower, remote) is False and not host.exists()
    assert mirror_remote_record(host, remote.read_record()[0], remote) is True
    assert read_record(host) == read_record(record_path)


def test_a_serving_host_installs_the_newer_record_when_the_remote_changes_while_it_installs(registry, tmp_path,
                                                                                            monkeypatch):
    """install_served_models: a promotion written while the host checks the models of the record it read is not
    undone; the host installs the newer record (checking only the models it had not checked) and mirrors that. A
    record that keeps changing is an error after a bounded number of tries, with this machine's copy untouched."""
    from types import SimpleNamespace

    import tasks.promotion as promotion
    from tasks.remote import CONFLICT_RETRIES, DirectoryRemote

    record_path, models, champion = registry
    remote = DirectoryRemote(tmp_path / "shared")
    promote(record_path, "a", models["a"], champion, "ana", "first", remote=remote)
    host = tmp_path / "host" / "registry.json"
    params = SimpleNamespace(paths=SimpleNamespace(registry=host))
    checked = []

    def check(params, remote_, record, tag, consequence):
        checked.append(tag)
        if len(checked) == 1:  # the trainer promotes b while the serving host checks a's files
            promote(record_path, "b", models["b"], champion, "ana", "meanwhile", remote=remote)

    monkeypatch.setattr(promotion, "install_checked", check)
    served = promotion.install_served_models(params, remote, remote.read_record()[0])
    assert served["production"] == "b" and checked == ["a", "b"]
    assert read_record(host) == read_record(record_path) and read_record(host)["production"] == "b"

    before = host.read_bytes()
    monkeypatch.setattr(promotion, "mirror_remote_record", lambda *args: False)  # the remote changes every time
    with pytest.raises(RegistryError, match=f"changed {CONFLICT_RETRIES} times"):
        promotion.install_served_models(params, remote, remote.read_record()[0])
    assert host.read_bytes() == before


def test_concurrent_writers_of_a_directory_remote_lose_no_update(tmp_path):
    import threading

    from tasks.remote import DirectoryRemote

    remote = DirectoryRemote(tmp_path / "shared")

    def host(name: str) -> None:
        for i in range(15):
            register(tmp_path / name / "registry.json", f"{name}{i}", {"verdict": "PASS"}, remote=remote)

    threads = [threading.Thread(target=host, args=(name,)) for name in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record, _ = remote.read_record()
    assert len(record["models"]) == 45 and len(record["history"]) == 45


def test_a_tampered_archive_or_record_in_the_remote_is_refused(tmp_path):
    from tasks.remote import DirectoryRemote, RemoteError, download_archive, upload_archive

    remote = DirectoryRemote(tmp_path / "shared")
    archive = tmp_path / "m.bentomodel"
    archive.write_bytes(b"weights" * 100)
    entry = upload_archive(remote, archive, "models/m/v1.bentomodel")
    (tmp_path / "shared" / "models" / "m" / "v1.bentomodel").write_bytes(b"evil" * 100)
    (tmp_path / "in").mkdir()
    with pytest.raises(RemoteError, match="checksum differs from the registry record"):
        download_archive(remote, entry, tmp_path / "in")
    (tmp_path / "shared" / "registry.json").write_text("[1, 2]")
    with pytest.raises(RemoteError, match="is not a registry"):
        remote.read_record()


def test_the_remote_is_package_remote_else_the_dvc_default_remote(tmp_path):
    import subprocess
    import sys

    from tasks.remote import DirectoryRemote, RemoteError, S3Remote, open_remote

    assert open_remote("", tmp_path) is None  # no DVC repo, no setting: models stay on this machine
    assert isinstance(open_remote("shared", tmp_path), DirectoryRemote)
    assert open_remote("shared", tmp_path).url == str(tmp_path / "shared")
    with pytest.raises(RemoteError, match="directory or s3:// only"):
        open_remote("gs://bucket/x", tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "s3", "s3://bucket/data"], cwd=tmp_path, check=True)
    remote = open_remote("", tmp_path)
    assert isinstance(remote, S3Remote) and (remote.bucket, remote.prefix) == ("bucket", "data/regraft-models")


def window(record_path, verdict: str, remote=None) -> dict:
    """One judged window of the running canary, as tasks/promotion.judge_canary_window records it: the texts served
    since the last window (up to a later time each call)."""
    from tasks.registry import canary_of, record_canary_window

    canary = canary_of(read_record(record_path))
    until = f"{canary.get('judged_until') or canary['since']}~"  # sorts after the last window's end
    return record_canary_window(record_path, canary["tag"], canary["since"], until, verdict, f"{verdict} on 300 rows",
                                {"rows": 300}, verdict == "worse", verdict == "not worse", "shift-watch", remote)[0]


def test_a_canary_counts_its_windows_and_a_worse_one_rolls_it_back_with_the_evidence(registry, tmp_path):
    from tasks.registry import canary_of, start_canary, stop_canary
    from tasks.remote import DirectoryRemote

    record_path, models, champion = registry
    remote = DirectoryRemote(tmp_path / "shared")  # every serving host reads the remote's record
    promote(record_path, "a", models["a"], champion, "ana", "first", remote=remote)
    start_canary(record_path, "b", models["b"], 0.25, 3, "ana", "a quarter of the traffic", remote=remote)
    shared = remote.read_record()[0]
    assert {k: shared["canary"][k] for k in ("tag", "beside", "fraction", "windows", "passed")} == {
        "tag": "b", "beside": "a", "fraction": 0.25, "windows": 3, "passed": 0}
    assert shared["history"][-1]["action"] == "canary" and read_record(record_path) == shared
    window(record_path, "not worse", remote)
    window(record_path, "not enough evidence yet", remote)  # recorded, not counted
    record = window(record_path, "not worse", remote)
    assert canary_of(record)["passed"] == 2 and record["production"] == "a"
    record = window(record_path, "worse", remote)
    assert canary_of(record) is None and record["production"] == "a" and file_digests(champion) == file_digests(models["a"])
    judged, ended = record["history"][-2:]
    assert (judged["action"], judged["verdict"], judged["passed"]) == ("canary-window", "worse", 2)
    assert (ended["action"], ended["tag"], ended["evidence"]) == ("canary-rolled-back", "b",
                                                                  {"rows": 300, "window": judged["window"]})
    assert ended["reason"] == "shown worse: worse on 300 rows" and remote.read_record()[0] == record
    with pytest.raises(RegistryError, match="no canary is running"):
        stop_canary(record_path, None, "ana", "again", remote=remote)


def test_a_promotion_ends_the_canary_and_a_canary_ended_meanwhile_is_not_judged(registry):
    from tasks.registry import canary_of, record_canary_window, start_canary, stop_canary

    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    start_canary(record_path, "b", models["b"], 0.5, 1, "ana", "half")
    since = canary_of(read_record(record_path))["since"]
    record = promote(record_path, "b", models["b"], champion, "shift-watch", "canary: not worse in 1 window")
    ended, changed = record["history"][-2:]
    assert (ended["action"], ended["reason"], changed["action"]) == (
        "canary-off", "promoted to production: canary: not worse in 1 window", "promote")
    with pytest.raises(RegistryError, match="the canary judged is no longer running"):
        record_canary_window(record_path, "b", since, f"{since}~", "worse", "late", {}, True, False, "shift-watch")
    start_canary(record_path, "a", models["a"], 0.5, 1, "ana", "the old one back, by half")
    with pytest.raises(RegistryError, match="b is not the canary; a is"):
        stop_canary(record_path, "b", "ana", "x")
    assert canary_of(stop_canary(record_path, "a", "ana", "enough")) is None


@pytest.mark.parametrize("tag,fraction,message", [
    ("b", 0.0, "must lie strictly between 0 and 1"),
    ("b", 1.0, "must lie strictly between 0 and 1"),
    ("b", 1.5, "must lie strictly between 0 and 1"),
    ("b", float("nan"), "must lie strictly between 0 and 1"),
    ("failed", 0.1, "its gate verdict is FAIL"),
    ("unsure", 0.1, "INCONCLUSIVE and was not approved"),
    ("a", 0.1, "a is the production model itself"),
    ("approved", 0.1, "b is already in canary"),
    ("shadowed", 0.1, "b is already the shadow candidate"),
])
def test_a_canary_is_refused_with_the_problem_named_and_the_record_unchanged(registry, tag, fraction, message):
    from tasks.registry import start_canary, start_shadow

    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    if tag == "approved":
        start_canary(record_path, "b", models["b"], 0.1, 3, "ana", "a tenth")
    elif tag == "shadowed":
        start_shadow(record_path, "b", models["b"], "ana", "live")
        tag = "approved"
    before = record_path.read_bytes()
    with pytest.raises(RegistryError, match=message):
        start_canary(record_path, tag, models.get(tag, models["a"]), fraction, 3, "ana", "try")
    assert record_path.read_bytes() == before


def test_a_shadow_is_refused_while_a_canary_runs(registry):
    from tasks.registry import start_canary, start_shadow

    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    start_canary(record_path, "b", models["b"], 0.1, 3, "ana", "a tenth")
    with pytest.raises(RegistryError, match="b is already in canary"):
        start_shadow(record_path, "approved", models["approved"], "ana", "both at once")


def test_a_window_never_judges_the_same_texts_twice_and_a_promotion_needs_the_canary_it_judged(registry):
    from tasks.registry import canary_of, record_canary_window, start_canary, stop_canary

    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    start_canary(record_path, "b", models["b"], 0.5, 1, "ana", "half")
    since = canary_of(read_record(record_path))["since"]
    record, _ = record_canary_window(record_path, "b", since, "2999-01-01T00:00:00", "not worse", "ok", {}, False, True,
                                     "shift-watch")
    assert canary_of(record)["judged_until"] == "2999-01-01T00:00:00"
    with pytest.raises(RegistryError, match="were already judged"):  # the same texts again: not a second window
        record_canary_window(record_path, "b", since, "2999-01-01T00:00:00", "not worse", "ok", {}, False, True, "x")
    stop_canary(record_path, "b", "ana", "ended by hand meanwhile")
    with pytest.raises(RegistryError, match="its canary ended or production changed while it was judged"):
        promote(record_path, "b", models["b"], champion, "shift-watch", "late", canary_since=since)
    assert read_record(record_path)["production"] == "a"


@pytest.mark.parametrize("canary, problem", [
    ("b", "not an object"),
    ({"tag": "b", "beside": "a", "since": "t", "windows": 3, "passed": 0, "fraction": "half"}, "fraction 'half'"),
    ({"tag": "b", "beside": "a", "since": "t", "windows": 3, "passed": 0, "fraction": 1.0}, "fraction 1.0"),
    ({"tag": 7, "beside": "a", "since": "t", "windows": 3, "passed": 0, "fraction": 0.1}, "tag is not text"),
    ({"tag": "b", "beside": "a", "since": "t", "windows": "3", "passed": 0, "fraction": 0.1}, "windows is not a count"),
])
def test_a_malformed_canary_entry_is_named_never_half_served_and_can_be_ended(registry, canary, problem):
    """The record is input from anyone with write access to it: a canary entry that is not one is refused with the
    problem named; a serving host lets production answer everything; `--canary-off` and a promotion still end it."""
    from tasks.registry import canary_of, record_promotion, stop_canary, write_record
    from tasks.serving import served_models

    record_path, models, champion = registry
    promote(record_path, "a", models["a"], champion, "ana", "first")
    record = read_record(record_path)
    write_record(record_path, {**record, "canary": canary})
    with pytest.raises(RegistryError, match="canary entry is malformed"):
        canary_of(read_record(record_path))
    served = served_models(record_path)
    assert (served.production, served.canary, served.canary_fraction) == ("a", None, None)
    assert problem in served.problem
    ended = stop_canary(record_path, None, "ana", "malformed")
    assert ended["canary"] is None and ended["history"][-1]["action"] == "canary-off"
    damaged = {**record, "canary": canary}
    record_promotion(damaged, "b", "a", "promote", "ana", "new model", "now")
    assert damaged["canary"] is None and damaged["production"] == "b"
