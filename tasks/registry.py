"""The model registry: which packaged model is in which stage, and how it got there.

Model files and their lineage live in the BentoML model store (one immutable version per packaged
candidate, sha256 of every file in its metadata). Stages and history live in one JSON record,
`paths.registry`, small enough to read in a diff and written atomically under a file lock:

    {"production": tag | null,
     "models": {tag: {"stage": candidate | production | archived, "verdict": ..., "metrics": ..., ...}},
     "history": [{"at", "action": register | promote | rollback | shadow | shadow-off | canary | canary-window |
                            canary-rolled-back | canary-off, "tag", "previous", "by", "reason"}],
     "shadow": {"tag", "beside", "since", "by", "reason"} | null,   (absent until a first shadow)
     "canary": {"tag", "beside", "fraction", "since", "windows", "passed", "by", "reason"} | null}   (likewise)

A shadow candidate predicts beside the production model on every serving host, off the response path. A canary
answers a share of the requests (`fraction`, the same texts on every host) while production answers the rest, each
model predicting the other's texts off the response path; each judged window that shows it not worse counts
towards `windows`, after which it is promoted, and one that shows it worse ends it (rolled back). One of the two
runs at a time; any change of production (a promotion, their own included, or a rollback) ends either.

With a shared remote (tasks/remote.py), the remote's copy of the record is the truth and `paths.registry`
is this machine's mirror of it: every change is written to the remote first, conditionally.

Promotion copies the model's files into `paths.champion` (what shift, evaluate and train.init=champion
read, and what DVC versions) and flips the stages; rollback promotes the previous production model.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tasks.errors import RegraftError
from tasks.files import crash_point, replace_directory, sha256_of, write_json
from tasks.gate import promotable

CANDIDATE, PRODUCTION, ARCHIVED = "candidate", "production", "archived"
# What the BentoML store writes into a model's folder beside the model's own files.
STORE_FILES = ("model.yaml",)


class RegistryError(RegraftError):
    """A promotion or rollback that must not happen, with the reason."""


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under a model folder, by relative path."""
    out = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        out[str(path.relative_to(folder))] = sha256_of(path)
    return out


def verify_files(folder: Path, expected: dict[str, str]) -> list[str]:
    """What differs between a folder and its recorded digests (empty: intact)."""
    found = file_digests(folder)
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(found))]
    problems += [f"{name}: checksum differs" for name in sorted(expected) if name in found and found[name] != expected[name]]
    problems += [f"{name}: not in the recorded model" for name in sorted(set(found) - set(expected))
                 if name not in STORE_FILES]
    return problems


def empty_record() -> dict:
    return {"production": None, "models": {}, "history": []}


def read_record(path: Path) -> dict:
    if not path.is_file():
        return empty_record()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RegistryError(f"{path}: the registry record is not valid JSON ({exc})") from None
    return {**empty_record(), **record}


def write_record(path: Path, record: dict) -> None:
    write_json(path, record)


class RecordUpdate:
    """The record under the lock, and the changes made to it. Each change is a function of the record alone,
    so with a shared remote it can be applied again to a record another host wrote in the meantime."""

    def __init__(self, record: dict):
        self.record = record
        self.changes: list[Callable[[dict], None]] = []

    def apply(self, change: Callable[[dict], None]) -> None:
        change(self.record)
        self.changes.append(change)


