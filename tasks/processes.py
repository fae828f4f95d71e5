"""Child servers and stage processes: waiting until one answers, and stopping one with everything it started.

Each child runs in its own session (start_new_session=True), so its process group holds its workers
(BentoML's, torchrun's, DVC's stage command) and one signal reaches them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class NotHealthy(Exception):
    """A server exited or did not answer in time; the message says which, with the end of its log."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 10) -> None:
    """SIGTERM the process group, wait up to `grace_seconds`, then SIGKILL whatever is left of it
    (children may outlive their parent)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_seconds)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not Path(log).is_file():
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float, log: Path | None = None) -> bytes:
    """Poll `url` until it answers 200 (returns the body); raise NotHealthy if the process exits first or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NotHealthy(f"the server exited with {process.returncode}" + (f"; see {log}:\n{log_tail(log)}" if log else ""))
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return response.read()
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise NotHealthy(f"no healthy server at {url} within {timeout:.0f} s" + (f"; see {log}" if log else ""))
