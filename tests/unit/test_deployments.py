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
    served = {d.name: d for d in build_deployments(load_params(REPO / "params.yaml"))}
    assert declared.keys() == served.keys()
    for name, deployment in served.items():
        assert declared[name]["entrypoint"] == deployment.entrypoint
        assert [s["cron"] for s in declared[name].get("schedules", [])] == [s.schedule.cron for s in deployment.schedules]
        assert [t["expect"] for t in declared[name].get("triggers", [])] == [sorted(t.expect) for t in deployment.triggers]


def test_no_run_can_point_a_flow_at_another_project():
    """The project is fixed where the deployments are created (REGRAFT_PROJECT), never a run parameter."""
    from flows.deployments import build_deployments

    for deployment in build_deployments(load_params(REPO / "params.yaml")):
        assert "project_dir" not in deployment._parameter_openapi_schema.properties, deployment.name
        assert deployment.enforce_parameter_schema  # a run with an unknown parameter is refused by the server
        assert "project_dir" not in deployment.parameters, deployment.name
    declared = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    assert all("project_dir" not in (d.get("parameters") or {}) for d in declared["deployments"])


def test_workers_get_the_commands_offline_and_telemetry_off_environment():
    from flows.cli import TELEMETRY_OFF

    declared = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    for deployment in declared["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert {k: env[k] for k in TELEMETRY_OFF} == TELEMETRY_OFF, deployment["name"]
        assert env["REGRAFT_PROJECT"] == "{{ $REGRAFT_PROJECT }}"
