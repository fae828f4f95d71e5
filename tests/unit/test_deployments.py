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


def test_the_kubernetes_work_pool_template_is_valid_and_renders_a_gpu_job_with_the_remote_secret():
    """deploy/kubernetes/base-job-template.json against what Prefect's server checks when a work pool is created
    (every placeholder declared as a variable), its variables as a JSON Schema, and the Job it renders with
    Prefect's own templating: a batch/v1 Job whose one container asks for the GPUs and reads the secret."""
    import json

    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / "deploy" / "kubernetes" / "base-job-template.json").read_text())
    WorkPoolCreate(name="regraft-gpu", type="kubernetes", base_job_template=template)  # raises when invalid
    variables = template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    values = {name: spec["default"] for name, spec in variables["properties"].items() if "default" in spec}
    values.update({"name": "retrain-run", "command": "python -m prefect.engine", "labels": {"app": "regraft"},
                   "job_watch_timeout_seconds": 3600, "gpu_count": 2})
    jsonschema.validate(values, variables)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**values, "gpu_count": -1}, variables)
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    assert (job["apiVersion"], job["kind"], job["spec"]["backoffLimit"]) == ("batch/v1", "Job", 0)
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and len(pod["containers"]) == 1
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["envFrom"] == [{"secretRef": {"name": "regraft-remote"}}]
    assert container["env"]["REGRAFT_PROJECT"] == "/srv/regraft" and "AWS_SECRET_ACCESS_KEY" not in container["env"]
    assert "{{" not in json.dumps(job)


def test_the_serving_requirements_are_pinned_and_leave_the_control_plane_out():
    import re

    pinned = {re.split(r"[=<>\[ ]", line)[0].lower().replace("_", "-")
              for line in (REPO / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")}
    serving = [line.strip().lower() for line in (REPO / "deploy" / "requirements-serve.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert serving and set(serving) <= pinned, set(serving) - pinned
    assert not {"prefect", "dvc", "great-expectations", "moto", "playwright"} & set(serving)
    dockerfile = (REPO / "deploy" / "Dockerfile.serve").read_text()
    assert "requirements-serve.txt -c requirements.lock" in dockerfile and "--no-deps -e ." in dockerfile