@contextlib.contextmanager
def locked_record(path: Path, remote=None) -> Iterator[RecordUpdate]:
    """Read-modify-write of the record under an exclusive lock: two promotions on this machine cannot interleave.
    With a remote, its record is the truth: the update starts from it and is written there first (conditional,
    retried on a conflict with another host), then mirrored to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        local = read_record(path)
        shared = remote.read_record()[0] if remote is not None else None
        update = RecordUpdate({**empty_record(), **shared} if shared else local)
        yield update
        if remote is not None:
            # A first write to the remote starts from this machine's record, so adopting a remote loses nothing.
            update.record = remote.update_record(lambda record: [change(record) for change in update.changes],
                                                 empty=local)
            if update.changes:
                crash_point("record:remote-written")  # the remote has the change, this machine's copy not yet
        elif not update.changes:
            return  # nothing changed: this machine's copy stays as it was, byte for byte
        write_record(path, update.record)


def same_record(one: dict | None, other: dict | None) -> bool:
    return {**empty_record(), **(one or {})} == {**empty_record(), **(other or {})}


def mirror_remote_record(path: Path, record: dict, remote) -> bool:
    """Write `record`, read from the remote earlier, as this machine's copy, but only while the remote still holds
    it: every writer on this machine writes the remote and then this copy under the same lock, so a record read
    before such a write is stale and must not overwrite it. The lock is this machine's alone (a mirror never writes
    the remote), and the remote is read while it is held: a network call that a promotion here waits for. The
    contents are compared, not the remote's version: a sync rewrites the remote's record unchanged, with a new
    version. Returns whether it was written."""
    with locked_record(path) as update:
        if not same_record(remote.read_record()[0], record):
            return False
        update.apply(lambda local: (local.clear(), local.update(record)))
    return True


def sync_record(path: Path, remote) -> dict:
    """This machine's copy of the record, refreshed from the remote when there is one (and it has a record)."""
    if remote is None:
        return read_record(path)
    with locked_record(path, remote) as update:
        return update.record


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def register(path: Path, tag: str, entry: dict, remote=None) -> None:
    """Add a packaged model as a candidate."""
    at = now()

    def add(record: dict) -> None:
        if record["models"].get(tag, {}).get("registered") == at:
            return  # already there: a write that succeeded although its answer was lost, then retried
        record["models"][tag] = {**entry, "stage": CANDIDATE, "registered": at}
        record["history"].append({"at": at, "action": "register", "tag": tag, "previous": None,
                                  "verdict": entry.get("verdict"), "by": entry.get("by", "package stage"),
                                  "reason": "packaged after the gate"})

    with locked_record(path, remote) as update:
        update.apply(add)


def check_promotable(entry: dict | None, tag: str) -> None:
    """A model may be promoted only with a PASS verdict, or an INCONCLUSIVE one that a person approved."""
    if entry is None:
        raise RegistryError(f"{tag}: no such model in the registry (see `regraft models`)")
    verdict = entry.get("verdict")
    if promotable(verdict, (entry.get("decision") or {}).get("approved") is True):
        return
    raise RegistryError(f"{tag}: its gate verdict is {verdict or 'missing'}"
                        + (" and was not approved" if verdict == "INCONCLUSIVE" else "")
                        + "; only a PASS (or an approved INCONCLUSIVE) model can be promoted")


def check_files(entry: dict, model_dir: Path, tag: str, consequence: str) -> None:
    """Every file of a packaged model must have the sha256 recorded for it at packaging."""
    problems = verify_files(model_dir, entry.get("sha256", {}))
    if not entry.get("sha256") or problems:
        raise RegistryError(f"{tag}: model files fail their checksum, {consequence}: "
                            + ("; ".join(problems[:5]) or "no checksums recorded"))


def install_files(source: Path, destination: Path) -> None:
    """Replace `destination` with a copy of `source` in one rename, so readers never see half a model."""
    replace_directory(lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True,
                                                      ignore=shutil.ignore_patterns(*STORE_FILES)), destination)


def journal_file(path: Path) -> Path:
    """The promotion under way, written before the production files change and removed once the record says so."""
    return path.with_name(f"{path.name}.pending")


