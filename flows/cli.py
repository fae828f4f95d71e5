"""The `regraft` command. Thin: parses arguments, sets up the project's environment (flows/cli_environment.py) and
runs the command (flows/cli_run.py, cli_data.py, cli_models.py, cli_servers.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from flows.cli_data import command_canary, command_feedback, command_shadow, command_shift, command_validate
from flows.cli_environment import find_project, make_private, prepare_environment
from flows.cli_models import command_models, command_promote
from flows.cli_run import command_run
from flows.cli_servers import command_serve, command_ui


def regraft_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regraft")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regraft", description="Retrain a transformer safely on new data.",
                                     epilog="Exit codes: 0 success; 1 a FAIL or rejected verdict; 2 bad input or "
                                     "configuration; 3 the project is busy; 70 an internal error; 130 Ctrl-C, "
                                     "143 SIGTERM.")
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
    shadow = commands.add_parser("shadow", help="compare the shadow candidate with production on the texts both "
                                 "predicted: not worse, worse (exit 1) or not enough evidence yet; writes reports/shadow.json")
    shadow.add_argument("--json", action="store_true", help="print the report as JSON (top-level key: verdict)")
    shadow.add_argument("--feedback", default=None, metavar="PATH", help="labels for served texts (the file given to "
                        "`regraft feedback`): realized metrics for both models, and the verdict on them when enough")
    shadow.add_argument("--columns", default=None, metavar="text=COL,label=COL", help=columns_help)
    canary = commands.add_parser("canary", help="judge one window of the running canary against production on the "
                                 "texts both predicted: shown worse, it is rolled back (exit 1); shown not worse, the "
                                 "window counts, and after monitor.canary_windows it is promoted; writes reports/canary.json")
    canary.add_argument("--json", action="store_true", help="print the report as JSON (top-level key: verdict)")
    canary.add_argument("--feedback", default=None, metavar="PATH", help="labels for served texts: realized metrics "
                        "for both models, and the verdict on them when enough")
    canary.add_argument("--columns", default=None, metavar="text=COL,label=COL", help=columns_help)
    models = commands.add_parser("models", help="list packaged models, their stages, metrics and history")
    models.add_argument("--json", action="store_true", help="print the registry record as JSON")
    promote = commands.add_parser("promote", help="make a packaged model (PASS or approved) the production model, "
                                  "or its shadow candidate or canary")
    promote.add_argument("tag", nargs="?", help="a model tag from `regraft models`, e.g. regraft-classifier:abc123")
    rollout = promote.add_mutually_exclusive_group()
    rollout.add_argument("--shadow", action="store_true", help="run TAG beside the production model on every serving "
                         "host instead: it predicts each served text off the response path (logged in serve.shadow_log) "
                         "while production answers; a promotion or rollback ends it")
    rollout.add_argument("--shadow-off", action="store_true", help="end the shadow without promoting it (TAG, when "
                         "given, must be the shadow candidate)")
    rollout.add_argument("--canary", type=float, default=None, metavar="FRACTION", help="let TAG answer this share of "
                         "the requests (0 < FRACTION < 1; the same texts on every serving host) while production answers "
                         "the rest; `regraft canary` (and each shift-watch) judges it, promoting or rolling it back")
    rollout.add_argument("--canary-off", action="store_true", help="end the canary without promoting it (TAG, when "
                         "given, must be the canary)")
    promote.add_argument("--reason", default=None, help="why (kept in the history)")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the command stops at once, its cleanup runs, and it exits 143 (a server command,
    which catches KeyboardInterrupt to stop its server, exits 0)."""


def stop_on_sigterm() -> object:
    """A process manager, `timeout` or a stopped container ends a command with SIGTERM, which by default kills Python
    outright: no cleanup or exit handler runs, and the temporary Prefect server `regraft run` started lived on as an
    orphan. Raised as Terminated instead. While a flow runs, Prefect's own handler takes SIGTERM first (it marks the run
    Crashed; the stage task stops its stage's process group as the exception passes), then puts this one back and
    signals the process again. Returns the handler it replaced, None where it could not install one."""

    def stop(signum, frame):
        raise Terminated

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # a caller in a thread other than the main one: signals stay as they are
        return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one message and exit 1, 2 or 3, anything else a traceback and 70;
    Ctrl-C exits 130, SIGTERM 143 (the server commands stop their servers and exit 0)."""
    from tasks.errors import EXIT_INTERNAL, RegraftError

    args = build_parser().parse_args(argv)
    previous = stop_on_sigterm()
    handlers = {"run": command_run, "validate": command_validate, "shift": command_shift, "feedback": command_feedback,
                "shadow": command_shadow, "canary": command_canary, "models": command_models, "promote": command_promote,
                "rollback": command_promote, "serve": command_serve, "ui": command_ui}
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
    except Terminated:
        print("stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("error: an internal error in regraft (the traceback above says where)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:  # an in-process caller gets its own SIGTERM handling back
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
