"""Promotion and rollback of packaged models (`regraft promote TAG`, `regraft rollback`, `regraft models`).

The registry record and the production model folder are versioned with DVC (`dvc add`) each time
production changes, so `git log` of their .dvc files plus the record's history say what served when.
With a shared remote (tasks/remote.py) its record is the truth: promotions from any host go there, and a
model packaged elsewhere is imported from there.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from tasks.config import DVC_DIR, Params
from tasks.errors import RegraftError
from tasks.locking import current_holder, project_lock
from tasks.packaging import bentoml_environment
from tasks.registry import (RegistryError, canary_of, check_files, check_promotable, describe_interruption,
                            empty_record, finish_promotion, install_files, journal_file, mirror_remote_record,
                            pending_promotion, previous_production, promote, read_record, record_canary_window,
                            shadow_of, start_canary, start_shadow, stop_canary, stop_shadow, sync_record, verify_files)
from tasks.remote import CONFLICT_RETRIES, download_archive, model_remote, scratch_folder


def stored_model_dir(params: Params, tag: str, remote=None, record: dict | None = None) -> Path:
    """The files of a packaged model in this machine's BentoML store, imported from the remote first when
    another host packaged it (the archive's sha256 is checked against the registry record)."""
    os.environ.update(bentoml_environment(params))
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(tag).path)
    except (NotFound, ValueError) as exc:
        missing = f"{tag}: not in the BentoML store at {params.paths.bentoml_home} ({exc})"
    record = record or read_record(params.paths.registry)
    archive = ((record["models"].get(tag) or {}).get("remote") or {}).get("model")
    if remote is None or not archive:
        raise RegistryError(missing + ("" if remote else "; no remote is configured to import it from"))
    with scratch_folder() as folder:
        imported = bentoml.models.import_model(str(download_archive(remote, archive, Path(folder))))
    return Path(imported.path)


def version_with_dvc(params: Params) -> str:
    """`dvc add` the record and the production folder; a project without DVC just skips this."""
    if not DVC_DIR.is_dir():
        return "not a DVC project: production files are not versioned"
    done = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", str(params.paths.registry),
                           str(params.paths.champion)], capture_output=True, text=True)
    if done.returncode != 0:
        return f"dvc add failed: {done.stderr.strip() or done.stdout.strip()}"
    return f"versioned with DVC: {params.paths.registry}.dvc, {params.paths.champion}.dvc (commit them with git)"


def finish_interrupted_promotion(params: Params, remote=None) -> str | None:
    """Complete a promotion or rollback that a crash cut short (call while holding the project lock); returns
    what was finished ("finished the interrupted promotion of X started at T ..."), or None."""
    if not journal_file(params.paths.registry).is_file():
        return None
    remote = remote or model_remote(params)
    return finish_promotion(params.paths.registry, params.paths.champion,
                            lambda tag: stored_model_dir(params, tag, remote), remote)


def interrupted_promotion(params: Params, record: dict) -> dict | None:
    """The promotion or rollback a journal says has not finished: its journal, whether it is still running
    (`running`: who holds the project) and, for a person, what is left and what the next command will do."""
    pending = pending_promotion(params.paths.registry)
    if pending is None:
        return None
    holder = current_holder(params.paths.state)
    if holder:
        return {**pending, "running": holder, "message": f"a {pending['action']} of {pending['tag']} is under way "
                f"({holder}); the record and the production files change until it has finished"}
    return {**pending, "running": None,
            "message": describe_interruption(params.paths.registry, params.paths.champion, pending, record)}


def finished_with_note(params: Params, record: dict, finished: str) -> dict:
    """The record after finishing an interrupted change that was the one asked for: nothing more to switch."""
    return {**record, "finished": finished, "versioning": version_with_dvc(params)}


def switch_production(params: Params, tag: str, reason: str, by: str | None, action: str, remote) -> dict:
    """Checks (verdict, checksums), then production := tag, in the remote's record too. Returns the record."""
    check_promotable(read_record(params.paths.registry)["models"].get(tag), tag)  # before touching the store
    record = promote(params.paths.registry, tag, stored_model_dir(params, tag, remote), params.paths.champion,
                     by or getpass.getuser(), reason, action=action, remote=remote)
    record["versioning"] = version_with_dvc(params)
    return record


