"""deploy/prefect.yaml (work pool) and flows/deployments.py (`regraft ui`) declare the same deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import load_params

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_mirrors_the_served_deployments():
    from flows.deployments import build_deployments

    declared = {d["name"]: d for d in yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())["deployments"]}
    served = {d.name: d for d in build_deployments(load_params(REPO / "params.yaml"), REPO)}
    assert declared.keys() == served.keys()
    for name, deployment in served.items():
        assert declared[name]["entrypoint"] == deployment.entrypoint
        assert [s["cron"] for s in declared[name].get("schedules", [])] == [s.schedule.cron for s in deployment.schedules]
        assert [t["expect"] for t in declared[name].get("triggers", [])] == [sorted(t.expect) for t in deployment.triggers]
