"""`regraft run`: the retrain flow from the terminal, each failure printed once, and a summary of what it did."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.cli_environment import start_local_api
from tasks.errors import EXIT_OK
from tasks.render import interval_text


def command_run(args: argparse.Namespace, project: Path) -> int:
    from flows.retrain import retrain
    from flows.run_form import RetrainParameters
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
    from tasks.reports import (Decision, EvaluateReport, FinetuneReport, IngestReport, PackageReport, ShiftReport,
                               ValidateReport, Verdict, parse_report)

    print("\nregraft run finished: " + " -> ".join(result["stages"]))
    if result["reports"].get("ingest"):
        ingest = parse_report(IngestReport, result["reports"]["ingest"], "the ingest report")
        print(f"\n{'split':16s}{'rows':>6s}  labels")
        for name, split in ingest.splits.items():
            mix = ", ".join(f"{k} {v}" for k, v in split.labels.items())
            print(f"{name:16s}{split.rows:6d}  {mix}")
    if result["reports"].get("validate"):
        validate = parse_report(ValidateReport, result["reports"]["validate"], "the validate report")
        state = "passed" if validate.success else "FAILED"
        print(f"\nvalidation {state}: {validate.expectation_count} expectations on {len(validate.splits)} splits")
        print(f"Data Docs: {validate.data_docs}")
    if result["reports"].get("shift"):
        shift = parse_report(ShiftReport, result["reports"]["shift"], "the shift report")
        print(f"\ndomain shift: {shift.verdict}")
        for reason in shift.reasons:
            print(f"  - {reason}")
    if result["reports"].get("finetune"):
        finetune = parse_report(FinetuneReport, result["reports"]["finetune"], "the finetune report")
        validation = ", ".join(f"{k} {v:.3f}" for k, v in finetune.validation.items())
        print(f"\nfinetune: {finetune.strategy} on {finetune.hardware} ({finetune.precision}), "
              f"{finetune.train_seconds} s; validation {validation}")
        if finetune.served_model.cheap:  # said plainly: the evidence chose a cheap model over adaptation
            print(f"  {finetune.reason.split(' (')[0]}")
        print(f"served as: {finetune.served_model.served_as}")
        print(f"model: {finetune.model_dir} (model card: {finetune.model_dir}/README.md)")
    if result["reports"].get("evaluate"):
        evaluate = parse_report(EvaluateReport, result["reports"]["evaluate"], "the evaluate report")
        print("\nevaluation on target_holdout (95% bootstrap intervals):")
        for model, entry in evaluate.splits["target_holdout"].models.items():
            o = entry.overall
            print(f"  {model:15s} accuracy {o.accuracy:.3f} {interval_text(o.intervals['accuracy'])}  "
                  f"macro-F1 {o.macro_f1:.3f} {interval_text(o.intervals['macro_f1'])}")
        gain = evaluate.transfer_gain
        if gain.estimate is not None:
            flag = "  NEGATIVE TRANSFER" if gain.negative_transfer else ""
            print(f"  transfer gain (candidate - TF-IDF, macro-F1): {gain.estimate:+.3f} "
                  f"{interval_text(gain.interval, signed=True)}{flag}")
    if result["reports"].get("gate"):
        from tasks.render import verdict_markdown

        print("\n" + verdict_markdown(parse_report(Verdict, result["reports"]["gate"], "the verdict")))
    if result["reports"].get("decide"):
        decision = parse_report(Decision, result["reports"]["decide"], "the decision")
        print(f"decision: {'approved' if decision.approved else 'rejected'} by {decision.by} ({decision.reason})\n")
    if result["reports"].get("package"):
        package = parse_report(PackageReport, result["reports"]["package"], "the package report")
        print(f"packaged {package.model} (Bento {package.bento}); smoke test: {package.smoke_test.examples} served "
              f"labels equal to offline predictions")
        print(f"promote it with: {package.promote}")
    print(f"reports: {result['reports_dir']} (all on one page: {result['html_report']})")
    if result.get("pushed_to"):
        print(f"data pushed to DVC remote {result['pushed_to']!r}")