def promote_model(params: Params, tag: str, reason: str, by: str | None = None) -> dict:
    """production := tag, after any retrain run of this project has finished (it compares against production)."""
    with project_lock(params.paths.state, f"promote {tag}", params.schedule.lock_timeout_seconds):
        remote = model_remote(params)
        pending = pending_promotion(params.paths.registry)
        finished = finish_interrupted_promotion(params, remote)
        record = sync_record(params.paths.registry, remote)
        if finished and pending["tag"] == tag and record.get("production") == tag:
            return finished_with_note(params, record, finished)  # what was asked for is what the crash cut short
        return {**switch_production(params, tag, reason, by, "promote", remote), "finished": finished}


def rollback(params: Params, reason: str, by: str | None = None) -> dict:
    """Put the previous production model back, in one step."""
    with project_lock(params.paths.state, "rollback", params.schedule.lock_timeout_seconds):
        remote = model_remote(params)
        pending = pending_promotion(params.paths.registry)
        finished = finish_interrupted_promotion(params, remote)
        record = sync_record(params.paths.registry, remote)
        if finished and pending["action"] == "rollback" and record.get("production") == pending["tag"]:
            return finished_with_note(params, record, finished)  # the rollback asked for is the one just finished
        target = previous_production(record)
        if not target:
            current = record.get("production")
            raise RegistryError((f"{finished}; " if finished else "") + "nothing to roll back to: "
                                + (f"{current} is the first production model"
                                                               if current else "no model has been promoted"))
        return {**switch_production(params, target, reason, by, "rollback", remote), "finished": finished}


def shadow_model(params: Params, tag: str, reason: str, by: str | None = None) -> dict:
    """`tag` becomes the shadow candidate: every serving host that follows the registry predicts each served text
    with it too, off the response path, and logs its predictions beside production's. Refused (nothing changed)
    for a model that could not be promoted, the production model itself, or while another shadow runs."""
    with project_lock(params.paths.state, f"shadow {tag}", params.schedule.lock_timeout_seconds):
        remote = model_remote(params)
        finished = finish_interrupted_promotion(params, remote)  # the shadow runs beside a trusted production model
        record = sync_record(params.paths.registry, remote)
        check_promotable(record["models"].get(tag), tag)  # before touching the store
        record = start_shadow(params.paths.registry, tag, stored_model_dir(params, tag, remote, record),
                              by or getpass.getuser(), reason, remote)
        return {**record, "finished": finished}


def end_shadow(params: Params, tag: str | None, reason: str, by: str | None = None) -> dict:
    """End the running shadow without promoting it (`tag`, when given, must be the shadow candidate)."""
    with project_lock(params.paths.state, "end the shadow", params.schedule.lock_timeout_seconds):
        return stop_shadow(params.paths.registry, tag, by or getpass.getuser(), reason, model_remote(params))


def canary_model(params: Params, tag: str, fraction: float, reason: str, by: str | None = None) -> dict:
    """`tag` becomes the canary: it answers `fraction` of the requests on every serving host that follows the
    registry (the same texts everywhere), production the rest. Refused (nothing changed) for a model that could not
    be promoted, a fraction outside (0, 1), the production model itself, or while another canary or a shadow runs."""
    from tasks.registry import check_fraction

    check_fraction(fraction)
    with project_lock(params.paths.state, f"canary {tag}", params.schedule.lock_timeout_seconds):
        remote = model_remote(params)
        finished = finish_interrupted_promotion(params, remote)  # the canary runs beside a trusted production model
        record = sync_record(params.paths.registry, remote)
        check_promotable(record["models"].get(tag), tag)  # before touching the store
        record = start_canary(params.paths.registry, tag, stored_model_dir(params, tag, remote, record), fraction,
                              params.monitor.canary_windows, by or getpass.getuser(), reason, remote)
        return {**record, "finished": finished}


def end_canary(params: Params, tag: str | None, reason: str, by: str | None = None) -> dict:
    """End the running canary by hand without promoting it (`tag`, when given, must be the canary)."""
    with project_lock(params.paths.state, "end the canary", params.schedule.lock_timeout_seconds):
        return stop_canary(params.paths.registry, tag, by or getpass.getuser(), reason, model_remote(params))


# What a judged window did to the canary.
CONTINUES, ROLLED_BACK, PROMOTED = "continues", "rolled back", "promoted"


