"""Operations against a real Prefect server: `regraft ui` (server + served deployments), a custom run of
`retrain` clicked through the Prefect UI in chromium, schedules, notifications, and the
`regraft.shift.detected` event starting `retrain`."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tasks.processes import free_port
from tests.conftest import QUICK_SETTINGS, make_project, processes_in, shift_event

pytestmark = pytest.mark.integration
REGRAFT = str(Path(sys.executable).parent / "regraft")


UI_PROJECTS: set[Path] = set()  # the projects of the `regraft ui` servers these tests started


def api_client(base_url: str, credential: str) -> httpx.Client:
    """A client of the Prefect REST API behind `regraft ui`: basic auth with the UI's credential, and the CSRF
    token Prefect asks for on every call that changes something (fetched once, as Prefect's own client does)."""
    user, _, password = credential.partition(":")
    client_id, token = str(uuid.uuid4()), {}

    def add_csrf(request: httpx.Request) -> None:
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return
        if not token:
            fetched = httpx.get(f"{base_url}/csrf-token", params={"client": client_id}, auth=(user, password))
            token["value"] = fetched.json()["token"]
        request.headers["Prefect-Csrf-Token"] = token["value"]
        request.headers["Prefect-Csrf-Client"] = client_id

    return httpx.Client(base_url=base_url, timeout=30, auth=(user, password), event_hooks={"request": [add_csrf]},
                        transport=RetryingTransport())


class RetryingTransport(httpx.HTTPTransport):
    """Retries 502 and 503 with backoff, as Prefect's own client does: under load the server's SQLite database
    can be busy for a moment, and the server then answers 503 ("Service Unavailable") with nothing done."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in (1, 2, 4, 8, 0):
            response = super().handle_request(request)
            if response.status_code not in (502, 503) or not delay:
                return response
            response.read()
            response.close()
            time.sleep(delay)
        return response


@contextmanager
def running_ui(base: Path, settings: dict | None = None, credential: str | None = None):
    """`regraft ui` on a fresh project: a Prefect server on loopback and the deployments served. Its
    credential is `credential` (PREFECT_SERVER_API_AUTH_STRING) or, without one, the one it generates."""
    from tasks.config import write_overrides

    project = make_project(base / "project", base / "remote")
    UI_PROJECTS.add(project)
    if settings:
        write_overrides(project / "params.yaml", settings)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    if credential:
        env["PREFECT_SERVER_API_AUTH_STRING"] = credential
    log = (base / "ui.log").open("w")
    process = subprocess.Popen([REGRAFT, "ui", "--port", str(port)], cwd=project, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    generated = project / ".regraft" / "prefect-server" / "auth"
    api = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if api is None and (credential or generated.is_file()):
                api = api_client(f"http://127.0.0.1:{port}/api", credential or generated.read_text().strip())
            if api is not None and len(api.post("/deployments/filter", json={}).json()) >= 5:
                break
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("regraft ui did not serve its deployments:\n" + (base / "ui.log").read_text())
    try:
        yield api, project, base / "ui.log"
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


UI_CREDENTIAL = "operator:a-test-credential"
# Crons for the shared server that cannot fire during the tests: an hourly shift-watch at the top of the
# hour would find the drifted traffic logged below and start a retrain in the middle of another test.
QUIET_CRONS = {"schedule.retrain_cron": "0 3 1 1 *", "schedule.shift_watch_cron": "30 3 1 1 *"}


NOTIFICATIONS: list[dict] = []  # what the webhook receiver of the module's `regraft ui` got


@contextmanager
def webhook_receiver():
    """A loopback HTTP endpoint that keeps every JSON POST, standing in for a Slack or Teams webhook."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            NOTIFICATIONS.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_bert):
    """`regraft ui` on a project that trains the tiny model (QUICK_SETTINGS): the tests here are about the
    control plane, and the bundled model's own run is tested end to end in test_retrain_flow. Its
    notifications go to a webhook receiver on loopback."""
    with webhook_receiver() as hook:
        # A learning rate at which the browser's 8 epochs teach the tiny model something (validated accuracy about
        # 0.67), so that shift-watch has a model whose drop on degraded traffic can be seen; a progress line every
        # 50 steps, not every step (each is a Prefect log record: per step, they made training take 3 minutes).
        # The encoder alone is served (no lexical companion): the degraded traffic below is measured against it.
        # torch's dropout: whether shift-watch can certify this tiny model's drop depends on its training's masks
        # (with train.cpu_dropout fast, two draws missed the margin by 0.02 and 0.03; a lexical model served instead
        # showed no drop to ATC at all), so the test keeps the run it was written against.
        settings = {**QUICK_SETTINGS, "model.base": str(tiny_bert), "train.learning_rate": 1e-3, "train.log_every": 50,
                    "train.lexical_weights": [0.0], "train.cpu_dropout": "torch", **QUIET_CRONS,
                    "notify.webhook_url": hook}
        with running_ui(tmp_path_factory.mktemp("ui"), settings, credential=UI_CREDENTIAL) as served:
            yield served


@pytest.fixture(scope="module")
def dead_holder(ui):
    """A run of the project `slot-killed` whose worker was killed outright while it held the project's slot on
    the module's server. The module's first test asks for it, so that its lease runs out while the others run;
    a later test takes the slot over."""
    from tests.integration.test_project_slot import hold

    api, _, _ = ui
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": str(api.base_url).rstrip("/"), "PREFECT_API_AUTH_STRING": UI_CREDENTIAL})
    dead = hold("slot-killed", 60, 600, env)
    assert dead.stdout.readline().startswith("held"), dead.communicate()[0]
    dead.kill()
    dead.wait()
    return time.time(), env


def notified(api: httpx.Client, event: str, run_id: str, timeout: float = 90) -> dict:
    """The notification of `event` that links to the flow run `run_id` (waiting for it to arrive). regraft emits
    each event once, but Prefect's event delivery is at least once (a clean-clone run failed the exactly-once
    check right after a promotion, most likely on a repeat), so a repeat must be the same message, at most one."""
    link = f"{str(api.base_url).rstrip('/').removesuffix('/api')}/runs/flow-run/{run_id}"
    deadline, found = time.monotonic() + timeout, []
    while time.monotonic() < deadline and not found:
        found = [n for n in NOTIFICATIONS if n["subject"].startswith(f"regraft demo: {event}:") and link in n["body"]]
        time.sleep(1)
    assert found, f"no {event} notification for {link}; received: {NOTIFICATIONS}"
    time.sleep(3)  # a repeat would come within moments
    matching = [n for n in NOTIFICATIONS if n["subject"].startswith(f"regraft demo: {event}:") and link in n["body"]]
    assert len(matching) <= 2 and all(n == matching[0] for n in matching), matching
    return matching[0]


def deployment(api: httpx.Client, kind: str, project: str = "demo") -> dict:
    """A project's deployment by what it does (retrain, promote, ...): its name carries the project's."""
    from flows.deployments import deployment_name

    name = deployment_name(kind, project)
    return next(d for d in api.post("/deployments/filter", json={}).json() if d["name"] == name)


def wait_for_state(api: httpx.Client, run_id: str, states: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/flow_runs/{run_id}").json()
        if run["state"]["type"] in states:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} still {run['state']['type']} after {timeout} s\n{server_picture(api)}")


def server_picture(api: httpx.Client) -> str:
    """What every run on the server is doing, and who holds the run lock of each project it serves."""
    from flows.cli_environment import state_dir
    from tasks.locking import LOCK_NAME, describe_holder, read_holder

    runs = api.post("/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_DESC", "limit": 30}).json()
    lines = [f"{r['id']} {r['name']} deployment={r['deployment_id']} {r['state']['type']} {r['state']['name']}"
             for r in runs]
    for project in UI_PROJECTS:
        holder = read_holder(state_dir(project) / LOCK_NAME)
        lines.append(f"{project}: run lock held by {describe_holder(holder) if holder else 'nobody'}")
    return "\n".join(lines)


