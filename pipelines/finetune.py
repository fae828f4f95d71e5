"""DVC stage `finetune`: splits -> an HF model directory with a model card, a per-step log, reports/finetune.json.

With train.nproc > 1 the runner starts itself again under torchrun (one process per GPU, or gloo
processes on CPU); rank 0 writes the outputs.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.stage_io import read_splits, report_path, run_stage, write_atomically
from tasks.calibration import calibrated_encoders
from tasks.config import Params
from tasks.errors import ConfigError, ReportError
from tasks.files import replace_directory
from tasks.finetune import FinetuneResult, finetune
from tasks.lexical import LexicalCompanion, write_companion
from tasks.model_card import model_card
from tasks.render import calibration_text, ladder_text
from tasks.reports import Calibration, FinetuneReport, ServedChoice, ShiftReport, read_report, write_report
from tasks.served_choice import pools_frozen_over_lexical, served_model
from tasks.strategy import choose_strategy, served_reason
from tasks.training_data import build_training_data
from tasks.models import model_origin


def file_md5(path: Path) -> str:
    """The md5 DVC records for a file, so the card's data hashes can be looked up in dvc.lock."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def initial_model(params: Params) -> str:
    if params.train.init == "base":
        return params.model.base
    champion = params.paths.champion
    if not (champion / "config.json").is_file():
        raise ConfigError(f"train.init=champion, but there is no production model at {champion}; "
                          "promote a model first or set train.init=base")
    return str(champion)


def read_shift_report(params: Params) -> ShiftReport | None:
    """The shift report for `auto`'s rule; none when it is missing or malformed (the rule then goes by data size)."""
    try:
        return read_report(report_path(params, "shift"), ShiftReport)
    except ReportError:
        return None


def save_model_dir(result: FinetuneResult, destination: Path, card: str, companion: LexicalCompanion | None) -> None:
    """Write safetensors + config (with id2label) + tokenizer + lexical companion + card to a new folder, then swap
    it in."""

    def write_model(staging: Path) -> None:
        result.model.save_pretrained(staging)
        result.tokenizer.save_pretrained(staging)
        if companion is not None:
            write_companion(companion, staging)
        (staging / "README.md").write_text(card, encoding="utf-8")

    replace_directory(write_model, destination)


def write_log(path: Path, rows: list[dict]) -> None:
    fields = ["step", "epoch", "loss", "learning_rate", "samples_per_second"]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def relaunch_distributed(nproc: int) -> int:
    """Run this stage again as `nproc` torchrun processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipelines.finetune"]
    print(f"finetune: starting {nproc} processes: {' '.join(command[2:])}", flush=True)
    return subprocess.call(command)


def main(params: Params) -> int:
    if params.train.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch_distributed(params.train.nproc)
    splits = read_splits(params)
    base = initial_model(params)
    train, valid = build_training_data(splits, params.ingest.labels, params.train)
    choice = choose_strategy(base, params.ingest.labels, train, valid, params.train, params.model,
                             len(splits["target_train"]), read_shift_report(params), params.paths.checkpoints,
                             params.paths.embeddings, world=int(os.environ.get("WORLD_SIZE", "1")))
    strategy, reason = choice.strategy, choice.reason
    print(f"finetune: {strategy} ({reason}); {len(train.texts)} train rows, {len(valid.texts)} validation rows",
          flush=True)
    # After a race the winner resumes from its checkpoint; otherwise this trains from the start.
    result = choice.trained or finetune(base, params.ingest.labels, train, valid, params.train, params.model, strategy,
                                        reason, checkpoint_dir=choice.checkpoint_dir, cache_dir=params.paths.embeddings)
    result.reason = reason
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    encoders, cross_fitted = calibrated_encoders(result, choice, valid, params.model.max_length)
    served = served_model({name: proba for name, (_, _, proba) in encoders.items()}, train, valid,
                          len(params.ingest.labels), params.train.lexical_weights, cross_fitted)
    lexical = ServedChoice.model_validate(served.report)
    reason, cheap = served_reason(reason, result.strategy, served.encoder, lexical.served_as,
                                  served.companion is not None and served.companion.serves_alone,
                                  params.train.strategy == "auto", pools_frozen_over_lexical(served))
    result, fitted, _ = encoders[served.encoder]
    result.reason = reason
    companion, calibration = served.companion, Calibration.model_validate(fitted)
    print(f"finetune: calibrated by temperature scaling: {calibration_text(calibration)}", flush=True)
    if cheap:
        print(f"finetune: {reason.split(' (')[0]}", flush=True)
    print(f"finetune: served as {lexical.served_as}", flush=True)
    if ladder := ladder_text(lexical.evidence_ladder):
        print(f"finetune: {ladder}", flush=True)
    data_hashes = {name: file_md5(Path(path)) for name, path in params.paths.splits.model_dump().items()}
    report = FinetuneReport(
        stage="finetune",
        strategy=result.strategy,
        reason=result.reason,
        strategy_evidence=choice.evidence,
        negative_transfer_predicted=choice.negative_transfer_predicted,
        served_model={"encoder": served.encoder, "lexical_weight": lexical.weight, "cheap": cheap,
                      "served_as": lexical.served_as},
        base_model=model_origin(base),
        init=params.train.init,
        model_dir=str(params.paths.model),
        device=str(result.runtime.device),
        precision=result.runtime.precision,
        hardware=result.runtime.reason,
        threads=result.runtime.threads,
        processes=result.extra.get("world_size", 1),
        train_rows=len(train.texts),
        validation_rows=len(valid.texts),
        epochs_run=result.epochs_run,
        best_epoch=result.best_epoch,
        resumed_from_step=result.resumed_from_step,
        train_seconds=round(result.train_seconds, 2),
        samples_per_second=round(result.samples_per_second, 2),
        validation=result.metrics.get("validation", {}),
        calibration=calibration,
        lexical_companion=lexical,
        data_md5=data_hashes,
        **({"rank_weight_sha256": result.extra["rank_weight_sha256"]} if "rank_weight_sha256" in result.extra else {}),
    )
    # The card starts from the report's facts; the package stage completes it from the same function.
    save_model_dir(result, params.paths.model, model_card(params, report), companion)
    write_log(params.paths.train_log, result.log)
    write_report(report_path(params, "finetune"), report)
    # A finished run's checkpoints must not be resumed by the next one.
    shutil.rmtree(params.paths.checkpoints, ignore_errors=True)
    validation = result.metrics.get("validation", {})
    print(f"finetune: saved {params.paths.model} ({result.strategy}, validation "
          + ", ".join(f"{k} {v:.3f}" for k, v in validation.items()) + ")", flush=True)
    return 0


if __name__ == "__main__":
    run_stage(main)