@dataclass(frozen=True)
class CanaryJudgement:
    """One judged window: what it did, the comparison, the record after it, and its history entries (the window's,
    and the rollback or the promotion it caused, else None)."""

    outcome: str
    report: object  # tasks.reports.ShadowReport
    record: dict
    window: dict
    change: dict | None


def judge_canary_window(params: Params, feedback=None, origin: str = "", by: str | None = None) -> CanaryJudgement:
    """One window of the running canary (`regraft canary`, each shift-watch run): the remote's record mirrored here,
    the canary compared with production on the texts both predicted since its last window (tasks/shadow.py), and
    acted on. Shown worse by more than monitor.max_drop: rolled back at once (production answers everything again);
    shown not worse: the window counts, and once monitor.canary_windows have, it is promoted; otherwise it keeps
    running. The window and a rollback are written to the record alone, so neither waits for a retrain holding the
    project; only a promotion takes the project, as every promotion does."""
    from tasks.registry import promote as promote_in_record
    from tasks.shadow import NOT_WORSE, WORSE, canary_report

    by = by or getpass.getuser()
    remote = model_remote(params)
    sync_record(params.paths.registry, remote)
    report, judged = canary_report(params, feedback, origin)
    difference = report.difference
    gap = getattr(difference, difference.basis) if difference.basis else None
    evidence = {"basis": difference.basis, "rows": report.rows,
                "agreement": report.agreement.share if report.agreement else None,
                "macro_f1_difference": gap.macro_f1.estimate if gap else None,
                "interval": gap.macro_f1.interval if gap else None, "max_drop": report.max_drop}
    record, window_id = record_canary_window(params.paths.registry, judged.tag, judged.since, judged.until,
                                             report.verdict, report.reason, evidence, report.verdict == WORSE,
                                             report.verdict == NOT_WORSE, by, remote)
    entries = [event for event in record["history"] if event.get("window") == window_id
               or (event.get("evidence") or {}).get("window") == window_id]
    window = next(event for event in entries if event["action"] == "canary-window")
    rollback = next((event for event in entries if event["action"] == "canary-rolled-back"), None)
    if rollback:
        return CanaryJudgement(ROLLED_BACK, report, record, window, rollback)
    canary = canary_of(record)
    if canary and canary["tag"] == judged.tag and canary["passed"] >= canary["windows"]:
        reason = (f"canary: shown not worse than {canary['beside']} in {canary['passed']} judged windows "
                  f"({report.reason})")
        with project_lock(params.paths.state, f"promote the canary {judged.tag}", params.schedule.lock_timeout_seconds):
            finish_interrupted_promotion(params, remote)
            check_promotable(record["models"].get(judged.tag), judged.tag)
            record = promote_in_record(params.paths.registry, judged.tag, stored_model_dir(params, judged.tag, remote),
                                       params.paths.champion, by, reason, remote=remote, canary_since=judged.since)
            record["versioning"] = version_with_dvc(params)
        return CanaryJudgement(PROMOTED, report, record, window, record["history"][-1])
    return CanaryJudgement(CONTINUES, report, record, window, None)


def install_champion_from_remote(params: Params) -> str | None:
    """Before a run compares its candidate with production: the remote's record mirrored here and, unless
    paths.champion already holds exactly its production model's files, that model installed there from the
    remote (archive and every file checked against their recorded sha256). So a worker that starts with an
    old or no copy of the production model gates against the one the registry names. Call while holding the
    project lock. Returns what it did, or None (no remote, nothing in production, or already in place)."""
    remote = model_remote(params)
    if remote is None:
        return None
    record = sync_record(params.paths.registry, remote)
    tag = record.get("production")
    if not tag:
        return None
    digests = (record["models"].get(tag) or {}).get("sha256") or {}
    champion = params.paths.champion
    if digests and champion.is_dir() and not verify_files(champion, digests):
        return None
    folder = stored_model_dir(params, tag, remote, record)
    problems = verify_files(folder, digests) if digests else ["no checksums recorded"]
    if problems:
        raise RegistryError(f"{tag}: the production model's files fail their checksum, not used as the champion: "
                            + "; ".join(problems[:5]))
    install_files(folder, champion)
    return f"installed the production model {tag} from the remote into {champion} (every file's sha256 checked)"


