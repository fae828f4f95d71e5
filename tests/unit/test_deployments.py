"""deploy/prefect.yaml (work pool) and flows/deployments.py (`regraft ui`) declare the same deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.config import load_params

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_mirrors_the_served_deployments(monkeypatch):
    from flows.deployments import build_deployments

    from prefect.utilities.templating import apply_values

    params = load_params(REPO / "params.yaml")
    # `prefect deploy` fills {{ $REGRAFT_PROJECT_NAME }} from the environment, as here.
    monkeypatch.setenv("REGRAFT_PROJECT_NAME", params.project.name)
    document = apply_values(yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text()), {}, remove_notset=False)
    declared = {d["name"]: d for d in document["deployments"]}
    served = {d.name: d for d in build_deployments(params)}
    assert declared.keys() == served.keys() == {f"demo-{kind}" for kind in
                                                ("retrain", "retrain-scheduled", "promote", "rollback", "shift-watch")}
    for name, deployment in served.items():
        assert declared[name]["entrypoint"] == deployment.entrypoint
        assert declared[name]["tags"] == deployment.tags == ["regraft", "demo"]
        assert [s["cron"] for s in declared[name].get("schedules", [])] == [s.schedule.cron for s in deployment.schedules]
        assert [t["expect"] for t in declared[name].get("triggers", [])] == [sorted(t.expect) for t in deployment.triggers]
        # Each trigger answers to this project's events only.
        assert [t["match"] for t in declared[name].get("triggers", [])] == [
            {"prefect.resource.id": "regraft.project.demo"} for _ in deployment.triggers]
        assert all(t.match.model_dump() == {"prefect.resource.id": "regraft.project.demo"} for t in deployment.triggers)


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
    from flows.cli_environment import TELEMETRY_OFF

    declared = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    for deployment in declared["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert {k: env[k] for k in TELEMETRY_OFF} == TELEMETRY_OFF, deployment["name"]
        if deployment["entrypoint"].endswith(":shift_watch"):
            # It reads the serving hosts' logs: in a serving host's checkout, from that host's queue, not a clone.
            assert "REGRAFT_HERMETIC" not in env and env["REGRAFT_PROJECT"] == "{{ $REGRAFT_SERVING_PROJECT }}"
            assert deployment["work_pool"]["work_queue_name"] == "serving"
            assert deployment["pull"] == [{"prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $REGRAFT_SERVING_PROJECT }}"}}]
        else:  # hermetic: the project is the clone the pull steps make, not a checkout the worker names
            assert env["REGRAFT_HERMETIC"] == "1" and "REGRAFT_PROJECT" not in env, deployment["name"]
            assert "pull" not in deployment  # the file's own: git_clone


def test_a_work_pool_run_clones_the_repository_the_deployment_fixed_and_works_in_that_clone(monkeypatch):
    """`prefect deploy` stores the repository and branch from its own environment (never a run parameter); the
    run then works in the clone, where a hermetic run's stages pull from the DVC remote."""
    from prefect.utilities.templating import apply_values

    from flows.dvc_stage import repro_command
    from tasks.config import HERMETIC_ENV, hermetic_checkout

    monkeypatch.setenv("REGRAFT_GIT_URL", "https://git.example/team/demo.git")
    monkeypatch.setenv("REGRAFT_GIT_BRANCH", "main")
    pull = apply_values(yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())["pull"], {}, remove_notset=False)
    clone, cwd = pull[0]["prefect.deployments.steps.git_clone"], pull[1]["prefect.deployments.steps.set_working_directory"]
    assert (clone["repository"], clone["branch"]) == ("https://git.example/team/demo.git", "main")
    assert cwd["directory"] == "{{ %s.directory }}" % clone["id"]
    monkeypatch.setenv(HERMETIC_ENV, "1")
    assert hermetic_checkout() and repro_command("shift")[-4:] == ["repro", "--pull", "--single-item", "shift"]
    monkeypatch.setenv(HERMETIC_ENV, "0")
    assert not hermetic_checkout() and repro_command("shift")[-3:] == ["repro", "--single-item", "shift"]


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
    # Hermetic: the job has no project of its own (the pull steps clone it); credentials only from the secret.
    assert container["env"]["REGRAFT_HERMETIC"] == "1" and "REGRAFT_PROJECT" not in container["env"]
    assert "AWS_SECRET_ACCESS_KEY" not in container["env"]
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


