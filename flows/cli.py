"""The `regraft` command. Thin: parses arguments, sets up the local environment, calls flows and runners."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

import yaml

from tasks.errors import EXIT_OK

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def regraft_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regraft")
    except PackageNotFoundError:
        return "unknown (not installed)"


def find_project(start: Path) -> Path:
    """The nearest folder at or above `start` that holds dvc.yaml and params.yaml."""
    for folder in [start, *start.parents]:
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    from tasks.errors import ConfigError

    raise ConfigError(f"no regraft project (dvc.yaml + params.yaml) at or above {start}")


def params_value(project: Path, section: str, key: str, default: str) -> str:
    """One value of params.yaml, read leniently: a broken params.yaml is reported later, by the command."""
    try:
        value = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))[section][key]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return default
    return value if isinstance(value, str) else default


def state_dir(project: Path) -> Path:
    return project / params_value(project, "paths", "state", ".regraft")


def make_private(project: Path) -> None:
    """This process and all it starts (DVC, Prefect's server and workers, `bentoml serve`) create files for
    the owner alone; what an older version left readable (the state folder with Prefect's database, the
    reports, the prediction log) is made private too."""
    from tasks.files import PRIVATE_UMASK, keep_private

    os.umask(PRIVATE_UMASK)
    named = [state_dir(project), project / params_value(project, "paths", "reports", "reports"),
             project / params_value(project, "serve", "prediction_log", ".regraft/predictions.jsonl")]
    # params.yaml is not validated yet: never touch a path it names outside the project.
    root = project.resolve()
    keep_private([path for path in named if root in path.resolve().parents])


def prepare_environment(project: Path, command: str) -> None:
    """Telemetry off; runs report to the configured Prefect API, else to this project's `regraft ui` when it
    is up, else to a temporary local API whose state is kept in the project."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ and command == "run":
        join_running_ui(project)
    if "PREFECT_API_URL" not in os.environ:
        home = Path(os.environ.setdefault("PREFECT_HOME", str(state_dir(project) / "prefect")))
        # Prefect creates only the last folder of its home itself.
        home.mkdir(parents=True, exist_ok=True)
        # The first start migrates a new SQLite database; on a busy 2-core machine that can take
        # longer than Prefect's default 20 s.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def start_local_api() -> None:
    """Start this process's temporary Prefect API now, one process of the project at a time. Its first start
    creates the SQLite database in PREFECT_HOME and registers Prefect's block types: two first runs at once
    would both create its tables (a server-startup traceback, `table artifact already exists`). The second
    waits here, then finds the database made; the flow run that follows reuses the started server."""
    import fcntl

    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / "server-start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it if this process dies while starting
        SubprocessASGIServer().start()
    finally:
        os.close(fd)


def ui_home(project: Path) -> Path:
    """The state of `regraft ui`'s Prefect server: its database, credential file and, while it runs, its API
    address (`api-url`) for the project's other commands to find it."""
    return state_dir(project) / "prefect-server"


def ui_address_file(project: Path) -> Path:
    return ui_home(project) / "api-url"


def api_status(api: str, credential: str, timeout: float) -> int | str:
    """The HTTP status of a Prefect API's /health with `user:password`, or why it did not answer."""
    import httpx

    user, _, password = credential.partition(":")
    try:
        return httpx.get(f"{api.rstrip('/')}/health", auth=(user, password) if user else None, timeout=timeout).status_code
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__


def join_running_ui(project: Path) -> None:
    """Point Prefect at this project's `regraft ui` when it answers, so runs started from the terminal (and
    `make demo`) appear in the same UI as the scheduled ones."""
    address, auth = ui_address_file(project), ui_home(project) / "auth"
    try:
        api = address.read_text(encoding="utf-8").strip()
        credential = os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or auth.read_text(encoding="utf-8").strip()
    except OSError:
        return
    if api_status(api, credential, timeout=3) == 200:
        os.environ["PREFECT_API_URL"], os.environ["PREFECT_API_AUTH_STRING"] = api, credential
        print(f"reporting to the Prefect server of `regraft ui` at {api.removesuffix('/api')}", flush=True)


def command_run(args: argparse.Namespace, project: Path) -> int:
    from flows.retrain import RetrainParameters, retrain
    from tasks.config import parse_override
    from tasks.overrides import check_overrides_before_lock

    # Every override is checked against params.yaml and the allow-list before anything runs (exit 2).
    check_overrides_before_lock(project, dict(parse_override(item) for item in args.set))
    parameters = RetrainParameters(overrides=list(args.set), push=not args.no_push)
    start_local_api()
    print_failures_once()
    print_summary(retrain(parameters=parameters))
    return EXIT_OK


def print_failures_once() -> None:
    """Prefect logs a failed task or flow with its traceback and again as its final state; this command
    prints the problem once itself, so the console leaves those records out (the Prefect UI keeps them)."""
    import logging

    echoes = ("Finished in state Failed", "Finished in state Crashed", "Encountered exception during execution",
              "Task run failed with exception")

    def keep(record: logging.LogRecord) -> bool:
        # A retry ("Task run failed with exception ... Retry 1/2 will start") is news, logged at INFO: keep it.
        echo = record.getMessage().startswith(echoes) and (record.levelno >= logging.ERROR or "Finished" in record.getMessage())
        return not (record.exc_info or echo)

    import prefect.logging.configuration  # noqa: F401  (sets up Prefect's console handler, on the root logger)

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if type(handler).__name__ != "APILogHandler":
                handler.addFilter(keep)


def print_summary(result: dict) -> None:
    print("\nregraft run finished: " + " -> ".join(result["stages"]))
    ingest = result["reports"].get("ingest")
    if ingest:
        print(f"\n{'split':16s}{'rows':>6s}  labels")
        for name, split in ingest["splits"].items():
            mix = ", ".join(f"{k} {v}" for k, v in split["labels"].items())
            print(f"{name:16s}{split['rows']:6d}  {mix}")
    validate = result["reports"].get("validate")
    if validate:
        total = sum(s["expectations"] for s in validate["splits"].values())
        state = "passed" if validate["success"] else "FAILED"
        print(f"\nvalidation {state}: {total} expectations on {len(validate['splits'])} splits")
        print(f"Data Docs: {validate['data_docs']}")
    shift = result["reports"].get("shift")
    if shift:
        print(f"\ndomain shift: {shift['verdict']}")
        for reason in shift["reasons"]:
            print(f"  - {reason}")
    finetune = result["reports"].get("finetune")
    package = result["reports"].get("package")
    if finetune:
        validation = ", ".join(f"{k} {v:.3f}" for k, v in finetune["validation"].items())
        print(f"\nfinetune: {finetune['strategy']} on {finetune['hardware']} ({finetune['precision']}), "
              f"{finetune['train_seconds']} s; validation {validation}")
        served = finetune.get("served_model") or {}
        if served.get("cheap"):  # said plainly: the evidence chose a cheap model over adaptation
            print(f"  {finetune['reason'].split(' (')[0]}")
        print(f"served as: {served.get('served_as', 'not recorded')}")
        print(f"model: {finetune['model_dir']} (model card: {finetune['model_dir']}/README.md)")
    evaluate = result["reports"].get("evaluate")
    if evaluate:
        print("\nevaluation on target_holdout (95% bootstrap intervals):")
        for model, entry in evaluate["splits"]["target_holdout"]["models"].items():
            o = entry["overall"]
            (a_lo, a_hi), (f_lo, f_hi) = o["intervals"]["accuracy"], o["intervals"]["macro_f1"]
            print(f"  {model:15s} accuracy {o['accuracy']:.3f} [{a_lo:.3f}, {a_hi:.3f}]  "
                  f"macro-F1 {o['macro_f1']:.3f} [{f_lo:.3f}, {f_hi:.3f}]")
        gain = evaluate["transfer_gain"]
        if gain["estimate"] is not None:
            lo, hi = gain["interval"]
            flag = "  NEGATIVE TRANSFER" if gain["negative_transfer"] else ""
            print(f"  transfer gain (candidate - TF-IDF, macro-F1): {gain['estimate']:+.3f} [{lo:+.3f}, {hi:+.3f}]{flag}")
    verdict = result["reports"].get("gate")
    if verdict:
        from tasks.render import verdict_markdown

        print("\n" + verdict_markdown(verdict))
    decision = result["reports"].get("decide")
    if decision:
        print(f"decision: {'approved' if decision['approved'] else 'rejected'} by {decision['by']} ({decision['reason']})\n")
    if package:
        smoke = package["smoke_test"]
        print(f"packaged {package['model']} (Bento {package['bento']}); smoke test: {smoke['examples']} served "
              f"labels equal to offline predictions")
        print(f"promote it with: {package['promote']}")
    print(f"reports: {result['reports_dir']} (all on one page: {result['html_report']})")
    if result.get("pushed_to"):
        print(f"data pushed to DVC remote {result['pushed_to']!r}")


def command_validate(args: argparse.Namespace, project: Path) -> int:
    from tasks.config import load_params
    from tasks.render import print_validation_outcome
    from tasks.validate import validate_file

    report = validate_file(load_params(project / "params.yaml"), Path(args.path).resolve(), args.columns)
    print(f"columns from {report['columns']['from']}: text={report['columns']['text']!r}, "
          f"label={report['columns']['label']!r}, groups={report['columns']['groups']}", flush=True)
    return print_validation_outcome(report)


def command_shift(args: argparse.Namespace, project: Path) -> int:
    import json

    from tasks.config import load_params
    from tasks.errors import DataError
    from tasks.ingest import read_with_columns
    from tasks.render import shift_markdown
    from tasks.shift import analyse_shift, without_bulk

    params = load_params(project / "params.yaml")
    frames = []
    for raw in (args.source, args.target):
        path = Path(raw).resolve()
        frame, columns, _ = read_with_columns(path, params.ingest.columns, args.columns, params.ingest.time_format)
        if "text" not in frame or frame.empty:
            raise DataError(f"{path}: no rows with a {columns.text!r} column to compare")
        frames.append(frame)
    report = without_bulk(analyse_shift(frames[0], frames[1], params))
    print(json.dumps(report, indent=2) if args.json else shift_markdown(report))
    return EXIT_OK


def command_feedback(args: argparse.Namespace, project: Path) -> int:
    from tasks.config import load_params
    from tasks.errors import DataError
    from tasks.ingest import read_with_columns
    from tasks.monitoring import record_feedback

    params = load_params(project / "params.yaml")
    path = Path(args.path).resolve()
    frame, columns, _ = read_with_columns(path, params.ingest.columns, args.columns, params.ingest.time_format)
    if frame.empty or "label" not in frame:
        raise DataError(f"{path}: no rows with a {columns.text!r} and a {columns.label!r} column")
    for row in record_feedback(params, frame, str(path)):
        estimated, realized = row["estimated"]["accuracy"], row["realized"]["accuracy"]
        low, high = estimated["interval"]
        print(f"estimate {row['estimate_id'][:8]}: accuracy estimated {estimated['estimate']:.3f} "
              f"[{low:.3f}, {high:.3f}], realized {realized:.3f} on {row['labelled_rows']} labelled served texts "
              f"(error {row['error']['accuracy']:+.3f}; {'inside' if low <= realized <= high else 'outside'} the interval)")
    print(f"recorded in {params.paths.performance_history}")
    return EXIT_OK


def command_models(args: argparse.Namespace, project: Path) -> int:
    import json

    from tasks.config import load_params
    from tasks.errors import EXIT_BUSY, EXIT_CHECK_FAILED
    from tasks.promotion import interrupted_promotion
    from tasks.registry import journal_file, read_record, sync_record
    from tasks.remote import RemoteError, model_remote
    from tasks.render import models_text

    params = load_params(project / "params.yaml")
    unreachable = None
    try:
        record = sync_record(params.paths.registry, model_remote(params))  # the shared remote's record, when there is one
    except RemoteError as exc:
        if not journal_file(params.paths.registry).is_file():
            raise
        record, unreachable = read_record(params.paths.registry), exc  # an interruption is still worth reporting
    interrupted = interrupted_promotion(params, record)
    shown = {**record, "interrupted_promotion": interrupted} if interrupted else record
    print(json.dumps(shown, indent=2) if args.json else models_text(record))
    if unreachable:
        print(f"warning: {unreachable}; shown above: this machine's copy of the record", file=sys.stderr)
    if interrupted is None:
        return EXIT_OK
    print(f"error: {interrupted['message']}", file=sys.stderr)
    # Under way: the project is busy (3). Interrupted: production cannot be trusted until someone finishes it, a
    # check that says no (1), as evaluate says for the same state; nothing the user typed was wrong (not 2).
    return EXIT_BUSY if interrupted["running"] else EXIT_CHECK_FAILED


def command_promote(args: argparse.Namespace, project: Path) -> int:
    from tasks.config import load_params
    from tasks.promotion import promote_model, rollback

    params = load_params(project / "params.yaml")
    if args.command == "promote":
        record = promote_model(params, args.tag, args.reason, args.by)
    else:
        record = rollback(params, args.reason, args.by)
    if record.get("finished"):
        print(record["finished"])
    event = record["history"][-1]
    print(f"{event['action']}: {event['tag']} is now in production"
          + (f" (was {event['previous']})" if event.get("previous") else "") + f"; {record['versioning']}")
    return EXIT_OK


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (process managers, CI) both stop a server command; a shell that started it in the
    background leaves SIGINT ignored, which would otherwise orphan the server."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def command_serve(args: argparse.Namespace, project: Path) -> int:
    import subprocess

    import threading

    from tasks.config import load_params
    from tasks.packaging import bentoml_environment
    from tasks.processes import stop_process_group
    from tasks.promotion import follow_remote, install_production_from
    from tasks.remote import model_remote
    from tasks.serving import production_tag

    params = load_params(project / "params.yaml")
    remote = model_remote(params)
    if remote is not None:
        record, _ = remote.read_record()
        tag = install_production_from(params, remote, record) if record else production_tag(params.paths.registry)
        print(f"following promotions in {remote.url}", flush=True)
    else:
        tag = production_tag(params.paths.registry)
    host, port = args.host or params.serve.host, args.port or params.serve.port
    print(f"serving {tag} (and whatever is promoted later) on http://{host}:{port}; POST /predict, GET /healthz, "
          "GET /metrics; Ctrl-C stops", flush=True)
    env = {**os.environ, **bentoml_environment(params), "REGRAFT_PROJECT": str(project)}
    command = [sys.executable, "-m", "bentoml", "serve", "deploy.service:Classifier", "--host", host, "--port", str(port)]
    stop_on_signals()
    # Its own process group: on Ctrl-C or SIGTERM the whole server (BentoML's workers too) is stopped, and
    # nothing is left listening on the port.
    server = subprocess.Popen(command, cwd=project, env=env, start_new_session=True)
    stop = threading.Event()
    if remote is not None:
        threading.Thread(target=follow_remote, args=(params, remote, tag, stop), name="remote-follower",
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
    stop_on_signals()
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

    stop_on_signals()
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
    server = subprocess.Popen([sys.executable, "-c", GUARDED_SERVER, "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regraft", description="Retrain a transformer safely on new data.",
                                     epilog="Exit codes: 0 success; 1 a FAIL or rejected verdict; 2 bad input or "
                                     "configuration; 3 the project is busy; 70 an internal error.")
    parser.add_argument("--version", action="version", version=f"regraft {regraft_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the retraining flow (every stage of dvc.yaml) once")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change one params.yaml key for this run, e.g. ingest.split.seed=7 (repeatable)")
    run.add_argument("--no-push", action="store_true", help="do not push outputs to the DVC remote")
    check = commands.add_parser("validate", help="run the validation suite on one data file")
    check.add_argument("path", help="a CSV, TSV, Parquet or JSONL file")
    columns_help = ("which columns hold what: text=COL,label=COL[,groups=COL|COL][,time=COL][,id=COL]; default: "
                    "params.yaml's ingest.columns, else columns named text and label")
    check.add_argument("--columns", default=None, metavar="text=COL,label=COL", help=columns_help)
    shift = commands.add_parser("shift", help="measure the domain shift between two data files")
    shift.add_argument("source", help="the data the current model learned from (CSV, TSV, Parquet or JSONL)")
    shift.add_argument("target", help="the new data; labels are optional")
    shift.add_argument("--json", action="store_true", help="print the report as JSON (top-level key: verdict)")
    shift.add_argument("--columns", default=None, metavar="text=COL,label=COL", help=columns_help)
    feedback = commands.add_parser("feedback", help="labels for served texts: record the production model's realized "
                                   "performance next to shift-watch's estimate for the same traffic")
    feedback.add_argument("path", help="a labelled file (CSV, Parquet, JSON lines) of served texts")
    feedback.add_argument("--columns", default=None, metavar="text=COL,label=COL", help=columns_help)
    models = commands.add_parser("models", help="list packaged models, their stages, metrics and history")
    models.add_argument("--json", action="store_true", help="print the registry record as JSON")
    promote = commands.add_parser("promote", help="make a packaged model (PASS or approved) the production model")
    promote.add_argument("tag", help="a model tag from `regraft models`, e.g. regraft-classifier:abc123")
    promote.add_argument("--reason", default="promoted by hand", help="why (kept in the history)")
    promote.add_argument("--by", default=None, help="who (default: the user name)")
    back = commands.add_parser("rollback", help="put the previous production model back")
    back.add_argument("--reason", default="rollback", help="why (kept in the history)")
    back.add_argument("--by", default=None, help="who (default: the user name)")
    serve = commands.add_parser("serve", help="serve the production model with BentoML (follows promotions)")
    serve.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default serve.port)")
    ui = commands.add_parser("ui", help="start a Prefect server and UI on 127.0.0.1 and serve the deployments")
    ui.add_argument("--port", type=int, default=None, help="port (default schedule.ui_port, 4200)")
    ui.add_argument("--join", action="store_true", help="serve this project's deployments on the Prefect server in "
                    "PREFECT_API_URL (credential: PREFECT_API_AUTH_STRING) instead of starting one")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one message and exit 1, 2 or 3, anything else a traceback and 70."""
    from tasks.errors import EXIT_INTERNAL, RegraftError

    args = build_parser().parse_args(argv)
    handlers = {"run": command_run, "validate": command_validate, "shift": command_shift, "feedback": command_feedback,
                "models": command_models, "promote": command_promote, "rollback": command_promote, "serve": command_serve, "ui": command_ui}
    try:
        project = find_project(Path.cwd())
        make_private(project)
        prepare_environment(project, args.command)
        # Stage code resolves params.yaml paths against the project folder; flows, the served deployments
        # and the service work on this project and no other.
        os.chdir(project)
        os.environ["REGRAFT_PROJECT"] = str(project)
        return handlers[args.command](args, project)
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("error: an internal error in regraft (the traceback above says where)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
