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