def promote(path: Path, tag: str, model_dir: Path, champion: Path, by: str, reason: str,
            action: str = "promote", remote=None, canary_since: str | None = None) -> dict:
    """Make `tag` the production model: checks, then journal -> copy to `champion` -> record -> journal removed.
    A crash at any step leaves the journal, and `finish_promotion` completes the change. With `canary_since`: only
    while `tag` is still the canary started then, beside the production model it was judged against. Returns the
    record."""
    with locked_record(path, remote) as update:
        record = update.record
        entry = record["models"].get(tag)
        check_promotable(entry, tag)
        check_files(entry, model_dir, tag, "not promoted")
        canary = canary_of(record) if canary_since else None
        if canary_since and (not canary or (canary["tag"], canary["since"]) != (tag, canary_since)
                             or canary["beside"] != record["production"]):
            raise RegistryError(f"{tag}: its canary ended or production changed while it was judged; not promoted")
        previous = record["production"]
        if previous == tag:
            raise RegistryError(f"{tag} is already the production model")
        write_json(journal_file(path), {"action": action, "tag": tag, "previous": previous, "by": by,
                                        "reason": reason, "at": now()})
        crash_point("promote:journaled")
        install_files(model_dir, champion)
        crash_point("promote:installed")
        update.apply(promotion(tag, action, by, reason))
    crash_point("promote:recorded")
    journal_file(path).unlink()
    return json.loads(json.dumps(update.record))


def promotion(tag: str, action: str, by: str, reason: str) -> Callable[[dict], None]:
    """The change that makes `tag` production; `previous` is whatever the record being changed says, which may
    be another host's promotion made in between."""
    at = now()

    def change(record: dict) -> None:
        if record["production"] != tag:
            record_promotion(record, tag, record["production"], action, by, reason, at)

    return change


def record_promotion(record: dict, tag: str, previous: str | None, action: str, by: str, reason: str,
                     at: str) -> None:
    # A shadow or canary is compared with the production model it was started beside: a new production model ends it.
    for running, end in ((shadow_of(record), record_shadow_end), (raw_canary_tag(record), record_canary_end)):
        if running:
            why = "promoted to production" if running == tag else f"{action} of {tag}"
            end(record, by, f"{why}: {reason}", at)
    entry = record["models"][tag]
    if previous and previous in record["models"]:
        record["models"][previous]["stage"] = ARCHIVED
    entry["stage"] = PRODUCTION
    entry["promoted"] = at
    record["production"] = tag
    record["history"].append({"at": at, "action": action, "tag": tag, "previous": previous,
                              "verdict": entry.get("verdict"), "by": by, "reason": reason})


def shadow_of(record: dict) -> str | None:
    """The shadow candidate the record names, or None."""
    return (record.get("shadow") or {}).get("tag")


def start_shadow(path: Path, tag: str, model_dir: Path, by: str, reason: str, remote=None) -> dict:
    """Make `tag` the shadow candidate beside the production model, after the checks of a promotion (verdict, every
    file's sha256); it may be neither the production model nor displace a running shadow. Returns the record."""
    return start_beside_production(path, tag, model_dir, "shadow", "not shadowed", shadow_started(tag, by, reason),
                                   shadow_of, remote)


def start_beside_production(path: Path, tag: str, model_dir: Path, rollout: str, consequence: str,
                            change: Callable[[dict], None], running: Callable[[dict], str | None], remote) -> dict:
    """Start a shadow or canary of `tag`: the checks of a promotion and check_beside_production, then `change`;
    RegistryError when `running(record)` is not `tag` afterwards (another host changed production or started one in
    between). Returns the record."""
    with locked_record(path, remote) as update:
        record = update.record
        entry = record["models"].get(tag)
        check_promotable(entry, tag)
        check_files(entry, model_dir, tag, consequence)
        check_beside_production(record, tag, rollout)
        update.apply(change)
    if running(update.record) != tag:
        raise RegistryError(f"{tag}: the registry changed while starting the {rollout}; see `regraft models`")
    return json.loads(json.dumps(update.record))


def check_beside_production(record: dict, tag: str, rollout: str) -> None:
    """A shadow or a canary runs a candidate beside the production model: there must be one, it must not be the
    candidate, and no other shadow or canary may be running."""
    production, shadow, canary = record["production"], record.get("shadow"), raw_canary_tag(record)
    if not production:
        raise RegistryError(f"{tag}: there is no production model to {rollout} beside; promote one first")
    if production == tag:
        raise RegistryError(f"{tag} is the production model itself; a {rollout} runs a candidate beside it")
    if shadow:
        raise RegistryError(f"{shadow['tag']} is already the shadow candidate (since {shadow['since']}); "
                            "end it first with `regraft promote --shadow-off`")
    if canary:
        raise RegistryError(f"{canary} is already in canary; one canary at a time: end it first with "
                            "`regraft promote --canary-off`")


