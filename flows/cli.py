"""The `regraft` command. Thin: parses arguments, sets up the local environment, calls flows and runners."""

from __future__ import annotations

import argparse
import os
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
    if finetune:
        validation = ", ".join(f"{k} {v:.3f}" for k, v in finetune["validation"].items())
        print(f"\nfinetune: {finetune['strategy']} on {finetune['hardware']} ({finetune['precision']}), "
              f"{finetune['train_seconds']} s; validation {validation}")
        print(f"model: {finetune['model_dir']} (model card: {finetune['model_dir']}/README.md)")
    print(f"reports: {result['reports_dir']}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    project = find_project(Path.cwd())
    prepare_environment(project)
    # Stage code resolves params.yaml paths against the project folder.
    os.chdir(project)
    handlers = {"run": command_run, "validate": command_validate, "shift": command_shift}
    return handlers[args.command](args, project)


if __name__ == "__main__":
    sys.exit(main())