def install_served_models(params: Params, remote, record: dict) -> dict:
    """On a serving host: make this machine's store hold the record's production model, its shadow candidate and
    its canary (imported from the remote, every file checked against its sha256), then mirror the record, which the
    service follows. A record the remote replaced while its models were installed is not mirrored (it would undo a
    promotion made meanwhile, on this machine too): the remote's newer one is installed instead, its models that
    were checked already not checked again. A production model that fails is an error (nothing mirrored); a shadow
    or canary that fails is only reported in `problem`, so production is served all the same. Returns
    {"production", "shadow", "canary", "problem"}."""
    checked: set[str] = set()
    for _ in range(CONFLICT_RETRIES):
        installed, record = install_record_models(params, remote, record, checked)
        if mirror_remote_record(params.paths.registry, record, remote):  # only now: the service follows this file
            return installed
        record = remote.read_record()[0] or {}
    raise RegistryError(f"{remote.url}: the registry record changed {CONFLICT_RETRIES} times while its models were "
                        "installed; try again")


def install_record_models(params: Params, remote, record: dict, checked: set[str]) -> tuple[dict, dict]:
    """The models `record` serves, in this machine's store and checked (each tag not in `checked`, which gains
    those that pass: a tag's recorded files never change): what install_served_models returns, and the record
    completed with its empty fields."""
    record = {**empty_record(), **record}

    def install(tag: str, consequence: str) -> None:
        if tag not in checked:
            install_checked(params, remote, record, tag, consequence)
            checked.add(tag)

    tag = record.get("production")
    if not tag:
        raise RegistryError(f"{remote.url}: no production model yet; promote one with `regraft promote TAG`")
    install(tag, "not served")
    shadow, (canary, problem) = shadow_of(record), readable_canary(record)
    if shadow:
        try:
            install(shadow, "not shadowed")
        except RegraftError as exc:
            shadow, problem = None, f"the shadow candidate is not loaded here: {exc}"
    if canary:
        try:
            install(canary["tag"], "not in canary here")
        except RegraftError as exc:
            canary, problem = None, f"the canary is not loaded here (production answers everything): {exc}"
    return {"production": tag, "shadow": shadow, "canary": canary_route(canary), "problem": problem}, record


def readable_canary(record: dict) -> tuple[dict | None, str | None]:
    """The record's canary, or None with the problem when its entry is malformed: a serving host then lets production
    answer everything and says why, instead of failing to serve."""
    try:
        return canary_of(record), None
    except RegistryError as exc:
        return None, f"no canary served: {exc}"


def canary_route(canary: dict | None) -> tuple[str, float] | None:
    """What a serving host needs of a running canary: its tag and the share of requests it answers."""
    return (canary["tag"], canary["fraction"]) if canary else None


def install_checked(params: Params, remote, record: dict, tag: str, consequence: str) -> None:
    """A model of the record in this machine's store, its files checked against their recorded sha256."""
    folder = stored_model_dir(params, tag, remote, record)
    check_files(record["models"].get(tag) or {}, folder, tag, consequence)


def follow_remote(params: Params, remote, served: dict, stop: threading.Event) -> None:
    """Poll the remote's record; when another host promotes, rolls back or starts or ends a shadow, import and check
    those models, then mirror the record, and the service swaps to them without dropping a request. Errors keep the
    current models and are told once each. `served` is what install_served_models returned at start."""
    told = served.get("problem")
    while not stop.wait(params.serve.reload_seconds):
        try:
            record, _ = remote.read_record()
            if not record or not record.get("production"):
                continue
            wanted = {"production": record["production"], "shadow": shadow_of(record),
                      "canary": canary_route(readable_canary(record)[0])}
            if wanted == {key: served.get(key) for key in wanted}:
                continue
            installed = install_served_models(params, remote, record)
            if installed["production"] != served["production"]:
                print(f"the remote's production model is now {installed['production']}: switching to it", flush=True)
            if installed["shadow"] != served["shadow"]:
                print(f"the remote's shadow candidate is now {installed['shadow'] or 'none'}", flush=True)
            if installed["canary"] != served.get("canary"):
                print(f"the remote's canary is now {installed['canary'] or 'none'}", flush=True)
            served, problem = installed, installed["problem"]
        except RegraftError as exc:
            problem = f"still serving {served['production']}: {exc}"
        if problem and problem != told:
            print(f"warning: {problem}", file=sys.stderr, flush=True)
        told = problem
