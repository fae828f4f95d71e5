"""Writes that a crash cannot leave half done, and file digests: the one place for both.

A file is written to a temporary name beside its destination and renamed over it; a folder is built
beside its destination and swapped in with renames. Readers see the old version or the new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file beside `path`, then rename: a failed write leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        crash_point(f"write:{path.name}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# What regraft's processes create is the owner's alone: the state folder holds Prefect's database (every run's
# parameters and logs, and the key that decrypts its secret blocks) and the prediction log holds served texts.
PRIVATE_UMASK = 0o077


def keep_private(paths: list[Path]) -> list[Path]:
    """Take group and other permissions off each path and everything under it (folders 0700, files 0600 at
    most), so a project made before this rule, or a file copied in, is private too. Symlinks are left alone.
    Returns what was changed."""
    changed = []
    for top in paths:
        if not top.exists() or top.is_symlink():
            continue
        walked = [(top, [], [])] if top.is_file() else os.walk(top)
        for folder, subfolders, files in walked:
            for path in [Path(folder), *(Path(folder) / name for name in [*subfolders, *files])]:
                if path.is_symlink():
                    continue
                mode = path.stat().st_mode & 0o7777
                if mode & 0o077:
                    os.chmod(path, mode & ~0o077)
                    changed.append(path)
    return changed


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: with REGRAFT_CRASH_AT=<name>, this process dies here at once, as it
    would in a power cut (SIGKILL: no cleanup, no finally); with REGRAFT_DISK_FULL_AT=<name>, the write here
    fails as on a full disk (OSError ENOSPC), and the code's own error handling runs."""
    if os.environ.get("REGRAFT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("REGRAFT_DISK_FULL_AT") == name:
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")


def replace_directory(build: Callable[[Path], None], destination: Path) -> None:
    """Build a new folder beside `destination` with `build(staging)`, then swap it in by renames. A crash
    before the swap leaves the old folder; between the two renames, only `.<name>.old` holds it, and the
    next replace clears it."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.staging."))
    try:
        build(staging)
        crash_point("replace:built")
        retired = destination.with_name(f".{destination.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        if destination.exists():
            destination.rename(retired)
        crash_point("replace:old-moved-away")
        staging.rename(destination)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def text_sha256(text: str) -> str:
    """A text's sha256 as the prediction log keeps it (serve.log_texts: hash), so labels can find it later."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