def cancel_run(api: httpx.Client, run_id: str, project: Path, may_finish_first: bool = False) -> None:
    """Cancel a run as the UI's Cancel button does (CANCELLING; the runner stops the flow's process) and
    check that nothing the run started is left running in the project. A tiny run can end (its gate failing)
    before the cancel lands: with `may_finish_first`, that is fine too."""
    ended = {"CANCELLED", "COMPLETED", "FAILED", "CRASHED"}
    started = wait_for_state(api, run_id, {"RUNNING"} | (ended if may_finish_first else set()), 120)
    if started["state"]["type"] == "RUNNING":
        api.post(f"/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLING"}})
    cancelled = wait_for_state(api, run_id, ended, 120)
    assert cancelled["state"]["type"] == "CANCELLED" or may_finish_first, cancelled["state"]
    # The state can say CANCELLED while the flow's process is still stopping its stage (SIGTERM, then SIGKILL
    # after 10 s): give it that long, then nothing of the run may be left.
    deadline, leftovers = time.monotonic() + 60, None
    while leftovers != [] and time.monotonic() < deadline:
        leftovers = [p.info["cmdline"] for p in processes_in(project)
                     if any("dvc" in part or "pipelines." in part for part in p.info["cmdline"] or [])]
        time.sleep(1)
    assert not leftovers, f"the cancelled run left processes behind: {leftovers}"


