"""The project's lease in the shared remote (tasks/lease.py), on a real directory remote: one holder at a time, a
live holder waited for, an expired or dead one taken over and named, renewal, and a lease that is not one refused."""

from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest

from tasks.lease import lease_name, remote_lease
from tasks.locking import ProjectBusy
from tasks.remote import DirectoryRemote, RemoteError

pytestmark = pytest.mark.unit


def other_holder(**changes) -> dict:
    """A lease as a live run on another machine leaves it."""
    return {"what": "retrain run other", "host": "trainer-2", "pid": 4242, "process_started": 1.0, "token": "t-other",
            "acquired_at": "2026-12-02T10:00:00+00:00", "expires_at": 4e9, **changes}  # 2096: live whenever it runs


def test_a_lease_is_held_for_the_block_and_given_back(tmp_path):
    remote = DirectoryRemote(tmp_path / "remote")
    with remote_lease(remote, "demo", "retrain run a", 5, print) as mine:
        held, _ = remote.read_object(lease_name("demo"))
        assert held["token"] == mine["token"] and held["host"] == socket.gethostname() and not held.get("released_at")
    released, _ = remote.read_object(lease_name("demo"))
    assert released["token"] == mine["token"] and released["released_at"]
    with remote_lease(remote, "demo", "retrain run b", 5, print) as second:  # a released lease is free at once
        assert second["token"] != mine["token"]


def test_a_live_holder_on_another_machine_is_waited_for_then_the_run_fails_as_busy(tmp_path):
    remote = DirectoryRemote(tmp_path / "remote")
    remote.write_object(lease_name("demo"), other_holder(), None)
    said = []
    with pytest.raises(ProjectBusy, match=r"retrain run other \(PID 4242 on trainer-2.*still holds the project"):
        with remote_lease(remote, "demo", "retrain run a", 0.3, said.append, poll_seconds=0.1):
            pytest.fail("the lease was taken from a live holder")
    assert len(said) == 1 and said[0].startswith("waiting for retrain run other")
    assert remote.read_object(lease_name("demo"))[0]["token"] == "t-other"  # untouched


@pytest.mark.parametrize("lease, why", [
    (other_holder(expires_at=1.0), "it expired at"),
    (other_holder(host=socket.gethostname(), pid=2 ** 22 + 17), "its process on this machine is gone"),
])
def test_an_expired_lease_or_one_whose_process_is_gone_is_taken_over_and_named(tmp_path, lease, why):
    remote = DirectoryRemote(tmp_path / "remote")
    remote.write_object(lease_name("demo"), lease, None)
    said = []
    with remote_lease(remote, "demo", "retrain run a", 1, said.append) as mine:
        assert remote.read_object(lease_name("demo"))[0]["token"] == mine["token"]
    assert len(said) == 1 and "took over the project's lease" in said[0] and "retrain run other" in said[0]
    assert why in said[0]


def test_a_holder_that_is_a_zombie_is_gone(tmp_path):
    """A killed run whose parent was killed too stays a zombie where nothing reaps it: its PID and start time
    still match, yet it runs nothing and renews nothing."""
    import subprocess
    import sys

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not yet waited for
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        started = psutil.Process(zombie.pid).create_time()
        remote = DirectoryRemote(tmp_path / "remote")
        remote.write_object(lease_name("demo"), other_holder(host=socket.gethostname(), pid=zombie.pid,
                                                             process_started=started), None)
        said = []
        with remote_lease(remote, "demo", "retrain run a", 1, said.append):
            pass
        assert len(said) == 1 and "its process on this machine is gone" in said[0]
    finally:
        zombie.wait()


def test_the_lease_is_renewed_while_the_run_lives(tmp_path):
    remote = DirectoryRemote(tmp_path / "remote")
    with remote_lease(remote, "demo", "retrain run a", 1, print, lease_seconds=0.6) as mine:
        time.sleep(0.9)  # past the first expiry: only renewal keeps it
        held, _ = remote.read_object(lease_name("demo"))
        assert held["expires_at"] > mine["expires_at"] and held["expires_at"] > time.time()


def test_two_runs_asking_at_once_hold_it_one_after_the_other(tmp_path):
    remote = DirectoryRemote(tmp_path / "remote")
    inside, overlaps = [], []

    def run(name: str) -> None:
        with remote_lease(remote, "demo", name, 10, lambda _: None, poll_seconds=0.05):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(list(inside))
            time.sleep(0.2)
            inside.remove(name)

    threads = [threading.Thread(target=run, args=(f"run {i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []


def test_a_lease_that_is_not_a_lease_is_refused_naming_it(tmp_path):
    remote = DirectoryRemote(tmp_path / "remote")
    remote.write_object(lease_name("demo"), {"holder": "someone", "expires_at": "tomorrow"}, None)
    with pytest.raises(RemoteError, match=r"leases/demo.json: not a run lease"):
        with remote_lease(remote, "demo", "retrain run a", 1, print):
            pass
    (tmp_path / "remote" / "leases" / "demo.json").write_text("{not json")
    with pytest.raises(RemoteError, match=r"leases/demo.json: the object in the remote is not valid JSON"):
        with remote_lease(remote, "demo", "retrain run a", 1, print):
            pass
