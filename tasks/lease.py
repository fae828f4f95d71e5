"""One retrain at a time per project across machines, also where no Prefect server sees the runs: a lease in the
shared remote.

The flock (tasks/locking.py) serializes runs on one machine, and the project's Prefect slot (flows/concurrency.py)
the runs that deployments start on any worker of a pool. A `regraft run` from a terminal on a second machine sees
neither, so a retrain also holds `leases/<project>.json` in the remote (package.remote, else the DVC remote's
regraft-models folder). It is written only where nobody holds it (a conditional write: S3 If-None-Match/If-Match on
the ETag, a directory's file lock and sha256), renewed in the background while the run lives, and given back at the
end. A run killed outright stops renewing: its lease expires `lease_seconds` after the last renewal (by the wall
clocks of the two machines: keep them in sync), or at once for a run on the same machine, which can see that the
holder's process is gone. The next run takes over and says whose lease it took.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

from tasks.locking import ProjectBusy
from tasks.remote import RemoteError

LEASE_SECONDS = 120.0
POLL_SECONDS = 2.0


def lease_name(project: str) -> str:
    return f"leases/{project}.json"


def this_holder(what: str) -> dict:
    """Who asks for the lease: the run, this host and process (with its start time, so a reused PID is not taken for
    the holder), and a token that tells this holder's writes from anyone else's."""
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
            "process_started": psutil.Process().create_time(), "token": uuid.uuid4().hex}


def describe(lease: dict) -> str:
    return f"{lease.get('what', 'a run')} (PID {lease.get('pid', '?')} on {lease.get('host', '?')}, " \
           f"since {lease.get('acquired_at', '?')})"


def why_free(lease: dict | None, now: float, where: str) -> str | None:
    """Why the lease can be taken (None: someone holds it): nobody holds it, it expired, or its holder's process on
    this machine is gone. A lease that is not a lease is refused: it is someone else's input."""
    if lease is None or lease.get("released_at"):
        return "free"
    expires = lease.get("expires_at")
    if not isinstance(expires, int | float) or not isinstance(lease.get("token"), str):
        raise RemoteError(f"{where}: not a run lease (expected expires_at and token); "
                          "delete it if no run holds the project")
    if expires < now:
        return f"it expired at {iso(expires)} (not renewed: its run was killed or lost its connection)"
    if lease.get("host") == socket.gethostname() and not process_alive(lease.get("pid"), lease.get("process_started")):
        return "its process on this machine is gone"
    return None


def process_alive(pid, started) -> bool:
    """Whether the lease holder's process still runs: the same PID with the same start time, and not a zombie (a
    killed process whose parent died too stays one where nothing reaps it)."""
    try:
        process = psutil.Process(int(pid))
        return (started is None or abs(process.create_time() - float(started)) < 1.0) \
            and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


@contextmanager
def remote_lease(remote, project: str, what: str, timeout_seconds: float, on_wait: Callable[[str], None],
                 lease_seconds: float = LEASE_SECONDS, poll_seconds: float = POLL_SECONDS) -> Iterator[dict]:
    """Hold the project's lease in `remote` for the block; wait up to `timeout_seconds` for a live holder, then fail
    as busy (exit 3). Yields this holder's lease."""
    name = lease_name(project)
    where = f"{remote.url}/{name}"
    me = this_holder(what)
    deadline = time.monotonic() + timeout_seconds
    waited = False
    while True:
        lease, version = remote.read_object(name)
        now = time.time()
        why = why_free(lease, now, where)
        if why is not None:
            mine = {**me, "acquired_at": iso(now), "expires_at": now + lease_seconds}
            if remote.write_object(name, mine, version):
                if why != "free":
                    on_wait(f"took over the project's lease {where} from {describe(lease)}: {why}")
                break
            continue  # another run wrote it between the read and the write: read again
        if not waited:
            on_wait(f"waiting for {describe(lease)} to finish: one retrain at a time per project on every machine "
                    f"(lease {where}, up to {timeout_seconds:g} s)")
            waited = True
        if time.monotonic() >= deadline:
            raise ProjectBusy(f"{where}: {describe(lease)} still holds the project after {timeout_seconds:g} s; try "
                              "again when it has finished (schedule.lock_timeout_seconds sets how long a run waits)")
        time.sleep(poll_seconds)
    stop = threading.Event()
    renewer = threading.Thread(target=renew, args=(remote, name, me["token"], lease_seconds, stop, on_wait),
                               name="regraft-lease", daemon=True)
    renewer.start()
    try:
        yield mine
    finally:
        stop.set()
        renewer.join()
        change(remote, name, me["token"], {"released_at": iso(time.time())})


def renew(remote, name: str, token: str, lease_seconds: float, stop: threading.Event,
          on_wait: Callable[[str], None]) -> None:
    """Push the lease's expiry forward every third of its length until `stop`; a lease that another run took (this
    one was not renewed in time) is said once, not fought over."""
    while not stop.wait(lease_seconds / 3):
        try:
            if not change(remote, name, token, {"expires_at": time.time() + lease_seconds}):
                on_wait(f"the project's lease {remote.url}/{name} was taken by another run: this run was not able to "
                        "renew it in time")
                return
        except RemoteError as exc:  # the remote is unreachable for a moment: try again at the next renewal
            on_wait(f"renewing the project's lease failed: {exc}")


def change(remote, name: str, token: str, update: dict) -> bool:
    """Apply `update` to the lease if this holder (`token`) still holds it; False when it does not."""
    for _ in range(5):
        lease, version = remote.read_object(name)
        if lease is None or lease.get("token") != token or lease.get("released_at"):
            return False
        if remote.write_object(name, {**lease, **update}, version):
            return True
    return False