def test_the_api_asks_for_the_credential_and_answers_only_its_own_origin(ui, dead_holder):
    api, _, _ = ui
    base = str(api.base_url).rstrip("/")
    assert httpx.get(f"{base}/admin/version").status_code == 401  # no credential
    user, _, password = UI_CREDENTIAL.partition(":")
    assert httpx.get(f"{base}/admin/version", auth=(user, "guess")).status_code == 401
    assert httpx.post(f"{base}/deployments/filter", json={}).status_code in (401, 403)
    no_token = httpx.post(f"{base}/deployments/filter", json={}, auth=(user, password))
    assert no_token.status_code == 403 and "CSRF" in no_token.text  # a page elsewhere cannot act for the operator
    origin = base.removesuffix("/api")
    for page, allowed in (("http://evil.example", False), (origin, True)):
        preflight = httpx.options(f"{base}/deployments/filter", headers={
            "Origin": page, "Access-Control-Request-Method": "POST"})
        assert (preflight.headers.get("access-control-allow-origin") == page) is allowed, (page, preflight.headers)
        assert preflight.headers.get("access-control-allow-origin") != "*"


def test_the_deployments_exist_with_schedules_and_a_typed_form(ui):
    api, _, _ = ui
    names = {d["name"] for d in api.post("/deployments/filter", json={}).json() if "demo" in d["tags"]}
    assert names == {"demo-retrain", "demo-retrain-scheduled", "demo-promote", "demo-rollback", "demo-shift-watch"}
    scheduled = deployment(api, "retrain-scheduled")
    assert [s["schedule"]["cron"] for s in scheduled["schedules"]] == [QUIET_CRONS["schedule.retrain_cron"]]
    schema = deployment(api, "retrain")["parameter_openapi_schema"]
    fields = schema["definitions"]["RetrainParameters"]["properties"]
    assert fields["strategy"]["anyOf"][0]["enum"] == ["auto", "feature_extraction", "full", "gradual_unfreeze", "lora"]
    assert fields["holdout_fraction"]["anyOf"][0]["exclusiveMaximum"] == 1
    assert "description" in fields["on_severe_shift"] and "on_inconclusive" not in fields  # the project's policy
    # The project is fixed by `regraft ui`: a run that asks for another folder, or gives any parameter its flow
    # does not take or of the wrong type, is refused by the server when it is created, and no run exists.
    assert "project_dir" not in schema["properties"] and schema["additionalProperties"] is False
    def asked_for() -> int:  # runs someone asked for (the scheduler adds its own)
        return sum(not run["auto_scheduled"] for run in api.post("/flow_runs/filter", json={}).json())

    before = asked_for()
    for name, parameters in (("promote", {"tag": "x", "project_dir": "/tmp"}), ("retrain", {"project": "/etc"}),
                             ("retrain", {"parameters": {"project": "/etc"}}), ("retrain", {"parameters": {"push": "no"}}),
                             ("shift-watch", {"max_rows": "all"}), ("rollback", {"project": "/etc"})):
        refused = api.post(f"/deployments/{deployment(api, name)['id']}/create_flow_run", json={"parameters": parameters})
        assert refused.status_code == 409 and "Validation failed" in refused.text, (name, parameters, refused.text)
    assert asked_for() == before
    assert all(s["active"] for s in scheduled["schedules"]) and not scheduled["paused"]
    watch = deployment(api, "shift-watch")
    assert [s["schedule"]["cron"] for s in watch["schedules"]] == [QUIET_CRONS["schedule.shift_watch_cron"]]


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def form_field(scope, label: str):
    """One property of a Prefect UI form (run parameters, resume input), found by its label."""
    page = getattr(scope, "page", scope)  # a `has=` locator must come from the page, not from the scope
    return scope.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=label)).last


def note_refusal(response, refused: list[str]) -> None:
    """Keep a change the server refused (a POST, PATCH or DELETE answered 4xx or 5xx), with what it said."""
    if response.status < 400 or response.request.method == "GET":
        return
    try:
        said = response.text()[:300]
    except Exception:  # the page moved on before its body was read
        said = "(body unavailable)"
    refused.append(f"{response.status} {response.request.method} {response.url}: {said}")


