"""Promotion and rollback of packaged models (`regraft promote TAG`, `regraft rollback`, `regraft models`).

The registry record and the production model folder are versioned with DVC (`dvc add`) each time
production changes, so `git log` of their .dvc files plus the record's history say what served when.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path

from tasks.config import Params
from tasks.locking import project_lock
from tasks.packaging import bentoml_environment
from tasks.registry import RegistryError, check_promotable, finish_promotion, previous_production, promote, read_record


def stored_model_dir(params: Params, tag: str) -> Path:
    """The files of a packaged model in the BentoML store."""
    os.environ.update(bentoml_environment(params))
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(tag).path)
    except (NotFound, ValueError) as exc:
        raise RegistryError(f"{tag}: not in the BentoML store at {params.paths.bentoml_home} ({exc})") from None


def version_with_dvc(params: Params) -> str:
    """`dvc add` the record and the production folder; a project without DVC just skips this."""
    if not Path(".dvc").is_dir():
        return "not a DVC project: production files are not versioned"
    done = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(params.paths.registry),
                           str(params.paths.champion)], capture_output=True, text=True)
    if done.returncode != 0:
        return f"dvc add failed: {done.stderr.strip() or done.stdout.strip()}"
    return f"versioned with DVC: {params.paths.registry}.dvc, {params.paths.champion}.dvc (commit them with git)"


def finish_interrupted_promotion(params: Params) -> str | None:
    """Complete a promotion or rollback that a crash cut short (call while holding the project lock)."""
    return finish_promotion(params.paths.registry, params.paths.champion, lambda tag: stored_model_dir(params, tag))


def switch_production(params: Params, tag: str, reason: str, by: str | None, action: str) -> dict:
    """Checks (verdict, checksums), then production := tag. Returns the registry record."""
    check_promotable(read_record(params.paths.registry)["models"].get(tag), tag)  # before touching the store
    record = promote(params.paths.registry, tag, stored_model_dir(params, tag), params.paths.champion,
                     by or getpass.getuser(), reason, action=action)
    record["versioning"] = version_with_dvc(params)
    return record


def promote_model(params: Params, tag: str, reason: str, by: str | None = None) -> dict:
    """production := tag, after any retrain run of this project has finished (it compares against production)."""
    with project_lock(params.paths.state, f"promote {tag}", params.schedule.lock_timeout_seconds):
        finish_interrupted_promotion(params)
        return switch_production(params, tag, reason, by, "promote")


def rollback(params: Params, reason: str, by: str | None = None) -> dict:
    """Put the previous production model back, in one step."""
    with project_lock(params.paths.state, "rollback", params.schedule.lock_timeout_seconds):
        finish_interrupted_promotion(params)
        record = read_record(params.paths.registry)
        target = previous_production(record)
        if not target:
            current = record.get("production")
            raise RegistryError("nothing to roll back to: " + (f"{current} is the first production model"
                                                               if current else "no model has been promoted"))
        return switch_production(params, target, reason, by, "rollback")