def shadow_started(tag: str, by: str, reason: str) -> Callable[[dict], None]:
    at = now()

    def change(record: dict) -> None:
        if record.get("shadow") or record.get("canary") or record["production"] in (None, tag):
            return  # already started (a retried write), or another host changed production or the shadow
        beside = record["production"]
        record["shadow"] = {"tag": tag, "beside": beside, "since": at, "by": by, "reason": reason}
        record["history"].append({"at": at, "action": "shadow", "tag": tag, "previous": None, "beside": beside,
                                  "verdict": record["models"][tag].get("verdict"), "by": by, "reason": reason})

    return change


def stop_shadow(path: Path, tag: str | None, by: str, reason: str, remote=None) -> dict:
    """End the running shadow (`tag`, when given, must be it) without promoting it. Returns the record."""
    at = now()
    with locked_record(path, remote) as update:
        running = shadow_of(update.record)
        if running is None:
            raise RegistryError("no shadow candidate is running; nothing to end")
        if tag and tag != running:
            raise RegistryError(f"{tag} is not the shadow candidate; {running} is")
        update.apply(lambda record: record_shadow_end(record, by, reason, at))
    return json.loads(json.dumps(update.record))


def record_shadow_end(record: dict, by: str, reason: str, at: str) -> None:
    tag = shadow_of(record)
    if tag:  # else already ended (a retried write, or another host)
        record["shadow"] = None
        record["history"].append({"at": at, "action": "shadow-off", "tag": tag, "previous": None, "by": by,
                                  "reason": reason})


def canary_of(record: dict) -> dict | None:
    """The running canary the record names ({tag, beside, fraction, since, windows, passed, ...}), or None. The
    record comes from a file or a remote anyone with write access may have edited: a canary entry that is not one is
    a RegistryError naming the problem, never a half-read split."""
    canary = record.get("canary")
    if not canary:
        return None
    problems = [] if isinstance(canary, dict) else ["not an object"]
    if not problems:
        problems += [f"{key} is not text" for key in ("tag", "beside", "since") if not isinstance(canary.get(key), str)]
        problems += [f"{key} is not a count" for key in ("windows", "passed")
                     if not isinstance(canary.get(key), int) or isinstance(canary.get(key), bool)]
        try:
            check_fraction(canary.get("fraction"))
        except RegistryError:
            problems.append(f"fraction {canary.get('fraction')!r} is not strictly between 0 and 1")
    if problems:
        raise RegistryError("the registry record's canary entry is malformed (" + "; ".join(problems) + "); end it with "
                            "`regraft promote --canary-off` or correct the record")
    return canary


def check_fraction(fraction: float) -> None:
    import math

    if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not math.isfinite(fraction)
            or not 0 < fraction < 1):
        raise RegistryError(f"canary fraction {fraction!r}: the share of requests the candidate answers must lie "
                            "strictly between 0 and 1 (0.1 for a tenth)")


def start_canary(path: Path, tag: str, model_dir: Path, fraction: float, windows: int, by: str, reason: str,
                 remote=None) -> dict:
    """Make `tag` the canary: it answers `fraction` of the requests on every serving host, after the checks of a
    promotion (verdict, every file's sha256); not the production model, not beside another shadow or canary."""
    check_fraction(fraction)
    if not isinstance(windows, int) or windows < 1:
        raise RegistryError(f"canary windows {windows!r}: at least 1 judged window before a full promotion")
    return start_beside_production(path, tag, model_dir, "canary", "not put in canary",
                                   canary_started(tag, float(fraction), windows, by, reason), raw_canary_tag, remote)