def submit_until_accepted(page, submit, accepted, refused: list[str], call: str, project: Path,
                          wait_s: float = 45) -> None:
    """Click a form's Submit as a person does: once more when the UI did not take it (the server refused the
    form's `call`, or nothing happened within `wait_s`) and the button is still there, as a person clicks again
    after "Something went wrong". CI lost the one click once (the run's creation refused), a local run once (a
    Resume that never arrived), with no trace of why: a second miss fails with the refused calls and the server's
    log."""
    for attempt in range(2):
        seen = sum(call in r for r in refused)
        submit.click()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and sum(call in r for r in refused) == seen:
            if accepted():
                return
            page.wait_for_timeout(500)  # lets the page deliver its events (the refusals)
        page.wait_for_timeout(3000)  # a call that was slow, not refused, may still land
        if accepted():
            return
        if attempt == 0 and not (submit.is_visible() and submit.is_enabled()):
            break
    server_log = project / ".regraft" / "prefect-server" / "server.log"
    raise AssertionError(f"the UI did not take Submit; refused calls: {refused}\n"
                         f"server log: {server_log.read_text()[-3000:] if server_log.is_file() else '(none)'}")


NEEDS_CHROMIUM = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it")


@NEEDS_CHROMIUM
@pytest.mark.timeout(1800)
def test_a_person_runs_retrain_from_the_prefect_ui(ui):
    """Headless chromium clicks through the UI like a person: Deployments -> retrain -> Run -> Custom run,
    picks a strategy from the dropdown, types the epochs, switches push off, submits, opens the run and
    watches it complete with every stage's task and artifact. The screenshot is kept in test-artifacts/. (This is
    the module's one training run: the tests after it promote the model it packaged.)"""
    from playwright.sync_api import expect, sync_playwright

    api, project, log = ui
    base = str(api.base_url).removesuffix("/api/").removesuffix("/api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        refused: list[str] = []  # the changes the server refused, for the message if the test fails
        page.on("response", lambda response: note_refusal(response, refused))
        try:
            page.goto(f"{base}/deployments", wait_until="networkidle")
            # The server asks for its credential first, as it does any person opening the UI.
            page.get_by_placeholder("admin:pass").fill(UI_CREDENTIAL)
            page.get_by_role("button", name="Login").click()
            page.goto(f"{base}/deployments", wait_until="networkidle")
            page.locator("a.deployment-list__name", has_text="retrain").filter(has_not_text="scheduled").first.click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run", exact=True).click()

            strategy = form_field(page, "Strategy (Optional)")
            strategy.get_by_role("button", name="str", exact=True).click()  # the "str | None" switch
            strategy.locator(".p-select-button__control").click()
            page.keyboard.press("ArrowDown")  # opens the enum dropdown
            page.get_by_role("option", name="full", exact=True).click()
            epochs = form_field(page, "Epochs (Optional)")
            epochs.get_by_role("button", name="int", exact=True).click()
            epochs.locator("input[type=number]").fill("8")
            form_field(page, "Push (Optional)").get_by_role("switch").click()
            before = run_ids(api, "retrain")
            submit_until_accepted(page, page.get_by_role("button", name="Submit", exact=True),
                                  lambda: bool(run_ids(api, "retrain") - before), refused, "/create_flow_run", project)
            toast = page.locator(".toast-flow-run-create__button")
            expect(toast.first).to_be_visible()
            page.wait_for_timeout(1000)
            created = sorted(run_ids(api, "retrain") - before)
            assert len(created) == 1, f"one Submit created {len(created)} runs ({toast.count()} toasts)"
            run_id = created[0]
            # The toast's "View run" button sits under the toast container, which takes the click
            # (Playwright reports the interception); the button's link is the run page.
            page.goto(f"{base}/runs/flow-run/{run_id}", wait_until="networkidle")

            run = api.get(f"/flow_runs/{run_id}").json()
            assert run["parameters"]["parameters"]["strategy"] == "full"
            assert run["parameters"]["parameters"]["epochs"] == 8 and run["parameters"]["parameters"]["push"] is False
            # The run page redraws its live logs and timeline without pause: on two cores the headless browser
            # slowed the run's stages several-fold. It waits on a blank page and comes back when the run stops.
            page.goto("about:blank")
            finished = wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED", "PAUSED"}, 900)
            page.goto(f"{base}/runs/flow-run/{run_id}", wait_until="networkidle")
            if finished["state"]["type"] == "PAUSED":
                # An INCONCLUSIVE gate: the person answers the GateDecision form behind the Resume button.
                page.get_by_role("button", name="Resume").click()
                dialog = page.get_by_role("dialog")
                form_field(dialog, "Approve").get_by_role("switch").click()
                form_field(dialog, "Reason").locator("textarea").fill("a full fine-tuning run from the browser")
                form_field(dialog, "Reviewer").locator("textarea").fill("playwright")
                submit_until_accepted(page, dialog.get_by_role("button", name="Submit", exact=True),
                                      lambda: api.get(f"/flow_runs/{run_id}").json()["state"]["type"] != "PAUSED",
                                      refused, "/resume", project)
                finished = wait_for_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 600)
                decision = json.loads((project / "reports" / "decision.json").read_text())
                assert decision["approved"] is True and decision["by"] == "playwright"
            assert finished["state"]["type"] == "COMPLETED", log.read_text()[-4000:]
            page.reload(wait_until="networkidle")
            expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1500)  # let the timeline graph draw
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-retrain-run.png"), full_page=True)
            page.get_by_text("Artifacts", exact=True).click()
            expect(page.get_by_text("run-report").first).to_be_visible(timeout=15_000)
            expect(page.get_by_text("verdict-report").first).to_be_visible()
        finally:
            browser.close()
    tasks = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    assert {"ingest", "validate", "shift", "finetune", "evaluate", "gate", "package"} <= {t["name"] for t in tasks}
    artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    assert {"validate-report", "shift-report", "finetune-report", "evaluate-report", "verdict-report",
            "package-report", "run-report"} <= {a["key"] for a in artifacts}
    assert json.loads((project / "reports" / "finetune.json").read_text())["strategy"] == "full"
    assert (ARTIFACTS / "prefect-ui-retrain-run.png").stat().st_size > 10_000


