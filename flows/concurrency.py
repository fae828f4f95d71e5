"""One run at a time per project on every worker that reports to the same Prefect server.

The project's flock (tasks/locking.py) only sees runs on its own machine. Runs that a pool hands to workers on
several machines meet at the server instead: retrain, promote and rollback started by a deployment each take the
one slot of a Prefect global concurrency limit named for the project (`regraft-project-<project.name>`), so the server queues the
second run whichever worker holds it. The slot is a lease that the running flow renews in the background; a
worker killed mid-run stops renewing it, and the server frees it when the lease expires, so the next run takes
over. Each flow then takes the flock as well, for commands on this machine that no server sees, and a retrain the
project's lease in the shared remote (tasks/lease.py), for runs on other machines that no server sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tasks.locking import ProjectBusy

# How long a dead worker keeps the project: its lease is renewed while the run lives, and expires this long
# after the last renewal; Prefect's server takes 60 s at least, and frees expired leases every 15 s. A run
# cancelled from the UI is stopped before its slot is given back, so the next run waits up to this long too.
LEASE_SECONDS = 60


def run_slot(project: str, what: str, timeout_seconds: float, on_wait: Callable[[str], None]):
    """What a flow run holds besides the flock: the project's slot when a deployment started it (a worker of a
    pool, on any machine). A run started from a terminal (`regraft run`) has no slot: its machine's flock
    serializes it, and its temporary local API runs no lease service, so a killed run's slot there would never
    be given back."""
    from prefect.runtime import deployment

    if deployment.get_id() is None:
        return contextlib.nullcontext()
    return project_slot(project, what, timeout_seconds, on_wait)


def project_lease(params, what: str, timeout_seconds: float, on_wait: Callable[[str], None]):
    """What a retrain holds besides its slot and flock: the project's lease in the shared remote (tasks/lease.py),
    so that runs no server sees (a `regraft run` from a terminal on another machine) take turns too; nothing to
    hold for a project without a remote."""
    from tasks.lease import remote_lease
    from tasks.remote import model_remote

    remote = model_remote(params)
    if remote is None:
        return contextlib.nullcontext()
    return remote_lease(remote, params.project.name, what, timeout_seconds, on_wait)


def project_limit_name(project: str) -> str:
    return f"regraft-project-{project}"


@contextlib.contextmanager
def project_slot(project: str, what: str, timeout_seconds: float, on_wait: Callable[[str], None],
                 lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold the project's slot on the Prefect server for the block's duration; wait up to `timeout_seconds` for
    a run that holds it, then fail as busy (exit 3). The limit is created on first use (one slot)."""
    from prefect import get_client
    from prefect.concurrency.sync import concurrency

    name = project_limit_name(project)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        limit = client.read_global_concurrency_limit_by_name(name)
    if limit.active_slots:
        on_wait(f"waiting for the project's slot {name}: another run of {project} holds it (on any worker)")
    slot = contextlib.ExitStack()
    try:
        slot.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=lease_seconds,
                                       strict=True, raise_on_lease_renewal_failure=True))
    except TimeoutError:
        raise ProjectBusy(f"{what}: another run of {project} held the project's slot {name} for more than "
                          f"{timeout_seconds:.0f} s (schedule.lock_timeout_seconds); try again later") from None
    with slot:
        yield