def canary_started(tag: str, fraction: float, windows: int, by: str, reason: str) -> Callable[[dict], None]:
    at = now()

    def change(record: dict) -> None:
        if record.get("shadow") or record.get("canary") or record["production"] in (None, tag):
            return  # already started (a retried write), or another host changed production or started one
        beside = record["production"]
        record["canary"] = {"tag": tag, "beside": beside, "fraction": fraction, "since": at, "windows": windows,
                            "passed": 0, "by": by, "reason": reason}
        record["history"].append({"at": at, "action": "canary", "tag": tag, "previous": None, "beside": beside,
                                  "fraction": fraction, "windows": windows,
                                  "verdict": record["models"][tag].get("verdict"), "by": by, "reason": reason})

    return change


def record_canary_window(path: Path, tag: str, since: str, until: str, verdict: str, reason: str, evidence: dict,
                         worse: bool, not_worse: bool, by: str, remote=None) -> tuple[dict, str]:
    """One judged window of the running canary `tag` (started at `since`), on the texts served up to `until`: shown
    worse ends it (canary-rolled-back, production untouched); shown not worse counts towards its windows; neither is
    recorded and changes nothing else. The next window judges only texts served after `until`, so no text counts
    twice. Returns the record and this window's id (in its history entries); RegistryError when the canary is no
    longer the one judged (another host ended it, or judged the same texts)."""
    import uuid

    at, window = now(), uuid.uuid4().hex

    def change(record: dict) -> None:
        canary = canary_of(record)
        if (not canary or (canary["tag"], canary["since"]) != (tag, since)
                or any(event.get("window") == window for event in record["history"])):
            return  # ended meanwhile (by another host), or this window's write retried
        canary["judged_until"] = until
        if not_worse:
            canary["passed"] += 1
        record["history"].append({"at": at, "action": "canary-window", "tag": tag, "previous": None, "window": window,
                                  "verdict": verdict, "passed": canary["passed"], "windows": canary["windows"],
                                  "texts_until": until, "evidence": evidence, "by": by, "reason": reason})
        if worse:
            record_canary_end(record, by, f"shown worse: {reason}", at, action="canary-rolled-back",
                              evidence={**evidence, "window": window})

    with locked_record(path, remote) as update:
        canary = canary_of(update.record)
        if not canary or (canary["tag"], canary["since"]) != (tag, since):
            raise RegistryError(f"{tag}: the canary judged is no longer running; see `regraft models`")
        if (canary.get("judged_until") or "") >= until:
            raise RegistryError(f"{tag}: the texts served up to {until} were already judged (up to "
                                f"{canary['judged_until']}); judge again when more traffic has come")
        update.apply(change)
    return json.loads(json.dumps(update.record)), window


def stop_canary(path: Path, tag: str | None, by: str, reason: str, remote=None) -> dict:
    """End the running canary by hand without promoting it (`tag`, when given, must be it). Returns the record."""
    at = now()
    with locked_record(path, remote) as update:
        running = raw_canary_tag(update.record)  # a malformed canary entry can be ended too
        if running is None:
            raise RegistryError("no canary is running; nothing to end")
        if tag and tag != running:
            raise RegistryError(f"{tag} is not the canary; {running} is")
        update.apply(lambda record: record_canary_end(record, by, reason, at))
    return json.loads(json.dumps(update.record))


def raw_canary_tag(record: dict) -> str | None:
    """The canary's tag as the record holds it, even when the rest of its entry is malformed ("?" if none is
    readable), so a promotion or --canary-off can always end it; None when no canary runs."""
    canary = record.get("canary")
    if not canary:
        return None
    tag = canary.get("tag") if isinstance(canary, dict) else None
    return tag if isinstance(tag, str) else "?"


def record_canary_end(record: dict, by: str, reason: str, at: str, action: str = "canary-off",
                      evidence: dict | None = None) -> None:
    tag = raw_canary_tag(record)
    if tag is not None:  # else already ended (a retried write, or another host)
        canary = record["canary"] if isinstance(record["canary"], dict) else {}
        record["canary"] = None
        entry = {"at": at, "action": action, "tag": tag, "previous": None, "beside": canary.get("beside"),
                 "passed": canary.get("passed"), "windows": canary.get("windows"), "by": by, "reason": reason}
        record["history"].append({**entry, "evidence": evidence} if evidence else entry)


