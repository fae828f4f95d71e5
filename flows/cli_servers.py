"""The commands that run until stopped: `regraft serve` (the production model behind BentoML, following promotions)
and `regraft ui` (a Prefect server and UI on 127.0.0.1, or `--join` a running one, serving the deployments)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from flows.cli_environment import api_status, ui_address_file, ui_home
from tasks.errors import EXIT_OK


def stop_on_sigint() -> None:
    """Ctrl-C stops a server command even where a shell that started it in the background left SIGINT ignored, which
    would otherwise orphan the server. SIGTERM (process managers, CI) already raises flows/cli.py's Terminated, a
    KeyboardInterrupt too: the server commands catch both and stop their servers."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)


def command_serve(args: argparse.Namespace, project: Path) -> int:
    import subprocess

    import threading

    from tasks.config import load_params
    from tasks.packaging import bentoml_environment
    from tasks.processes import stop_process_group
    from tasks.promotion import follow_remote, install_served_models
    from tasks.remote import model_remote
    from tasks.serving import production_tag

    params = load_params(project / "params.yaml")
    remote = model_remote(params)
    if remote is not None:
        record, _ = remote.read_record()
        served = (install_served_models(params, remote, record) if record else
                  {"production": production_tag(params.paths.registry), "shadow": None, "canary": None,
                   "problem": None})
        tag = served["production"]
        print(f"following promotions in {remote.url}", flush=True)
        if served["shadow"]:  # a host started while a shadow runs joins it
            print(f"shadow candidate {served['shadow']}: predicts every served text too, off the response path",
                  flush=True)
        if served["canary"]:  # and one started while a canary runs applies the same split
            print(f"canary {served['canary'][0]}: answers {served['canary'][1]:g} of the requests", flush=True)
        if served["problem"]:
            print(f"warning: {served['problem']}", file=sys.stderr, flush=True)
    else:
        tag = production_tag(params.paths.registry)
    host, port = args.host or params.serve.host, args.port or params.serve.port
    print(f"serving {tag} (and whatever is promoted later) on http://{host}:{port}; POST /predict, GET /healthz, "
          "GET /metrics; Ctrl-C stops", flush=True)
    env = {**os.environ, **bentoml_environment(params), "REGRAFT_PROJECT": str(project)}
    command = [sys.executable, "-m", "bentoml", "serve", "deploy.service:Classifier", "--host", host, "--port", str(port)]
    stop_on_sigint()
    # Its own process group: on Ctrl-C or SIGTERM the whole server (BentoML's workers too) is stopped, and
    # nothing is left listening on the port.
    server = subprocess.Popen(command, cwd=project, env=env, start_new_session=True)
    stop = threading.Event()
    if remote is not None:
        threading.Thread(target=follow_remote, args=(params, remote, served, stop), name="remote-follower",
                         daemon=True).start()
    try:
        return server.wait()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        stop.set()
        stop_process_group(server, grace_seconds=8)


def ui_credential(home: Path) -> str:
    """The `user:password` the Prefect server of `regraft ui` asks for: PREFECT_SERVER_API_AUTH_STRING when set,
    else one generated on the first start into a file only its owner can read, and told once."""
    import secrets

    given = os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    if given:
        return given
    path = home / "auth"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    credential = f"regraft:{secrets.token_urlsafe(24)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(credential + "\n")
    print(f"Prefect UI login (generated once, kept in {path}, readable by you only): {credential}\n"
          "Paste it into the UI's login box; clients and workers use it as PREFECT_API_AUTH_STRING.", flush=True)
    return credential


def serve_deployments(params, webhook: str, where: str) -> None:
    """This project's notification automation and deployments on the Prefect server in PREFECT_API_URL, served
    from this process until it is stopped."""
    from prefect import serve

    from flows.deployments import KINDS, build_deployments, deployment_name
    from flows.notifications import ensure_notifications

    print(ensure_notifications(webhook, params.project.name), flush=True)
    names = ", ".join(deployment_name(kind, params.project.name) for kind in KINDS)
    print(f"{where}  (project {params.project.name}; deployments: {names}; Ctrl-C stops)", flush=True)
    serve(*build_deployments(params), print_starting_message=False)