@pytest.mark.parametrize("name, parameters", [
    ("retrain", {"project": "/etc"}),  # a parameter the flow does not take
    ("retrain", {"parameters": {"project": "/etc"}}),
    ("retrain", {"parameters": {"push": "yes please"}}),
    ("retrain", {"parameters": {"holdout_fraction": 2}}),
    ("rollback", {"project_dir": "/tmp"}),
    ("shift-watch", {"max_rows": "all"}),
    ("promote", {"tag": "regraft-classifier:x", "project": "/etc"}),
    ("promote", {"tag": "regraft-classifier:x", "rollout": "canary", "fraction": "half"}),
    ("promote", {"tag": "regraft-classifier:x", "rollout": "everyone"}),
])
def test_the_server_refuses_a_run_whose_parameters_its_flow_does_not_take(name, parameters):
    """What the server checks when a run is created (enforce_parameter_schema), with the schema it is sent."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows.deployments import build_deployments

    served = {d.name: d for d in build_deployments(load_params(REPO / "params.yaml"))}
    deployment = served[f"demo-{name}"]
    schema = deployment._parameter_openapi_schema.model_dump(exclude_unset=True)
    assert deployment.enforce_parameter_schema and schema["additionalProperties"] is False
    validate({**deployment.parameters, **({"tag": "t"} if name == "promote" else {})}, schema,
             raise_on_error=True)  # what the UI's Run button sends
    with pytest.raises(ValidationError):
        validate({**deployment.parameters, **parameters}, schema, raise_on_error=True)


def test_automations_may_send_only_to_the_hosts_fixed_at_start():
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
    from prefect.blocks.webhook import Webhook

    from flows.notifications import allowed_destinations, destination_problem
    from tasks.config import NotifyConfig
    from tasks.errors import ConfigError

    notify = NotifyConfig(webhook_url="")
    assert allowed_destinations(notify, "https://hooks.slack.com/services/T/B/x") == ["hooks.slack.com"]
    assert allowed_destinations(notify, "") == []
    with pytest.raises(ConfigError):
        allowed_destinations(notify, "http://{{ body }}/x")
    allowed = {"hooks.slack.com"}
    assert destination_problem(CustomWebhookNotificationBlock(name="n", url="https://hooks.slack.com/a"), allowed) is None
    assert destination_problem(SlackWebhook(url="https://hooks.slack.com/services/T/B/x"), allowed) is None
    for elsewhere in (CustomWebhookNotificationBlock(name="n", url="http://169.254.169.254/latest/meta-data"),
                      CustomWebhookNotificationBlock(name="n", url="http://{{body}}/x"),
                      CustomWebhookNotificationBlock(name="n", url="https://hooks.slack.com.evil.example/a"),
                      Webhook(url="http://127.0.0.1:4200/api/deployments/x", method="DELETE")):
        assert destination_problem(elsewhere, allowed), elsewhere
    assert destination_problem(CustomWebhookNotificationBlock(name="n", url="https://hooks.slack.com/a"), set())


def test_notify_allowed_hosts_when_the_config_names_them():
    from flows.notifications import allowed_destinations
    from tasks.config import NotifyConfig
    from tasks.errors import ConfigError

    team = NotifyConfig(webhook_url="", allowed_hosts=["hooks.slack.com", "Alerts.Example.com"])
    assert allowed_destinations(team, "https://hooks.slack.com/x") == ["alerts.example.com", "hooks.slack.com"]
    assert allowed_destinations(team, "") == ["alerts.example.com", "hooks.slack.com"]
    with pytest.raises(ConfigError, match="notify.allowed_hosts"):
        allowed_destinations(team, "http://169.254.169.254/latest")
