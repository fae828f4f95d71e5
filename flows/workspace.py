"""All-or-nothing runs: copy what a run may change, put it back if the run fails.

A failed run must leave the previous data, reports, dvc.lock and params.yaml as they were, even
though DVC deletes a stage's outputs before running it. A snapshot is complete once its manifest is
written; a run that died without restoring (a lost worker, SIGKILL) leaves a complete snapshot that the
next run, holding the project lock, puts back before it starts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.files import write_json

MANIFEST = "snapshot.json"


@dataclass(frozen=True)
class Snapshot:
    project_dir: Path
    store: Path
    present: tuple[Path, ...]
    absent: tuple[Path, ...]


def take_snapshot(project_dir: Path, paths: list[Path], store: Path) -> Snapshot:
    """Copy each path (file or folder, relative to the project) into `store`; the manifest, written last,
    says the copy is whole."""
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    present, absent = [], []
    unique = list(dict.fromkeys(paths))
    # A file inside a folder that is saved whole needs no copy of its own.
    outermost = [p for p in unique if not any(other in p.parents for other in unique)]
    for rel in outermost:
        source = project_dir / rel
        if not source.exists():
            absent.append(rel)
            continue
        target = store / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
        present.append(rel)
    write_json(store / MANIFEST, {"present": [str(p) for p in present], "absent": [str(p) for p in absent]})
    return Snapshot(project_dir, store, tuple(present), tuple(absent))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore(snapshot: Snapshot, only: tuple[Path, ...] | None = None) -> None:
    """Put every snapshotted path (or just those in `only`) back exactly; remove what did not exist before."""
    for rel in snapshot.absent:
        if only is None or rel in only:
            remove(snapshot.project_dir / rel)
    for rel in snapshot.present:
        if only is not None and rel not in only:
            continue
        target = snapshot.project_dir / rel
        remove(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = snapshot.store / rel
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)


def discard(snapshot: Snapshot) -> None:
    shutil.rmtree(snapshot.store, ignore_errors=True)


def recover_interrupted(project_dir: Path, runs: Path, snapshot_name: str) -> list[str]:
    """Put back the workspace of runs that died before restoring it (call only while holding the project
    lock, so none of them is alive). Returns one line per run, saying what was done."""
    done = []
    for store in sorted(runs.glob(f"*/{snapshot_name}")):
        manifest = store / MANIFEST
        if not manifest.is_file():
            # Died while taking the snapshot: nothing had been changed yet.
            shutil.rmtree(store, ignore_errors=True)
            done.append(f"{store.parent.name}: removed an unfinished snapshot (the run changed nothing)")
            continue
        listed = json.loads(manifest.read_text(encoding="utf-8"))
        snapshot = Snapshot(project_dir, store, tuple(Path(p) for p in listed["present"]),
                            tuple(Path(p) for p in listed["absent"]))
        restore(snapshot)
        discard(snapshot)
        done.append(f"{store.parent.name}: the run ended without restoring the workspace; put back "
                    + ", ".join(str(p) for p in snapshot.present) + " as they were before it")
    return done


def prune_failed_runs(runs: Path, keep: int) -> list[Path]:
    """Keep the reports of the last `keep` failed runs; remove older run folders. Returns what was removed."""
    folders = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    removed = folders[: max(len(folders) - keep, 0)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed
