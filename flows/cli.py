"""The `regraft` command. Thin: parses arguments, sets up the local environment, calls flows and runners."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import yaml

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def find_project(start: Path) -> Path:
    """The nearest folder at or above `start` that holds dvc.yaml and params.yaml."""
    for folder in [start, *start.parents]:
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    raise SystemExit(f"error: no regraft project (dvc.yaml + params.yaml) at or above {start}")


def state_dir(project: Path) -> Path:
    """paths.state from params.yaml, read leniently: a broken params.yaml is reported later, by the command."""
    try:
        state = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))["paths"]["state"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        state = ".regraft"
    return project / state


def prepare_environment(project: Path) -> None:
    """Telemetry off, and Prefect's local state kept in the project unless a Prefect API is configured."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ:
        home = Path(os.environ.setdefault("PREFECT_HOME", str(state_dir(project) / "prefect")))
        # Prefect creates only the last folder of its home itself.
        home.mkdir(parents=True, exist_ok=True)
        # The first start migrates a new SQLite database; on a busy 2-core machine that can take
        # longer than Prefect's default 20 s.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def command_run(args: argparse.Namespace, project: Path) -> int:

    from flows.retrain import RetrainParameters, retrain
    from tasks.config import parse_override
    from tasks.errors import RegraftError

    try:
        for item in args.set:
            parse_override(item)
        parameters = RetrainParameters(overrides=list(args.set), push=not args.no_push)
        result = retrain(parameters=parameters, project_dir=str(project))
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


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
        from tasks.gate import render_table

        print("\n" + render_table(verdict))
    if package:
        smoke = package["smoke_test"]
        print(f"packaged {package['model']} (Bento {package['bento']}); smoke test: {smoke['examples']} served "
              f"labels equal to offline predictions")
        print(f"promote it with: {package['promote']}")
    print(f"reports: {result['reports_dir']} (all on one page: {result['html_report']})")
    if result.get("pushed_to"):
        print(f"data pushed to DVC remote {result['pushed_to']!r}")


def command_validate(args: argparse.Namespace, project: Path) -> int:
    from pipelines.validate import print_outcome, validate_file
    from tasks.config import load_params
    from tasks.errors import RegraftError

    try:
        report = validate_file(load_params(project / "params.yaml"), Path(args.path).resolve())
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return print_outcome(report)


def command_shift(args: argparse.Namespace, project: Path) -> int:
    import json

    from pipelines.shift import analyse
    from tasks.config import load_params
    from tasks.errors import RegraftError
    from tasks.ingest import normalise, read_table
    from tasks.shift import render_markdown

    try:
        params = load_params(project / "params.yaml")
        frames = []
        for raw in (args.source, args.target):
            path = Path(raw).resolve()
            frame = normalise(read_table(path), params.ingest.columns, path.name, params.ingest.time_format)
            if "text" not in frame or frame.empty:
                raise RegraftError(f"{path}: no rows with a {params.ingest.columns.text!r} column to compare")
            frames.append(frame)
        report = analyse(frames[0], frames[1], params)
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for bulky in ("embeddings_2d", "domain_scores", "source_importance_weights", "source_ids"):
        report.pop(bulky, None)
    print(json.dumps(report, indent=2) if args.json else render_markdown(report))
    return 0


def command_models(args: argparse.Namespace, project: Path) -> int:
    import json

    from pipelines.promote import render_models
    from tasks.config import load_params
    from tasks.errors import RegraftError
    from tasks.registry import read_record

    try:
        record = read_record(load_params(project / "params.yaml").paths.registry)
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2) if args.json else render_models(record))
    return 0


def command_promote(args: argparse.Namespace, project: Path) -> int:
    from pipelines.promote import promote_model, rollback
    from tasks.config import load_params
    from tasks.errors import RegraftError

    try:
        params = load_params(project / "params.yaml")
        if args.command == "promote":
            record = promote_model(params, args.tag, args.reason, args.by)
        else:
            record = rollback(params, args.reason, args.by)
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    event = record["history"][-1]
    print(f"{event['action']}: {event['tag']} is now in production"
          + (f" (was {event['previous']})" if event.get("previous") else "") + f"; {record['versioning']}")
    return 0


def command_serve(args: argparse.Namespace, project: Path) -> int:
    import subprocess

    from tasks.packaging import bentoml_environment
    from tasks.config import load_params
    from tasks.errors import RegraftError
    from tasks.serving import production_tag

    try:
        params = load_params(project / "params.yaml")
        tag = production_tag(params.paths.registry)
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    host, port = args.host or params.serve.host, args.port or params.serve.port
    print(f"serving {tag} (and whatever is promoted later) on http://{host}:{port}; POST /predict, GET /healthz, "
          "GET /metrics; Ctrl-C stops", flush=True)
    env = {**os.environ, **bentoml_environment(params), "REGRAFT_PROJECT": str(project)}
    command = [sys.executable, "-m", "bentoml", "serve", "deploy.service:Classifier", "--host", host, "--port", str(port)]
    try:
        return subprocess.call(command, cwd=project, env=env)
    except KeyboardInterrupt:
        return 0


def wait_for_api(url: str, server, timeout: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the Prefect server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: no Prefect server at {url} within {timeout:.0f} s")


def command_ui(args: argparse.Namespace, project: Path) -> int:
    """A Prefect server on 127.0.0.1 (state in the project), with the deployments served from here."""
    import subprocess

    from tasks.config import load_params
    from tasks.errors import RegraftError

    try:
        params = load_params(project / "params.yaml")
    except RegraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    port = args.port or params.schedule.ui_port

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM (process managers, CI) both stop the server; a shell that started this in the
    # background leaves SIGINT ignored, which would otherwise orphan the server.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    home = state_dir(project) / "prefect-server"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_api(api, server, 180)
        # Set before Prefect is first imported in this process: its settings are read at import.
        os.environ["PREFECT_API_URL"] = api
        from prefect import serve

        from flows.deployments import build_deployments

        print(f"Prefect UI: http://127.0.0.1:{port}  (deployments: retrain, retrain-scheduled, promote, rollback, "
              "shift-watch; Ctrl-C stops)", flush=True)
        serve(*build_deployments(params, project), print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        print("stopped the Prefect server and the deployments", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regraft", description="Retrain a transformer safely on new data.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the retraining flow (every stage of dvc.yaml) once")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change one params.yaml key for this run, e.g. ingest.split.seed=7 (repeatable)")
    run.add_argument("--no-push", action="store_true", help="do not push outputs to the DVC remote")
    check = commands.add_parser("validate", help="run the validation suite on one data file")
    check.add_argument("path", help="a CSV, TSV, Parquet or JSONL file, read with params.yaml's column mapping")
    shift = commands.add_parser("shift", help="measure the domain shift between two data files")
    shift.add_argument("source", help="the data the current model learned from (CSV, TSV, Parquet or JSONL)")
    shift.add_argument("target", help="the new data; labels are optional")
    shift.add_argument("--json", action="store_true", help="print the report as JSON (top-level key: verdict)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    project = find_project(Path.cwd())
    prepare_environment(project)
    # Stage code resolves params.yaml paths against the project folder.
    os.chdir(project)
    handlers = {"run": command_run, "validate": command_validate, "shift": command_shift, "models": command_models,
                "promote": command_promote, "rollback": command_promote, "serve": command_serve, "ui": command_ui}
    return handlers[args.command](args, project)


if __name__ == "__main__":
    sys.exit(main())