def run_ids(api: httpx.Client, name: str, project: str = "demo") -> set[str]:
    """The flow runs of one deployment so far."""
    runs = api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment(api, name, project)["id"]]}}}).json()
    return {r["id"] for r in runs}


def new_run_ids(api: httpx.Client, name: str, before: set[str], timeout: float, project: str = "demo") -> set[str]:
    """Runs of the deployment that were not there `before`, waiting up to `timeout` s for the first."""
    deadline, new = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and not new:
        new = run_ids(api, name, project) - before
        time.sleep(2)
    return new


def run_deployment_and_wait(api: httpx.Client, name: str, parameters: dict, timeout: float = 600) -> dict:
    created = api.post(f"/deployments/{deployment(api, name)['id']}/create_flow_run", json={"parameters": parameters})
    assert created.status_code == 201, created.text
    return wait_for_state(api, created.json()["id"], {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout)


def started_by(api: httpx.Client, run_ids: set[str]) -> set[str]:
    """The names of the automations (deployment triggers) that created these flow runs: Prefect puts the automation's
    id first in the idempotency key of a run it starts."""
    automations = {a["id"]: a["name"] for a in api.post("/automations/filter", json={}).json()}
    return {automations.get((api.get(f"/flow_runs/{run_id}").json()["idempotency_key"] or "").split(",")[0]
                            .removeprefix("automation ")) for run_id in run_ids}


def test_a_failed_run_is_notified_once_with_its_link(ui):
    """A run that fails (here: validate, under a stricter row minimum than the data has) tells the webhook once,
    with the stage, the reason and the run's link. Before the shift-watch test: the retrains it cancels keep the
    project's slot until their lease expires, a minute this test would wait."""
    api, project, log = ui
    failed = run_deployment_and_wait(api, "retrain", {"parameters": {
        "overrides": ["validate.rows.train_min=100000"], "push": False}})
    assert failed["state"]["type"] == "FAILED", log.read_text()[-3000:]
    message = notified(api, "regraft.run.failed", failed["id"])
    assert "failed at stage validate" in message["subject"] and "verdict: none" in message["body"]


@NEEDS_CHROMIUM  # it promotes the model that the browser's run packaged
def test_promote_then_shift_watch_on_degraded_traffic_starts_retrain_and_feedback_audits_it(ui):
    """serve -> watch -> retrain -> labels: the model packaged by the browser's custom run is promoted through its
    deployment. The client then sends only the first three words of each review (degraded traffic); the production
    model's predictions on them are logged the way the service logs them. shift-watch finds the shift and estimates,
    from the model's holdout rows, a drop beyond monitor.max_drop: it emits regraft.shift.detected and
    regraft.performance.degraded, and each starts a retrain through its own trigger. When the labels arrive,
    `regraft feedback` records the realized accuracy next to the estimate: lower than validated, as estimated."""
    import pandas as pd

    from flows.deployments import RETRAIN_TRIGGERS
    from tasks.baselines import classifier_probabilities
    from tasks.registry import read_record
    from tasks.serving import PredictionLog

    api, project, log = ui
    tag = json.loads((project / "reports" / "package.json").read_text())["model"]
    promoted = run_deployment_and_wait(api, "promote", {"tag": tag, "reason": "from the test"})
    assert promoted["state"]["type"] == "COMPLETED", log.read_text()[-3000:]
    message = notified(api, "regraft.model.promoted", promoted["id"])
    # The browser's run of the tiny model may score below TF-IDF: the gate then says INCONCLUSIVE ("the simple
    # baseline scores higher") and the person approved it; the notification carries whichever verdict it got.
    verdict = json.loads((project / "reports" / "verdict.json").read_text())["verdict"]
    assert tag in message["subject"] and f"verdict: {verdict}" in message["body"]
    assert read_record(project / "registry" / "registry.json")["production"] == tag

    target = pd.read_parquet(project / "data" / "target_train.parquet")
    traffic = [" ".join(text.split()[:3]) for text in target["text"]]
    labels = ["negative", "neutral", "positive"]
    proba = classifier_probabilities(project / "models" / "production", {"served": traffic}, labels, 64,
                                     "production")["served"]
    PredictionLog(project / ".regraft" / "predictions.jsonl", "text").append(traffic, [
        {"label": labels[row.argmax()], "probabilities": dict(zip(labels, row.tolist())), "model_version": tag}
        for row in proba])
    before = run_ids(api, "retrain")
    watched = run_deployment_and_wait(api, "shift-watch", {"max_rows": 500})
    assert watched["state"]["type"] == "COMPLETED", log.read_text()[-3000:]
    report = json.loads((project / "reports" / "shift-watch.json").read_text())
    assert report["production_model"] == tag and report["served_rows"] == len(traffic)
    assert report["verdict"] in ("moderate", "severe"), report["reasons"]
    assert f"verdict: {report['verdict']}" in notified(api, "regraft.shift.detected", watched["id"])["body"]
    performance = report["performance"]
    assert performance["validation"] == {"source_holdout": 88, "target_holdout": 108}
    assert set(performance["methods"]) == {"atc", "expected_confusion", "importance_weighted"}
    assert performance["drop"]["degraded"], performance
    assert "verdict: degraded" in notified(api, "regraft.performance.degraded", watched["id"])["body"]
    artifacts = api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [watched["id"]]}}}).json()
    assert {"shift-watch-report", "production-performance"} <= {a["key"] for a in artifacts}
    deadline, new = time.monotonic() + 120, set()
    while time.monotonic() < deadline and started_by(api, new) != set(RETRAIN_TRIGGERS):
        new = run_ids(api, "retrain") - before
        time.sleep(2)
    assert started_by(api, new) == set(RETRAIN_TRIGGERS), started_by(api, new)
    for run_id in new:
        cancel_run(api, run_id, project, may_finish_first=True)
    assert "CANCELLED" in {api.get(f"/flow_runs/{run_id}").json()["state"]["type"] for run_id in new}

    pd.DataFrame({"comment": traffic, "stars": target["label"]}).to_csv(project / "labels.csv", index=False)
    done = subprocess.run([REGRAFT, "feedback", "labels.csv", "--columns", "text=comment,label=stars"], cwd=project,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    history = [json.loads(line) for line in (project / ".regraft" / "performance-history.jsonl").read_text().splitlines()]
    estimate, realized = history
    assert realized["estimate_id"] == estimate["id"] and realized["labelled_rows"] == len(traffic)
    assert realized["realized"]["accuracy"] < estimate["validated"]["accuracy"]


def test_the_state_the_reports_and_the_prediction_log_are_the_owners_alone(ui):
    """Prefect's database (every run's parameters and logs, the key to its secret blocks), the served texts and
    the reports: another local user can read none of them. Checked by mode and, as root, by reading as `nobody`.
    The reports are the browser's run's and the served texts shift-watch's test's: without chromium neither ran, and
    only the project's state is checked."""
    api, project, _ = ui
    database, served, verdict = (project / ".regraft" / "prefect-server" / "prefect.db",
                                 project / ".regraft" / "predictions.jsonl", project / "reports" / "verdict.json")
    browser_ran = Path(CHROMIUM).exists()  # else the tests that write the reports and the served texts were skipped
    private = [project / ".regraft", *([project / "reports", served] if browser_ran else [])]
    assert database.is_file() and all(path.exists() for path in private), private
    exposed = [str(path) for top in private for path in [top, *top.rglob("*")]
               if not path.is_symlink() and path.stat().st_mode & 0o077]
    assert not exposed, exposed[:10]
    if os.geteuid() != 0:
        return
    # Let `nobody` through the test's own temporary folders (0700 by pytest) so only regraft's modes stand in its way.
    ancestors = [folder for folder in project.parents if str(folder).startswith(tempfile.gettempdir() + "/")]
    modes = {folder: folder.stat().st_mode & 0o7777 for folder in [project, *ancestors]}
    try:
        for folder in modes:
            os.chmod(folder, modes[folder] | 0o011)
        def read_as_nobody(path: Path) -> subprocess.CompletedProcess:
            return subprocess.run(["cat", str(path)], user=65534, group=65534, capture_output=True)
        assert read_as_nobody(project / "params.yaml").returncode == 0  # the checkout itself stays readable
        for secret in [database, *([served, verdict] if browser_ran else [])]:
            denied = read_as_nobody(secret)
            assert denied.returncode != 0 and b"Permission denied" in denied.stderr, secret
    finally:
        for folder, mode in modes.items():
            os.chmod(folder, mode)


def test_the_credential_cannot_make_the_server_post_elsewhere(ui):
    """Server-side request forgery as a credential holder would try it: a Custom Webhook block and a Webhook block
    pointing at another host (a receiver on 127.0.0.2), an automation that sends through both on regraft's own
    event, and the event. regraft's notification reaches its webhook; the other host gets nothing, and the
    automation's actions fail saying why."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    api, _, _ = ui
    stolen: list[str] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_POST(self):
            stolen.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    elsewhere = ThreadingHTTPServer(("127.0.0.2", 0), Elsewhere)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    target = f"http://127.0.0.2:{elsewhere.server_port}/steal"
    created = []
    try:
        blocks = {}
        for slug, data in (("custom-webhook", {"name": "steal", "url": target, "method": "POST",
                                               "json_data": {"text": "{{body}}"}, "timeout": 10}),
                           ("webhook", {"method": "POST", "url": target, "headers": {}})):
            block_type = api.get(f"/block_types/slug/{slug}").json()
            schema = api.post("/block_schemas/filter", json={"block_schemas": {
                "block_type_id": {"any_": [block_type["id"]]}}}).json()[0]
            document = api.post("/block_documents/", json={"name": f"ssrf-{slug}", "data": data,
                                                           "block_schema_id": schema["id"], "block_type_id": block_type["id"]})
            assert document.status_code == 201, document.text  # the credential can create any block
            blocks[slug] = document.json()["id"]
            created.append(f"/block_documents/{blocks[slug]}")
        automation = api.post("/automations/", json={
            "name": "ssrf probe", "trigger": {"type": "event", "expect": ["regraft.run.failed"],
                                              "match": {"prefect.resource.id": "regraft.*"}, "posture": "Reactive",
                                              "threshold": 1, "within": 0},
            "actions": [{"type": "send-notification", "block_document_id": blocks["custom-webhook"],
                         "subject": "s", "body": "b"},
                        {"type": "call-webhook", "block_document_id": blocks["webhook"], "payload": "{}"}]})
        assert automation.status_code == 201, automation.text
        created.insert(0, f"/automations/{automation.json()['id']}")
        probe = f"ssrf probe {uuid.uuid4()}"

        def send_the_event():
            sent = api.post("/events", json=[{"id": str(uuid.uuid4()), "occurred": dt.datetime.now(dt.UTC).isoformat(),
                                              "event": "regraft.run.failed", "resource": {"prefect.resource.id": "regraft.project.demo"},
                                              "payload": {"project": "demo", "summary": probe, "verdict": "none",
                                                          "link": ""}}])
            assert sent.status_code == 204, sent.text

        # With SQLite the server loads a new automation into its triggers' cache in a task after the commit, so an
        # event sent at once can pass before the automation listens: send it again until both actions have failed.
        deadline, failures, delivered, resend = time.monotonic() + 120, [], False, 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= resend:
                send_the_event()
                resend = time.monotonic() + 15
            failures = api.post("/events/filter", json={"filter": {
                "event": {"prefix": ["prefect.automation.action.failed"]},
                "resource": {"id": [created[0].replace("/automations/", "prefect.automation.")]}}}).json()["events"]
            delivered = any(probe in n["subject"] for n in NOTIFICATIONS)
            if delivered and {e["payload"]["action_type"] for e in failures} == {"send-notification", "call-webhook"}:
                break
            time.sleep(1)
        assert delivered, NOTIFICATIONS  # regraft's own notification still goes out
        assert {e["payload"]["action_type"] for e in failures} == {"send-notification", "call-webhook"}, failures
        assert all("notify.allowed_hosts" in e["payload"]["reason"] for e in failures), failures
        time.sleep(2)
        assert stolen == []
    finally:
        for path in created:
            api.delete(path)
        elsewhere.shutdown()


def test_a_second_project_joins_the_server_and_each_answers_to_its_own_events(ui, tmp_path, tiny_bert):
    """Many projects, one Prefect server: `regraft ui --join` in another project serves its deployments, named
    for it, beside this one's; a shift event of that project starts its retrain and not this project's."""
    from tasks.config import write_overrides

    api, _, _ = ui
    other = make_project(tmp_path / "other", tmp_path / "other-remote")
    write_overrides(other / "params.yaml", {**QUICK_SETTINGS, "model.base": str(tiny_bert), **QUIET_CRONS,
                                            "project.name": "other"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": str(api.base_url).rstrip("/"), "PREFECT_API_AUTH_STRING": UI_CREDENTIAL})
    log = tmp_path / "join.log"
    joined = subprocess.Popen([REGRAFT, "ui", "--join"], cwd=other, env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    tags: list[list[str]] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and joined.poll() is None:
            tags = [d["tags"] for d in api.post("/deployments/filter", json={}).json()]
            if sum("other" in t for t in tags) == 5:
                break
            time.sleep(1)
        assert sum("demo" in t for t in tags) == 5 and sum("other" in t for t in tags) == 5, log.read_text()
        assert "joined the Prefect server at" in log.read_text() and "other-retrain" in log.read_text()
    finally:
        os.killpg(joined.pid, signal.SIGINT)
        joined.wait(timeout=60)
    # The other project's shift (its runner stopped, so its run waits, scheduled): its retrain gets a run, ours none.
    ours, theirs = run_ids(api, "retrain"), run_ids(api, "retrain", "other")
    sent = api.post("/events", json=[shift_event("other")])
    assert sent.status_code == 204, sent.text
    started = new_run_ids(api, "retrain", theirs, timeout=120, project="other")
    assert len(started) == 1, "the other project's trigger did not start its retrain"
    time.sleep(5)  # anything our own trigger would have started by now
    assert run_ids(api, "retrain") == ours
    for run_id in started:
        api.post(f"/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLED"}, "force": True})


def test_a_holder_killed_mid_run_frees_the_project_slot_when_its_lease_expires(ui, dead_holder):
    """A worker killed outright (SIGKILL: no cleanup) stops renewing its lease on the project's slot; the real
    server's lease service frees it once the lease (60 s here, the server's least) has run out, and the next run
    takes over."""
    from tests.integration.test_project_slot import hold, stamp

    killed_at, env = dead_holder
    taker = hold("slot-killed", 240, 0, env)
    output = taker.communicate(timeout=300)[0]
    assert taker.returncode == 0, output
    # Not before the lease ran out (nothing else could free it: the holder is dead), and not long after.
    assert 60 <= stamp(output, "held") - killed_at, output
    assert "wait:" not in output or stamp(output, "held") - killed_at < 60 + 15 + 15, output


def test_a_run_from_the_terminal_shows_in_the_running_ui(ui):
    """`regraft run` in a project whose `regraft ui` is up reports to that server (no PREFECT_API_URL given),
    so terminal runs appear beside the scheduled ones; Ctrl-C then stops it."""
    api, project, _ = ui
    before = {r["id"] for r in api.post("/flow_runs/filter", json={}).json()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_SERVER_API_AUTH_STRING"] = UI_CREDENTIAL  # the operator's, as given to `regraft ui`
    terminal = subprocess.Popen([REGRAFT, "run", "--no-push"], cwd=project, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, new = time.monotonic() + 180, []
        while not new and time.monotonic() < deadline and terminal.poll() is None:
            new = [r for r in api.post("/flow_runs/filter", json={}).json()
                   if r["id"] not in before and r["deployment_id"] is None]
            time.sleep(1)
        assert new and new[0]["flow_id"] == deployment(api, "retrain")["flow_id"], server_picture(api)
    finally:
        os.killpg(terminal.pid, signal.SIGINT)
        output = terminal.communicate(timeout=120)[0]
    assert "reporting to the Prefect server of `regraft ui` at http://127.0.0.1:" in output, output


def test_cron_schedules_fire(tmp_path):
    """The server's scheduler creates runs from the crons in params.yaml and the served runner executes
    them: shift-watch every minute (nothing in production yet, so it completes with nothing to watch);
    retrain-scheduled gets its nightly runs queued at 02:00 UTC."""
    with running_ui(tmp_path, {"schedule.shift_watch_cron": "* * * * *"}) as (api, project, log):
        # Without PREFECT_SERVER_API_AUTH_STRING, `regraft ui` generated a credential only its owner can read.
        generated = project / ".regraft" / "prefect-server" / "auth"
        assert generated.stat().st_mode & 0o777 == 0o600
        assert log.read_text().count("Prefect UI login (generated once") == 1
        watch = deployment(api, "shift-watch")
        deadline, fired = time.monotonic() + 240, None
        while time.monotonic() < deadline and fired is None:
            runs = api.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [watch["id"]]}}}).json()
            fired = next((r for r in runs if r["auto_scheduled"] and r["state"]["type"] == "COMPLETED"), None)
            time.sleep(2)
        assert fired is not None, "no scheduled shift-watch run completed:\n" + log.read_text()[-3000:]
        assert fired["created_by"]["type"] == "SCHEDULE"
        nightly = api.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment(api, "retrain-scheduled")["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
        assert nightly and all(r["auto_scheduled"] for r in nightly)
        assert {dt.datetime.fromisoformat(r["expected_start_time"]).strftime("%H:%M") for r in nightly} == {"02:00"}