def pending_promotion(path: Path) -> dict | None:
    """The journal of a promotion or rollback that has not finished (running now, or cut short), or None."""
    journal = journal_file(path)
    try:
        pending = json.loads(journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise RegistryError(f"{journal}: the journal of an interrupted promotion is not valid JSON ({exc}); "
                            "compare the registry record with the production files, then remove it by hand") from None
    return pending


def what_was_interrupted(pending: dict) -> str:
    """`promotion of X` or `rollback to X`, as the messages about an interrupted change name it."""
    return f"{'rollback to' if pending['action'] == 'rollback' else 'promotion of'} {pending['tag']}"


def describe_interruption(path: Path, champion: Path, pending: dict, record: dict | None = None) -> str:
    """An interrupted promotion for a person: which model, from which to which, since when, what is on disk
    and in the record now, and what the next `regraft promote` or `regraft rollback` will do."""
    record = record or read_record(path)
    tag, previous = pending["tag"], pending.get("previous")
    missing = "missing (the swap was cut between its two renames)" if previous else "not there yet"
    files = missing if not champion.is_dir() else next(
        (f"{name}'s" for name in (tag, previous) if name in record["models"]
         and not verify_files(champion, record["models"][name].get("sha256", {}))), "neither model's")
    then = (f"`regraft promote {tag}` or `regraft rollback` stops there" if pending["action"] == "rollback" else
            f"`regraft promote {tag}` stops there" + (f", `regraft rollback` then puts {previous} back" if previous else ""))
    return (f"the {what_was_interrupted(pending)} (from {previous or 'no production model'}) was interrupted: "
            f"started at {pending['at']} by {pending['by']} ({pending['reason']}), journal {journal_file(path)}. "
            f"The record names {record.get('production') or 'no model'} as production; the files in {champion} are "
            f"{files}. The next `regraft promote` or `regraft rollback` (or retrain run) first finishes it "
            f"({tag}'s files in {champion}, {tag} production in the record); then {then}, "
            f"and `regraft promote OTHER` promotes OTHER")


def finish_promotion(path: Path, champion: Path, model_dir_of, remote=None) -> str | None:
    """Complete a promotion that a crash interrupted (its journal is still there): the production files and the
    record both end on the journal's model. Returns what was done, or None when nothing was pending."""
    journal = journal_file(path)
    pending = pending_promotion(path)
    if pending is None:
        return None
    tag = pending["tag"]
    with locked_record(path, remote) as update:
        record = update.record
        entry = record["models"].get(tag)
        if entry is None:
            raise RegistryError(f"{journal}: names {tag}, which the registry does not know; remove the file by hand")
        if verify_files(champion, entry.get("sha256", {})) if champion.is_dir() else True:
            install_files(model_dir_of(tag), champion)
        update.apply(promotion(tag, pending["action"], pending["by"],
                               f"{pending['reason']} (completed after an interrupted {pending['action']})"))
    for leftover in champion.parent.glob(f".{champion.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a staging copy or the retired folder of the crashed swap
    journal.unlink()
    return (f"finished the interrupted {what_was_interrupted(pending)} started at {pending['at']} by {pending['by']} "
            f"(from {pending.get('previous') or 'no production model'})")


def production_problems(path: Path, champion: Path) -> list[str]:
    """Why the production files cannot be trusted to be the registry's production model (empty: they are)."""
    record = read_record(path)
    tag = record.get("production")
    problems = []
    if journal_file(path).is_file():
        problems.append(f"a promotion was interrupted ({journal_file(path)})")
    if tag:
        if not champion.is_dir():
            problems.append(f"{champion} is missing")
        else:
            problems += [f"{champion}/{p}" for p in verify_files(champion, record["models"][tag].get("sha256", {}))]
    return problems


def previous_production(record: dict) -> str | None:
    """The model that was in production before the current one (the target of a rollback)."""
    current = record.get("production")
    for event in reversed(record.get("history", [])):
        if event["action"] in ("promote", "rollback") and event["tag"] == current:
            return event.get("previous")
    return None
