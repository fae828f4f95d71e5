"""One run at a time per project across machines: the project's slot on the Prefect server (flows/concurrency.py),
taken by separate processes as workers on separate machines would (no shared flock between them). A killed
holder's lease running out needs the server's lease service, which a test harness server does not run: that
case is in test_operations, against `regraft ui`'s real server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

# Holds the project's slot for argv[3] seconds (waiting up to argv[2] s for it), printing when it got it and when
# it let it go; exit 3 when another run held it too long, as `regraft` exits.
HOLD = r"""
import sys, time
from flows.concurrency import project_slot
from tasks.locking import ProjectBusy
try:
    with project_slot(sys.argv[1], "test run", float(sys.argv[2]), lambda note: print("wait:", note, flush=True),
                      lease_seconds=60):
        print("held", time.time(), flush=True)
        time.sleep(float(sys.argv[3]))
        print("released", time.time(), flush=True)
except ProjectBusy as exc:
    print("busy:", exc, flush=True)
    sys.exit(3)
"""


def hold(project: str, wait: float, seconds: float, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, project, str(wait), str(seconds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stamp(output: str, word: str) -> float:
    return next(float(line.split()[1]) for line in output.splitlines() if line.startswith(word))


def test_two_runs_of_one_project_never_overlap_and_a_third_gives_up_as_busy(prefect_env):
    env = {**os.environ, **prefect_env}
    first = hold("slot-test", 60, 8, env)
    assert first.stdout.readline().startswith("held"), first.communicate()[0]
    second = hold("slot-test", 60, 1, env)
    time.sleep(1)
    third = hold("slot-test", 1, 0, env)  # gives up after 1 s while the first still holds the slot
    other = hold("slot-test-other", 5, 0, env)  # another project is not held up at all
    out_first, out_second = first.communicate(timeout=120)[0], second.communicate(timeout=120)[0]
    out_third, out_other = third.communicate(timeout=120)[0], other.communicate(timeout=120)[0]
    assert first.returncode == second.returncode == other.returncode == 0, out_first + out_second + out_other
    assert "wait: waiting for the project's slot regraft-project-slot-test" in out_second
    assert stamp(out_second, "held") >= stamp(out_first, "released"), (out_first, out_second)
    assert third.returncode == 3 and "another run of slot-test held the project's slot" in out_third, out_third
    assert stamp(out_other, "held") < stamp(out_first, "released")



# A first run's start of its temporary Prefect API on a fresh project, then one call to it.
FIRST_START = r"""
from flows.cli_environment import start_local_api
start_local_api()
from prefect import get_client
with get_client(sync_client=True) as client:
    print("answered", client.api_healthcheck() is None, flush=True)
"""


def test_two_first_runs_at_once_start_the_temporary_api_one_after_the_other(tmp_path):
    """Two runs started at once on a fresh project (no Prefect database yet): the real temporary API of each,
    started one at a time (the first creates the database), and neither prints a server-startup traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    racers = [subprocess.Popen([sys.executable, "-c", FIRST_START], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for racer in racers:
        out, err = racer.communicate(timeout=400)
        assert racer.returncode == 0 and "answered True" in out, err[-3000:]
        assert "Traceback" not in err and "already exists" not in err, err[-3000:]
