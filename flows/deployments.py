"""The Prefect deployments of a regraft project, declared once: served locally by `regraft ui`, and
mirrored for a process work pool in deploy/prefect.yaml.

Every name carries the project's (`project.name`), so several projects share one Prefect server:
`<name>-retrain`, `<name>-retrain-scheduled`, `<name>-promote`, `<name>-rollback`, `<name>-shift-watch`, and
the retrain triggers answer only to events whose resource is this project (`regraft.project.<name>`).

- retrain: on demand (the UI's Run button, with the typed parameter form); also started by the
  `regraft.shift.detected` and `regraft.performance.degraded` events that shift-watch emits (the closed loop
  serve -> watch -> retrain), one trigger each, so a run shows which one started it.
- retrain-scheduled: the same flow on `schedule.retrain_cron`.
- promote: a model tag and its rollout (`full`; `shadow`: beside production, off the response path; `shadow-off`).
- rollback: nothing.
- shift-watch: on `schedule.shift_watch_cron`.

Each deployment's parameter schema is enforced by the server and closed (no parameter its flow does not take),
so a run with an unknown or malformed parameter is refused when it is created (409), never started.
"""

from __future__ import annotations

from flows.notifications import PERFORMANCE_DEGRADED, SHIFT_DETECTED, project_resource
from tasks.config import Params

# What each deployment does, the part of its name after the project's.
KINDS = ("retrain", "retrain-scheduled", "promote", "rollback", "shift-watch")


RETRAIN_TRIGGERS = {"retrain when serving traffic shifts": SHIFT_DETECTED,
                    "retrain when production is estimated to have got worse": PERFORMANCE_DEGRADED}


def deployment_name(kind: str, project: str) -> str:
    return f"{project}-{kind}"


def closed_parameter_schema(deployment):
    """The deployment with its parameter schema closed to the flow's own parameters: Prefect leaves a flow's
    top-level schema open (`additionalProperties` unset), so with schema enforcement alone the server would take
    `{"project": "/etc"}` and the run would crash at its start instead (SignatureMismatchError)."""
    from prefect.utilities.callables import ParameterSchema

    class ClosedParameterSchema(ParameterSchema):
        additionalProperties: bool = False

    schema = deployment._parameter_openapi_schema
    # Set explicitly: the deployment sends its schema with `exclude_unset=True`.
    deployment._parameter_openapi_schema = ClosedParameterSchema(**schema.model_dump(), additionalProperties=False)
    deployment.enforce_parameter_schema = True
    return deployment


def build_deployments(params: Params) -> list:
    """RunnerDeployments for `prefect.serve`. Their flows work on the project `regraft ui` was started in
    (REGRAFT_PROJECT): it is fixed there, not a parameter of a run."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.operations import promote, rollback, shift_watch
    from flows.retrain import retrain

    schedule, project = params.schedule, params.project.name
    tags = ["regraft", project]

    def name(kind: str) -> str:
        return deployment_name(kind, project)

    deployments = [
        retrain.to_deployment(
            name=name("retrain"), tags=tags,
            description=f"Retrain {project} on demand: every stage of dvc.yaml, all or nothing.",
            triggers=[DeploymentEventTrigger(name=trigger, expect={event}, match={"prefect.resource.id": project_resource(project)},
                                             posture="Reactive", threshold=1, parameters={"parameters": {"overrides": []}})
                      for trigger, event in RETRAIN_TRIGGERS.items()],
        ),
        retrain.to_deployment(name=name("retrain-scheduled"), tags=tags,
                              schedules=[Cron(schedule.retrain_cron, timezone=schedule.timezone)],
                              description=f"Retrain {project} on a schedule (schedule.retrain_cron)."),
        promote.to_deployment(name=name("promote"), tags=tags,
                              description=f"Promote a packaged model of {project} (PASS or approved) to production."),
        rollback.to_deployment(name=name("rollback"), tags=tags,
                               description=f"Put {project}'s previous production model back."),
        shift_watch.to_deployment(
            name=name("shift-watch"), parameters={"max_rows": schedule.shift_watch_rows}, tags=tags,
            schedules=[Cron(schedule.shift_watch_cron, timezone=schedule.timezone)],
            description="Serving traffic vs the production model's training data, and its estimated performance on "
                        "that traffic; emits regraft.shift.detected and regraft.performance.degraded."),
    ]
    return [closed_parameter_schema(deployment) for deployment in deployments]