def join_server(params, webhook: str) -> int:
    """`regraft ui --join`: serve this project's deployments on a Prefect server that is already running (a
    team's, shared by several projects) instead of starting one: PREFECT_API_URL and its credential in
    PREFECT_API_AUTH_STRING. Its outbound requests are that server's operator's to limit."""
    from tasks.errors import ConfigError

    api = os.environ.get("PREFECT_API_URL", "")
    if not api.startswith(("http://", "https://")):
        raise ConfigError("regraft ui --join: set PREFECT_API_URL to the shared Prefect server's API "
                          "(and PREFECT_API_AUTH_STRING to its credential)")
    status = api_status(api, os.environ.get("PREFECT_API_AUTH_STRING", ""), timeout=10)
    if isinstance(status, str):
        raise ConfigError(f"regraft ui --join: the Prefect server at {api} does not answer: {status}")
    if status != 200:
        raise ConfigError(f"regraft ui --join: the Prefect server at {api} answered {status} "
                          "(check PREFECT_API_AUTH_STRING)")
    stop_on_sigint()
    try:
        serve_deployments(params, webhook, f"joined the Prefect server at {api}")
    except KeyboardInterrupt:
        pass
    print("stopped serving the deployments", flush=True)
    return EXIT_OK


def command_ui(args: argparse.Namespace, project: Path) -> int:
    """A Prefect server on 127.0.0.1 (state in the project), with the deployments served from here."""
    import subprocess

    from tasks.config import load_params
    from tasks.errors import ConfigError, InternalError
    from tasks.files import write_atomically
    from tasks.processes import NotHealthy, stop_process_group, wait_until_healthy

    params = load_params(project / "params.yaml")
    port = args.port or params.schedule.ui_port
    webhook = os.environ.get("REGRAFT_NOTIFY_WEBHOOK_URL") or params.notify.webhook_url
    if webhook and not webhook.startswith(("http://", "https://")):
        raise ConfigError(f"REGRAFT_NOTIFY_WEBHOOK_URL: {webhook!r} is not an http(s) URL")
    if args.join:
        return join_server(params, webhook)
    from flows.notifications import GUARDED_SERVER, SERVER_DESTINATIONS_ENV, allowed_destinations

    # Fixed now, for the server's whole life: its automations send nowhere else, whoever holds the credential.
    destinations = allowed_destinations(params.notify, webhook)

    stop_on_sigint()
    home = ui_home(project)
    home.mkdir(parents=True, exist_ok=True)
    credential = ui_credential(home)
    origin = f"http://127.0.0.1:{port}"
    # Prefect's own protections: every API call needs the credential, only the UI's own origin may call
    # from a browser, and state-changing calls need a CSRF token (the UI and Prefect's client fetch it).
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"{origin}/api", "PREFECT_SERVER_API_AUTH_STRING": credential,
           "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": origin, "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
           SERVER_DESTINATIONS_ENV: ",".join(destinations)}
    env.pop("PREFECT_API_URL", None)
    # The server's own log (its warnings and errors: database errors, a failed call's traceback) is kept beside its
    # database: what the UI shows a person as "Something went wrong" is explained there.
    with (home / "server.log").open("w", encoding="utf-8") as server_log:
        server = subprocess.Popen([sys.executable, "-c", GUARDED_SERVER, "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=server_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        try:
            wait_until_healthy(f"{api}/health", server, 180)
        except NotHealthy as exc:
            raise InternalError(f"the Prefect server did not start: {exc}") from None
        # Set before Prefect is first imported in this process: its settings are read at import. The served
        # deployments' flow runs inherit them.
        os.environ["PREFECT_API_URL"] = api
        os.environ["PREFECT_API_AUTH_STRING"] = credential
        os.environ["PREFECT_UI_URL"] = origin  # the links in notifications
        write_atomically(ui_address_file(project), lambda tmp: tmp.write_text(api, encoding="utf-8"))
        serve_deployments(params, webhook, f"Prefect UI: http://127.0.0.1:{port}")
    except KeyboardInterrupt:
        pass
    finally:
        ui_address_file(project).unlink(missing_ok=True)
        stop_process_group(server, grace_seconds=30)
        print("stopped the Prefect server and the deployments", flush=True)
    return EXIT_OK
