"""All-or-nothing runs: copy what a run may change, put it back if the run fails.

A failed run must leave the previous data, reports, dvc.lock and params.yaml as they were, even
though DVC deletes a stage's outputs before running it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Snapshot:
    project_dir: Path
    store: Path
    present: tuple[Path, ...]
    absent: tuple[Path, ...]


def take_snapshot(project_dir: Path, paths: list[Path], store: Path) -> Snapshot:
    """Copy each path (file or folder, relative to the project) into `store`."""
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
    return Snapshot(project_dir, store, tuple(present), tuple(absent))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore(snapshot: Snapshot) -> None:
    """Put every snapshotted path back exactly; remove what did not exist before the run."""
    for rel in snapshot.absent:
        remove(snapshot.project_dir / rel)
    for rel in snapshot.present:
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
