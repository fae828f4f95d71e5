"""Stage finetune: adapt a pretrained encoder to the labelled data with a transfer strategy.

Strategies:
- feature_extraction: the encoder is frozen; its [CLS] states are computed once (cached by model and
  data hash) and only the head (pooler + classifier) trains on them.
- full: every layer trains; small encoder learning rate, warmup, weight decay.
- gradual_unfreeze: ULMFiT-style; the head and the top block first, one more block per epoch, with
  layer-wise decayed (discriminative) learning rates.
- lora: low-rank adapters (peft), merged into the weights at the end so serving needs no peft.
- auto: picks one of these from evidence on held-out target rows (tasks/strategy.py).

Training is resumable (a checkpoint every N optimiser steps restores weights, optimiser, scheduler,
RNG and the position in the epoch's batch order) and data-parallel under torchrun (gloo on CPU).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from tasks.config import ModelConfig, TrainConfig
from tasks.devices import Runtime, autocast, choose_runtime
from tasks.errors import ConfigError, DataError
from tasks.evaluate import confusion_counts, metrics_from_confusion
from tasks.files import write_atomically
from tasks.lexical import COMPANION_FILE, LexicalCompanion
from tasks.models import (
    cached_tensor, load_classifier, load_tokenizer, map_batches, model_fingerprint, pad_batch, predict_proba, tokenize,
)
from tasks.progress import append_progress, progress_file

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"


@dataclass(frozen=True)
class TrainingData:
    texts: list[str]
    labels: np.ndarray  # class index per row
    weights: np.ndarray  # loss weight per row
    domains: np.ndarray  # "source" | "target" per row


@dataclass
class FinetuneResult:
    model: torch.nn.Module
    tokenizer: object
    strategy: str
    reason: str
    runtime: Runtime
    log: list[dict]
    metrics: dict
    epochs_run: int
    best_epoch: int
    resumed_from_step: int | None
    train_seconds: float
    samples_per_second: float
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


def build_training_data(splits: dict[str, pd.DataFrame], labels: list[str], cfg: TrainConfig
                        ) -> tuple[TrainingData, TrainingData]:
    """Train and validation rows. Validation (for early stopping) is a stratified share of the
    target train split: the target is what the model must get right; the holdouts stay untouched."""
    index = {label: i for i, label in enumerate(labels)}
    target = splits["target_train"]
    unknown = sorted(set(target["label"]) - set(index))
    if unknown:
        raise DataError(f"target_train has labels {unknown} that are not in ingest.labels {labels}")
    stratify = target["label"] if target["label"].value_counts().min() >= 2 else None
    fit_idx, valid_idx = train_test_split(np.arange(len(target)), test_size=cfg.validation_fraction,
                                          random_state=cfg.seed, stratify=stratify)
    parts = [(target.iloc[np.sort(fit_idx)], "target", cfg.target_weight)]
    if cfg.data == "source_and_target":
        parts.append((splits["source_train"], "source", 1.0))
    frames = []
    for frame, domain, weight in parts:
        frames.append(frame.assign(_domain=domain, _weight=weight))
    train = pd.concat(frames, ignore_index=True)
    train = train[train["label"].isin(index)]
    valid = target.iloc[np.sort(valid_idx)]
    return as_training_data(train, index), as_training_data(valid.assign(_domain="target", _weight=1.0), index)


def as_training_data(frame: pd.DataFrame, index: dict[str, int]) -> TrainingData:
    return TrainingData(
        texts=frame["text"].astype("str").tolist(),
        labels=frame["label"].map(index).to_numpy(dtype=np.int64),
        weights=frame["_weight"].to_numpy(dtype=np.float32),
        domains=frame["_domain"].to_numpy(dtype=object),
    )


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor:
    """'balanced': n / (k * count_c), as scikit-learn defines it; classes absent from train get 1."""
    if mode == "none":
        return torch.ones(n_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of 50 batches, so each batch pads little while
    the order stays random. Deterministic in (seed, epoch), which is what makes resuming exact."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(runtime: Runtime) -> Distributed:
    """Join the process group that torchrun set up (WORLD_SIZE > 1); gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return Distributed(rank=torch.distributed.get_rank(), world=world)


# ----------------------------------------------------------------------------- model parts


def encoder_blocks(model) -> list[torch.nn.Module]:
    base = model.base_model
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: gradual_unfreeze and feature_extraction need a "
                          "BERT-style encoder (base_model.encoder.layer); use full or lora")
    return list(layers)


def head_modules(model) -> list[torch.nn.Module]:
    """What feature extraction trains: the pooler (if any) and the classifier."""
    pooler = getattr(model.base_model, "pooler", None)
    return [m for m in (pooler, model.classifier) if m is not None]


def is_no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def param_groups(model, strategy: str, cfg: TrainConfig) -> list[dict]:
    """Optimiser groups: head at head_learning_rate; LoRA adapters at lora.learning_rate; encoder at
    learning_rate, decayed per block downwards for gradual_unfreeze; no weight decay on biases and LayerNorm."""
    head_ids = {id(p) for m in head_modules(model) for p in m.parameters()} if hasattr(model, "classifier") else set()
    depth: dict[int, int] = {}
    below_all = 0
    if strategy == "gradual_unfreeze":
        blocks = encoder_blocks(model)
        below_all = len(blocks)  # the embeddings sit under the bottom block
        for i, block in enumerate(blocks):
            for p in block.parameters():
                depth[id(p)] = len(blocks) - 1 - i
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and strategy != "gradual_unfreeze":
            continue
        if id(p) in head_ids:
            lr = cfg.head_learning_rate
        elif strategy == "lora" and "lora_" in name:
            lr = cfg.lora.learning_rate
        elif strategy == "gradual_unfreeze":
            lr = cfg.learning_rate * cfg.layer_lr_decay ** depth.get(id(p), below_all)
        else:
            lr = cfg.learning_rate
        decay = 0.0 if is_no_decay(name) else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def unfreeze_for_epoch(model, epoch: int) -> int:
    """gradual_unfreeze: head plus the top `epoch + 1` blocks train; embeddings join last."""
    blocks = encoder_blocks(model)
    for p in model.parameters():
        p.requires_grad = False
    for m in head_modules(model):
        for p in m.parameters():
            p.requires_grad = True
    thawed = min(epoch + 1, len(blocks))
    for block in blocks[len(blocks) - thawed:]:
        for p in block.parameters():
            p.requires_grad = True
    if epoch + 1 > len(blocks):
        for p in model.base_model.embeddings.parameters():
            p.requires_grad = True
    return thawed


def wrap_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                        lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    return get_peft_model(model, config)


def plain_model(model):
    """The HF model inside DDP and peft wrappers, with LoRA adapters merged into the weights."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hasattr(inner, "merge_and_unload"):
        inner = copy.deepcopy(inner).merge_and_unload()
    return inner


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- evaluation


def validation_metrics(labels: np.ndarray, scores: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 of the highest-scoring class, from the metrics function the evaluate stage uses,
    so validation and test numbers mean the same thing."""
    predicted = scores.argmax(dim=1).numpy()
    metrics = metrics_from_confusion(confusion_counts(labels, predicted, scores.shape[1]))
    return {"accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"])}


def fit_temperature(logits: torch.Tensor, labels: np.ndarray) -> float:
    """The temperature T that minimises the negative log-likelihood of softmax(logits / T) (Guo et al., 2017)."""
    from scipy.optimize import minimize_scalar

    target = torch.as_tensor(labels, dtype=torch.long)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), target))

    return float(math.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def calibrate(result: FinetuneResult, valid: TrainingData, max_length: int, bins: int = 10) -> dict:
    """Temperature scaling on the validation rows held out of target_train (never the holdouts): the temperature
    goes into the model's config, so every reader of its probabilities gets calibrated ones; argmax, and so
    every label, is unchanged."""
    from tasks.models import TEMPERATURE_KEY, predict_logits

    if len(valid.texts) < 10:
        setattr(result.model.config, TEMPERATURE_KEY, 1.0)
        return {"temperature": 1.0, "note": f"{len(valid.texts)} validation rows: too few to calibrate"}
    setattr(result.model.config, TEMPERATURE_KEY, None)  # the logits as trained (a champion's T is not ours)
    logits = predict_logits(result.model, result.tokenizer, valid.texts, max_length, runtime=result.runtime)
    return set_temperature(result, logits, valid.labels, bins, "temperature scaling on the validation rows")


def set_temperature(result: FinetuneResult, logits: torch.Tensor, labels: np.ndarray, bins: int, method: str) -> dict:
    """Fit T on (logits, labels), write it into the model's config, and report it with the ECE before and after."""
    from tasks.evaluate import expected_calibration_error
    from tasks.models import TEMPERATURE_KEY

    t = fit_temperature(logits, labels)
    setattr(result.model.config, TEMPERATURE_KEY, t)
    ece = {name: expected_calibration_error(torch.softmax(logits / scale, dim=-1).numpy(), labels, bins)
           for name, scale in (("before", 1.0), ("after", t))}
    return {"temperature": t, "validation_rows": len(labels), "validation_ece_before": ece["before"],
            "validation_ece_after": ece["after"], "method": method}


def calibrate_cross_fitted(result: FinetuneResult, crossed: dict, bins: int = 10) -> tuple[dict, np.ndarray]:
    """Temperature scaling of the frozen encoder's head on its out-of-fold probabilities over every labelled target
    row (cross_fitted_cheap): ten times the validation rows, and none scored by a head that early-stopped on it. With
    the calibration report, the tempered out-of-fold probabilities."""
    logits = torch.log(torch.as_tensor(crossed["feature_extraction"], dtype=torch.float32).clamp_min(1e-12))
    report = set_temperature(result, logits, crossed["labels"], bins, f"temperature scaling on {crossed['folds']}-fold "
                             "cross-fitted probabilities of every target row")
    return report, torch.softmax(logits / report["temperature"], dim=-1).numpy()


def calibrated_encoders(result: FinetuneResult, choice, valid: TrainingData,
                        max_length: int) -> tuple[dict[str, tuple], dict | None]:
    """The trained encoders the candidate may serve, cheapest first, each calibrated: name -> (result, calibration
    report, calibrated validation probabilities); and, under auto, the cross-fitted probabilities of every target
    row that `served_model` weighs the frozen encoder on, so the adaptive one must still beat it after the long fit."""
    from tasks.models import predict_proba

    encoders, cross_fitted = {}, None
    if choice.cheap is not None and choice.cross_fitted is not None:
        calibration, tempered = calibrate_cross_fitted(choice.cheap, choice.cross_fitted)
        encoders["feature_extraction"] = (choice.cheap, calibration, tempered[len(tempered) - len(valid.texts):])
        cross_fitted = {"feature_extraction": tempered, "tfidf": choice.cross_fitted["tfidf"],
                        "labels": choice.cross_fitted["labels"]}
    if result is not choice.cheap:
        calibration = calibrate(result, valid, max_length)
        proba = predict_proba(result.model, result.tokenizer, valid.texts, max_length, runtime=result.runtime).numpy()
        encoders[result.strategy] = (result, calibration, proba)
    return encoders, cross_fitted


def log_loss(proba: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-12, None))))


def choose_weight(encoder_proba: np.ndarray, lexical_proba: np.ndarray, labels: np.ndarray,
                  grid: list[float]) -> tuple[float, list[dict]]:
    """The pool weight with the best validation macro-F1, the metric the gate and the strategy race judge (ties:
    the lower log-loss, then the smaller weight), and the table of every weight tried. Log-loss alone is not the
    rule: on the demo's 43 validation rows it preferred w = 0.25 (0.768 against 0.786), whose macro-F1 there was
    0.494 against the encoder's 0.619, and the pooled candidate lost 0.058 target-holdout macro-F1."""
    table = []
    for w in sorted(set(grid)):
        pooled = (1 - w) * encoder_proba + w * lexical_proba
        confusion = confusion_counts(labels, pooled.argmax(axis=1), pooled.shape[1])
        table.append({"weight": w, "log_loss": round(log_loss(pooled, labels), 4),
                      "macro_f1": round(float(metrics_from_confusion(confusion)["macro_f1"]), 4)})
    best = min(table, key=lambda row: (-row["macro_f1"], row["log_loss"], row["weight"]))
    return best["weight"], table


@dataclass
class ServedModel:
    """What the candidate serves: which trained encoder, pooled with which lexical companion (None: the encoder
    alone), and the report of how it was chosen."""

    encoder: str
    companion: LexicalCompanion | None
    report: dict


def served_model(encoders_valid: dict[str, np.ndarray], train, valid, n_classes: int, grid: list[float],
                 cross_fitted: dict | None = None) -> ServedModel:
    """The best served model: each trained encoder (calibrated validation probabilities, cheapest first) pooled with
    the lexical companion fit on the train rows at the weight of `grid` with the best macro-F1 (1 serves the lexical
    model alone), then the encoder whose pool scores best on the validation rows (ties: the cheaper).

    With `cross_fitted` (the frozen encoder's tempered out-of-fold probabilities, TF-IDF's and the labels of every
    target row, validation rows last), the frozen encoder's weight and temperature come from all the target rows
    rather than the validation split alone: on the demo's 43 validation rows one split's noise (a standard error
    near 0.07) is larger than the differences being chosen between. The winner's pool gets a last temperature, so
    that what is served is calibrated, not only the encoder inside it."""
    names = list(encoders_valid)
    n = len(valid.texts)
    if max(grid) == 0 or n < 10:
        why = "train.lexical_weights is [0]" if max(grid) == 0 else f"{n} validation rows: too few to choose among models"
        return ServedModel(names[0], None, alone(why, names[0]))
    from tasks.baselines import fit_companion

    companion = fit_companion(train.texts, train.labels, train.weights, n_classes)
    if companion is None:
        return ServedModel(names[0], None, alone("no lexical model fits the train rows (no word pair occurs twice)",
                                                 names[0]))
    lexical_valid = companion.proba(valid.texts)
    # The rows each encoder's weight and temperature are chosen on: (encoder, lexical, labels), validation rows last.
    scoring = {name: (proba, lexical_valid, valid.labels) for name, proba in encoders_valid.items()}
    if cross_fitted is not None and "feature_extraction" in scoring:
        scoring["feature_extraction"] = (cross_fitted["feature_extraction"], cross_fitted["tfidf"],
                                         cross_fitted["labels"])
    tried = {name: choose_weight(*rows, grid) for name, rows in scoring.items()}

    def on_validation(name: str) -> float:
        encoder_proba, lexical, labels = (rows[len(rows) - n:] for rows in scoring[name])
        w = tried[name][0]
        return validation_metrics(labels, torch.as_tensor((1 - w) * encoder_proba + w * lexical))["macro_f1"]

    validation = {name: on_validation(name) for name in names}
    if cross_fitted is not None:
        encoder, ladder = evidence_ladder(names, scoring, tried, n, n_classes)
    else:
        encoder, ladder = min(names, key=lambda name: (-validation[name], names.index(name))), None
    weight, table = tried[encoder]
    if ladder is not None and ladder["served"] == "tfidf":
        weight = 1.0
    shown = "; ".join(f"{name} {validation[name]:.3f} at w={tried[name][0]}" for name in names)
    report = {"encoder": encoder, "weight": weight, "validation_rows": n, "features": len(companion.idf),
              "by_weight": table, "by_encoder": {name: {"validation_macro_f1": validation[name], "weight": tried[name][0],
                                                        "rows": len(scoring[name][2]), "by_weight": tried[name][1]}
                                                 for name in names},
              "method": "TF-IDF + logistic regression on the train rows; each encoder's w by macro-F1 (then log-loss) "
                        "on its rows (the frozen encoder's: every target row, cross-fitted), the encoder by validation "
                        "macro-F1" + (", each costlier model only when clearly better (evidence_ladder)" if ladder else "")}
    if ladder is not None:
        report["evidence_ladder"] = ladder
    if weight == 0:
        return ServedModel(encoder, None, {**report, "served_as": f"{encoder_words(encoder)} alone (validation "
                                                                  f"macro-F1 {shown})"})
    encoder_proba, lexical, labels = scoring[encoder]
    pooled = (1 - weight) * encoder_proba + weight * lexical
    temperature = fit_temperature(torch.as_tensor(np.log(np.clip(pooled, 1e-12, None))), labels)
    if weight == 1:
        # The lexical model alone: refit on every train row, unweighted, and untempered, it is evaluate's TF-IDF
        # baseline itself, so the gate compares the served model with exactly the model that won the evidence.
        companion = fit_companion(train.texts + valid.texts, np.concatenate([train.labels, valid.labels]),
                                  np.ones(n + len(train.texts)), n_classes) or companion
        temperature = 1.0
    companion.weight = weight
    companion.temperature = report["pool_temperature"] = temperature
    what = ("TF-IDF + logistic regression alone, the encoder's output weighted 0" if weight == 1 else
            f"(1 - {weight}) x {encoder_words(encoder)} + {weight} x TF-IDF + logistic regression")
    return ServedModel(encoder, companion, {
        **report, "served_as": f"{what}, {COMPANION_FILE}, temperature {companion.temperature:.3f} on the pool "
                               f"(validation macro-F1 {shown})"})


def evidence_ladder(names: list[str], scoring: dict[str, tuple], tried: dict[str, tuple], n_valid: int,
                    n_classes: int, confidence: float = 0.95) -> tuple[str, dict]:
    """Under auto: the cheapest model the evidence cannot tell apart from a costlier one. Climb from the lexical model
    alone (evaluate's TF-IDF baseline) to the frozen encoder's pool, judged on every cross-fitted target row, then to
    each adaptive encoder's pool, judged on the validation rows; a step is taken only when the paired bootstrap
    interval of the macro-F1 difference lies above zero. The point estimate alone is not the rule: on 24 validation
    rows a fine-tuned model 0.209 ahead [-0.089, +0.476] of the cheap one scored 0.191 below TF-IDF on the holdout.
    Returns the encoder whose pool is served (its weight is 1 when "tfidf" is served) and the steps as a report."""
    from tasks.strategy import macro_f1_evidence

    def pooled(name: str) -> np.ndarray:
        encoder_proba, lexical, _ = scoring[name]
        w = tried[name][0]
        return (1 - w) * encoder_proba + w * lexical

    grid_has_lexical = any(row["weight"] == 1.0 for row in tried[names[0]][1])
    # Without 1 in train.lexical_weights the lexical model alone is never served: the cheapest encoder is the floor.
    served = "tfidf" if grid_has_lexical else names[0]
    steps = []
    for name in names:
        if name == served:
            continue
        # The frozen encoder's rows are every target row, cross-fitted; an adaptive one's the validation rows (last).
        rows = len(scoring[name][2]) if name == "feature_extraction" else n_valid
        labels = scoring[name][2][-rows:]
        below = scoring[name][1][-rows:] if served == "tfidf" else pooled(served)[-rows:]
        evidence = macro_f1_evidence(labels, {"below": below.argmax(axis=1), "next": pooled(name)[-rows:].argmax(axis=1)},
                                     n_classes, "below", confidence=confidence)
        gap = evidence["next"]["minus_below"]
        taken = gap["interval"][0] is not None and gap["interval"][0] > 0
        steps.append({"from": served, "to": name, "rows": rows, "difference": round(gap["estimate"], 4),
                      "interval": [None if v is None else round(v, 4) for v in gap["interval"]], "taken": taken})
        if taken:
            served = name
    served_name = names[0] if served == "tfidf" else served
    return served_name, {"served": served, "confidence": confidence, "steps": steps,
                         "rule": "each costlier model is served only when its paired macro-F1 difference from the "
                                 "model below is above zero at this confidence"}


def encoder_words(strategy: str) -> str:
    return ("the frozen encoder with its trained head" if strategy == "feature_extraction"
            else f"the encoder ({strategy})")


def alone(why: str, strategy: str = "") -> dict:
    return {"encoder": strategy, "weight": 0.0, "served_as": f"{encoder_words(strategy)} alone ({why})"}


def score(model, tokenizer, data: TrainingData, max_length: int, runtime: Runtime) -> dict[str, float]:
    """The model's validation metrics on `data`."""
    return validation_metrics(data.labels, predict_proba(model, tokenizer, data.texts, max_length, runtime=runtime))


# ----------------------------------------------------------------------------- progress


class Progress:
    """Throughput and ETA: a tqdm bar on a terminal, plain lines otherwise (they reach Prefect's log), and at
    each progress point a record in the progress file when the flow names one (tasks/progress.py)."""

    def __init__(self, total: int, every: int, enabled: bool, done: int = 0):
        self.total, self.every, self.enabled = total, every, enabled
        self.started = time.perf_counter()
        self.start_step = done
        self.bar = None
        self.records = progress_file() if enabled else None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="step", desc="finetune", dynamic_ncols=True)

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_second']:.1f}")
        if step % self.every != 0 and step != self.total:
            return
        rate = (step - self.start_step) / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        if self.records is not None:
            self.record({"step": step, "total": self.total, "epoch": row["epoch"], "loss": row["loss"],
                         "learning_rate": row["learning_rate"], "samples_per_second": row["samples_per_second"],
                         "eta_seconds": eta})
        if self.bar is None:
            print(f"finetune: step {step}/{self.total} epoch {row['epoch']} loss {row['loss']:.4f} "
                  f"lr {row['learning_rate']:.2e} {row['samples_per_second']:.1f} samples/s "
                  f"ETA {eta:.0f}s", flush=True)

    def record(self, record: dict) -> None:
        try:
            append_progress(self.records, record)
        except OSError as exc:
            # The records are for watching the run: losing them must not cost the training.
            print(f"finetune: no more progress records ({exc})", flush=True)
            self.records = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- checkpoints


def run_fingerprint(base: str, strategy: str, cfg: TrainConfig, model_cfg: ModelConfig, train: TrainingData,
                    world: int) -> str:
    """A checkpoint is resumed only by a run with the same model, data, parameters and process count."""
    digest = hashlib.sha256()
    for part in (model_fingerprint(base), strategy, cfg.model_dump_json(), model_cfg.model_dump_json(), str(world)):
        digest.update(part.encode())
    digest.update("\x00".join(train.texts).encode())
    digest.update(train.labels.tobytes())
    return digest.hexdigest()[:20]


def save_checkpoint(directory: Path, state: dict) -> None:
    # Through a temporary file: a run killed mid-save keeps its previous checkpoint whole.
    write_atomically(directory / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(directory: Path | None, fingerprint: str) -> dict | None:
    path = directory / CHECKPOINT_FILE if directory else None
    if path is None or not path.is_file():
        return None
    # weights_only: a checkpoint folder is writable by others, and a full unpickle would run their code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("fingerprint") == fingerprint else None


# ----------------------------------------------------------------------------- training


def finetune(base: str, labels: list[str], train: TrainingData, valid: TrainingData, cfg: TrainConfig,
             model_cfg: ModelConfig, strategy: str, reason: str, checkpoint_dir: Path | None = None,
             cache_dir: Path | None = None, progress: bool = True,
             on_log: Callable[[dict], None] | None = None, stop_after_epochs: int | None = None) -> FinetuneResult:
    """Train with `strategy` and return the trained (plain HF) model with its log and metrics. With
    `stop_after_epochs`, the layers' loop pauses after that many epochs with its checkpoint saved: the same call
    without it later resumes there and finishes the schedule."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    runtime = choose_runtime(cfg.precision, cfg.threads, processes=world)
    dist = init_distributed(runtime)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    # Profiled on this project's CPU: eager attention backpropagates faster than SDPA's CPU kernel.
    attention = "eager" if runtime.device.type == "cpu" else None
    model = load_classifier(base, labels, attention_dropout=cfg.attention_dropout, attn_implementation=attention)
    if strategy == "feature_extraction":
        return train_head(model, tokenizer, base, labels, train, valid, cfg, model_cfg, runtime, cache_dir,
                          reason, progress and dist.is_main)
    if cfg.linear_probe_first:
        train_head(model, tokenizer, base, labels, train, valid, cfg, model_cfg, runtime, cache_dir, reason,
                   progress and dist.is_main, what=f"linear probe before {strategy}")
        for p in model.parameters():  # the probe froze the encoder; the strategy decides what trains
            p.requires_grad = True
    plan = TrainingPlan(
        model=prepare_for_training(model, strategy, cfg, runtime), tokenizer=tokenizer, strategy=strategy,
        reason=reason, train=train, valid=valid, sequences=tokenize(tokenizer, train.texts, model_cfg.max_length),
        cfg=cfg, model_cfg=model_cfg, runtime=runtime, dist=dist,
        fingerprint=run_fingerprint(base, strategy, cfg, model_cfg, train, dist.world),
        checkpoint_dir=checkpoint_dir, progress=progress, on_log=on_log, stop_after_epochs=stop_after_epochs,
    )
    return train_layers(plan)


def prepare_for_training(model, strategy: str, cfg: TrainConfig, runtime: Runtime):
    """The model as the loop trains it: LoRA-wrapped for lora, on the device, the top block thawed for
    gradual_unfreeze (before the optimiser is built, which sees only parameters that train)."""
    if strategy == "lora":
        model = wrap_lora(model, cfg)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(runtime.device)
    if strategy == "gradual_unfreeze":
        unfreeze_for_epoch(model, 0)
    return model


@dataclass(frozen=True)
class TrainingPlan:
    """One run of the loop behind full, gradual_unfreeze and lora, resolved before its first step:
    what trains, on which rows, with which settings, in which processes, checkpointed where."""

    model: torch.nn.Module  # as prepare_for_training left it
    tokenizer: object
    strategy: str
    reason: str
    train: TrainingData
    valid: TrainingData
    sequences: list[list[int]]  # token ids of train.texts, unpadded
    cfg: TrainConfig
    model_cfg: ModelConfig
    runtime: Runtime
    dist: Distributed
    fingerprint: str  # a checkpoint is resumed only if it carries this (see run_fingerprint)
    checkpoint_dir: Path | None
    progress: bool
    on_log: Callable[[dict], None] | None = None
    stop_after_epochs: int | None = None  # pause there (checkpoint saved); the schedule stays the full one

    @cached_property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]

    @cached_property
    def batches_per_rank(self) -> int:
        """Batches each process runs per epoch; the same on every rank, so DDP's gradient all-reduces pair up."""
        return len(length_grouped_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, 0)) // self.dist.world

    @cached_property
    def total_steps(self) -> int:
        return math.ceil(self.batches_per_rank / self.cfg.grad_accum) * self.cfg.epochs


@dataclass
class TrainingState:
    """What changes while a plan trains. A checkpoint saves the weights, optimiser, schedule, RNG, position,
    log and best epoch; the rest is rebuilt or, for the best weights, read back from best.pt."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: torch.nn.Module
    scaler: torch.amp.GradScaler | None
    step: int = 0  # optimiser steps taken
    start_epoch: int = 0  # later than 0 after a resume
    skip_batches: int = 0  # batches of start_epoch done before the resume
    log: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"macro_f1": -1.0, "epoch": -1, "stale": 0, "metrics": {}})
    resumed_from: int | None = None  # the checkpoint's step, if this run resumed one
    kept_best: dict | None = None  # the weights of the best validation epoch seen by this process
    samples_seen: int = 0


def train_layers(plan: TrainingPlan) -> FinetuneResult:
    """Train the plan epoch by epoch from where its checkpoint left off, validating after each epoch and
    stopping early when validation stops improving."""
    state = start_training(plan)
    bar = Progress(plan.total_steps, plan.cfg.log_every, plan.progress and plan.dist.is_main, done=state.step)
    started = time.perf_counter()
    epochs_run = state.start_epoch
    for epoch in range(state.start_epoch, plan.cfg.epochs):
        train_epoch(plan, state, epoch, bar)
        epochs_run = epoch + 1
        validate_epoch(plan, state, epoch)
        save_training_checkpoint(plan, state, epoch + 1, batch=0)
        if stops_early(plan, state, epoch) or (plan.stop_after_epochs and epochs_run >= plan.stop_after_epochs):
            break
    bar.close()
    train_seconds = time.perf_counter() - started
    restore_best_epoch(plan, state)
    return training_result(plan, state, epochs_run, train_seconds)


def start_training(plan: TrainingPlan) -> TrainingState:
    """Optimiser, learning-rate schedule and loss for the plan, restored from its checkpoint if there is one."""
    cfg, runtime = plan.cfg, plan.runtime
    # Fused AdamW: one kernel over all parameters instead of a loop (faster steps in profiling on CPU).
    optimizer = torch.optim.AdamW(param_groups(plan.model, plan.strategy, cfg), fused=True)
    total, warmup = plan.total_steps, int(plan.total_steps * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    weights = class_weights(plan.train.labels, plan.model.config.num_labels, cfg.class_weights)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(runtime.device), reduction="none")
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
    state = TrainingState(optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, scaler=scaler)
    resume_from_checkpoint(plan, state)
    return state


def resume_from_checkpoint(plan: TrainingPlan, state: TrainingState) -> None:
    """Continue a killed run of the same plan: weights, optimiser, schedule, RNG and the position in the
    epoch's batch order come back, so the resumed run ends with the weights of an uninterrupted one."""
    saved = load_checkpoint(plan.checkpoint_dir, plan.fingerprint)
    if saved is None:
        return
    if plan.strategy == "gradual_unfreeze":
        # train_epoch does not thaw the epoch a run resumes in; its blocks must train from the first step.
        unfreeze_for_epoch(plan.model, saved["epoch"])
    plan.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state.step, state.start_epoch, state.skip_batches = saved["step"], saved["epoch"], saved["batch"]
    state.log, state.best, state.resumed_from = saved["log"], saved["best"], saved["step"]
    if plan.dist.is_main:
        print(f"finetune: resuming from the checkpoint at step {state.step} (epoch {state.start_epoch}, "
              f"batch {state.skip_batches})", flush=True)


def save_training_checkpoint(plan: TrainingPlan, state: TrainingState, epoch: int, batch: int) -> None:
    """Rank 0 saves where training stands (a resume starts at `batch` of `epoch`); every rank waits for it."""
    if plan.checkpoint_dir is not None and plan.dist.is_main:
        save_checkpoint(plan.checkpoint_dir, {
            "fingerprint": plan.fingerprint, "model": plan.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "rng": torch.get_rng_state(), "step": state.step, "epoch": epoch,
            "batch": batch, "log": state.log, "best": state.best})
    plan.dist.barrier()


def train_epoch(plan: TrainingPlan, state: TrainingState, epoch: int, bar: Progress) -> None:
    """The optimiser steps of one epoch over this process's share of the batches, skipping the batches a
    resumed checkpoint already did, logging each step and checkpointing every `checkpoint_every` steps."""
    model, cfg, dist, runtime = plan.model, plan.cfg, plan.dist, plan.runtime
    if plan.strategy == "gradual_unfreeze" and (epoch > state.start_epoch or state.resumed_from is None):
        unfreeze_for_epoch(model, epoch)
    ddp_model = model
    if dist.world > 1:
        # Rebuilt each epoch: DDP registers the parameters that train at construction time.
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    ddp_model.train()
    batches = length_grouped_batches(plan.lengths, cfg.batch_size, cfg.seed, epoch)
    batches = batches[: plan.batches_per_rank * dist.world][dist.rank:: dist.world]
    skip = state.skip_batches if epoch == state.start_epoch else 0
    window_start, window_samples = time.perf_counter(), 0
    for b, idx in enumerate(batches):
        if b < skip:
            continue
        inputs = {k: v.to(runtime.device) for k, v in pad_batch([plan.sequences[i] for i in idx],
                                                                  plan.tokenizer.pad_token_id).items()}
        target = torch.tensor(plan.train.labels[idx], device=runtime.device)
        weight = torch.tensor(plan.train.weights[idx], device=runtime.device)
        with autocast(runtime):
            logits = ddp_model(**inputs).logits
        loss = (state.loss_fn(logits.float(), target) * weight).sum() / weight.sum() / cfg.grad_accum
        (state.scaler.scale(loss) if state.scaler else loss).backward()
        window_samples += len(idx) * dist.world
        state.samples_seen += len(idx) * dist.world
        if (b + 1) % cfg.grad_accum != 0 and b + 1 != len(batches):
            continue
        take_optimiser_step(model, state)
        state.step += 1
        elapsed = time.perf_counter() - window_start
        row = {"step": state.step, "epoch": epoch + 1, "loss": float(loss.item() * cfg.grad_accum),
               "learning_rate": float(max(g["lr"] for g in state.optimizer.param_groups)),
               "samples_per_second": window_samples / max(elapsed, 1e-9)}
        window_start, window_samples = time.perf_counter(), 0
        state.log.append(row)
        bar.update(state.step, row)
        if plan.on_log:
            plan.on_log(row)
        if state.step % cfg.checkpoint_every == 0:
            save_training_checkpoint(plan, state, epoch, b + 1)


def take_optimiser_step(model, state: TrainingState) -> None:
    """Clip the accumulated gradients, step the optimiser and the schedule (through the fp16 scaler if any)."""
    if state.scaler:
        state.scaler.unscale_(state.optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)


def validate_epoch(plan: TrainingPlan, state: TrainingState, epoch: int) -> None:
    """Score the epoch on the validation rows and keep its weights if it is the best so far."""
    metrics = score(plain_model(plan.model), plan.tokenizer, plan.valid, plan.model_cfg.max_length, plan.runtime)
    if metrics["macro_f1"] > state.best["macro_f1"]:
        state.best = {"macro_f1": metrics["macro_f1"], "epoch": epoch + 1, "stale": 0, "metrics": metrics}
        state.kept_best = {k: v.detach().clone() for k, v in plan.model.state_dict().items()}
        if plan.checkpoint_dir is not None and plan.dist.is_main:
            # On disk too: a run resumed after this epoch has only the file to restore the best epoch from.
            write_atomically(plan.checkpoint_dir / BEST_FILE, lambda tmp: torch.save(state.kept_best, tmp))
    else:
        state.best["stale"] += 1
    if plan.dist.is_main:
        print(f"finetune: epoch {epoch + 1} validation accuracy {metrics['accuracy']:.3f} "
              f"macro-F1 {metrics['macro_f1']:.3f}", flush=True)


def stops_early(plan: TrainingPlan, state: TrainingState, epoch: int) -> bool:
    """Whether, after `epoch`, `early_stopping_patience` epochs in a row brought no better validation macro-F1."""
    patience = plan.cfg.early_stopping_patience
    if not (patience and state.best["stale"] >= patience):
        return False
    if plan.dist.is_main:
        print(f"finetune: early stop after epoch {epoch + 1}: no better validation macro-F1 "
              f"for {state.best['stale']} epochs (best: epoch {state.best['epoch']})", flush=True)
    return True


def restore_best_epoch(plan: TrainingPlan, state: TrainingState) -> None:
    """With early stopping the best validation epoch is the model; without it, the last epoch is."""
    if not plan.cfg.early_stopping_patience:
        return
    best = state.kept_best
    if best is None and plan.checkpoint_dir is not None and (plan.checkpoint_dir / BEST_FILE).is_file():
        best = torch.load(plan.checkpoint_dir / BEST_FILE, map_location="cpu", weights_only=True)  # best was before a resume
    if best is not None:
        plan.model.load_state_dict(best)


def training_result(plan: TrainingPlan, state: TrainingState, epochs_run: int, train_seconds: float) -> FinetuneResult:
    """The plain HF model with the run's log, best validation metrics and speed."""
    extra = {"world_size": plan.dist.world, "total_steps": plan.total_steps}
    if plan.dist.world > 1:
        # Every replica must end with the same weights; record each rank's digest so it can be checked.
        digests: list = [None] * plan.dist.world
        torch.distributed.all_gather_object(digests, weights_digest(plan.model))
        extra["rank_weight_sha256"] = digests
    return FinetuneResult(
        model=plain_model(plan.model), tokenizer=plan.tokenizer, strategy=plan.strategy, reason=plan.reason,
        runtime=plan.runtime, log=state.log, metrics={"validation": state.best["metrics"]}, epochs_run=epochs_run,
        best_epoch=state.best["epoch"], resumed_from_step=state.resumed_from, train_seconds=train_seconds,
        samples_per_second=state.samples_seen / max(train_seconds, 1e-9), extra=extra,
    )


# ----------------------------------------------------------------------------- feature extraction


@torch.no_grad()
def encoder_features(model, tokenizer, texts: list[str], max_length: int, runtime: Runtime,
                     batch_size: int = 64) -> torch.Tensor:
    """The frozen encoder's [CLS] state per text: what the pooler and classifier read."""
    model.eval().to(runtime.device)
    return map_batches(lambda batch: model.base_model(**batch).last_hidden_state[:, 0], tokenizer, texts,
                       max_length, model.config.hidden_size, runtime, batch_size)


def cached_features(model, tokenizer, base: str, texts: list[str], max_length: int, runtime: Runtime,
                    cache_dir: Path | None) -> tuple[torch.Tensor, bool]:
    """Features from the cache when the same model has seen the same texts, else computed and stored;
    with whether they came from the cache."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:20]
    key = f"cls-{model_fingerprint(base)}-{max_length}-{runtime.precision}-{digest}.pt"
    return cached_tensor(cache_dir / key if cache_dir else None,
                         lambda: encoder_features(model, tokenizer, texts, max_length, runtime))


def head_forward(model, features: torch.Tensor) -> torch.Tensor:
    """Pooler + dropout + classifier on cached [CLS] states: the same computation the full model does."""
    pooler = getattr(model.base_model, "pooler", None)
    pooled = pooler.activation(pooler.dense(features)) if pooler is not None else features
    dropout = getattr(model, "dropout", torch.nn.Identity())
    return model.classifier(dropout(pooled))


def train_head(model, tokenizer, base, labels, train, valid, cfg, model_cfg, runtime, cache_dir, reason,
               progress, what: str = "feature extraction") -> FinetuneResult:
    """The head (pooler + classifier) fitted on the frozen encoder's cached [CLS] features: feature_extraction's
    model, or LP-FT's starting point (`what` names which in the log)."""
    started = time.perf_counter()
    features, hit = cached_features(model, tokenizer, base, train.texts, model_cfg.max_length, runtime, cache_dir)
    valid_features, _ = cached_features(model, tokenizer, base, valid.texts, model_cfg.max_length, runtime, cache_dir)
    initial = [copy.deepcopy(m.state_dict()) for m in head_modules(model)]  # cross-fitting starts each fold here
    optimizer, loss_fn = head_optimiser(model, train, len(labels), cfg)
    labels_t, weights_t = torch.tensor(train.labels), torch.tensor(train.weights)
    generator = torch.Generator().manual_seed(cfg.seed)
    log, best, best_state, stale, step = [], {"macro_f1": -1.0, "epoch": 0, "metrics": {}}, None, 0, 0
    model.cpu()
    epochs_run = 0
    for epoch in range(cfg.head_epochs):
        t0 = time.perf_counter()
        loss, steps, seen = head_epoch(model, optimizer, loss_fn, features, labels_t, weights_t, cfg, generator)
        step += steps
        log.append({"step": step, "epoch": epoch + 1, "loss": loss, "learning_rate": cfg.head_learning_rate,
                    "samples_per_second": seen / max(time.perf_counter() - t0, 1e-9)})
        model.eval()
        with torch.no_grad():
            metrics = validation_metrics(valid.labels, head_forward(model, valid_features))
        epochs_run = epoch + 1
        if metrics["macro_f1"] > best["macro_f1"]:
            best, stale = {"macro_f1": metrics["macro_f1"], "epoch": epoch + 1, "metrics": metrics}, 0
            best_state = [copy.deepcopy(m.state_dict()) for m in head_modules(model)]
        else:
            stale += 1
        # The head sees many cheap epochs, so patience scales with them.
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience * 5:
            break
    if best_state and cfg.early_stopping_patience:
        for module, kept in zip(head_modules(model), best_state, strict=True):
            module.load_state_dict(kept)
    if progress:
        print(f"finetune: {what} ({'cached' if hit else 'computed'} features), {epochs_run} head epochs, "
              f"best validation macro-F1 {best['macro_f1']:.3f} at epoch {best['epoch']}", flush=True)
    seconds = time.perf_counter() - started
    return FinetuneResult(
        model=model, tokenizer=tokenizer, strategy="feature_extraction", reason=reason, runtime=runtime, log=log,
        metrics={"validation": best["metrics"]}, epochs_run=epochs_run, best_epoch=best["epoch"],
        resumed_from_step=None, train_seconds=seconds, samples_per_second=len(train.texts) * epochs_run / max(seconds, 1e-9),
        extra={"features_cached": hit, "world_size": 1, "head_features": (features, valid_features),
               "head_initial": initial},
    )


def head_optimiser(model, train: TrainingData, n_classes: int, cfg: TrainConfig):
    """AdamW over the head's parameters only (the encoder frozen), and the class-weighted per-row loss."""
    for p in model.parameters():
        p.requires_grad = False
    head_params = [p for m in head_modules(model) for p in m.parameters()]
    for p in head_params:
        p.requires_grad = True
    optimizer = torch.optim.AdamW(head_params, lr=cfg.head_learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(train.labels, n_classes, cfg.class_weights),
                                        reduction="none")
    return optimizer, loss_fn


def head_epoch(model, optimizer, loss_fn, features, labels_t, weights_t, cfg: TrainConfig,
               generator) -> tuple[float, int, int]:
    """One epoch of the head on cached features: (last loss, optimiser steps, rows seen)."""
    model.train()
    steps = seen = 0
    loss = torch.zeros(())
    for idx in torch.randperm(len(labels_t), generator=generator).split(cfg.batch_size * cfg.grad_accum):
        loss = (loss_fn(head_forward(model, features[idx]), labels_t[idx]) * weights_t[idx]).sum() / weights_t[idx].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        seen += len(idx)
    return float(loss.item()), steps, seen


def target_rows(train: TrainingData, valid: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """Every labelled target row the stage holds, as (indexes into train, then len(train) + indexes into valid): the
    rows cross-fitting scores."""
    return np.flatnonzero(train.domains == "target"), len(train.texts) + np.arange(len(valid.texts))


def cross_fitted_cheap(result: FinetuneResult, train: TrainingData, valid: TrainingData, n_classes: int,
                       cfg: TrainConfig, folds: int = 5) -> dict:
    """Out-of-fold probabilities of the two cheap models on every labelled target row (train's target rows, then the
    validation rows): each fold's rows are scored by a TF-IDF + logistic regression and a frozen-encoder head fit on
    the source rows and the other folds, the head for the full model's best number of epochs, so no score comes
    from a model that saw the row or stopped early on it. Ten times the rows the validation split alone would
    score, and free of the selection bias of the head's early stopping on the validation rows."""
    from sklearn.model_selection import StratifiedKFold

    from tasks.baselines import tfidf_model
    from tasks.lexical import full_proba

    model = result.model
    features = torch.cat(list(result.extra["head_features"]))
    texts = np.asarray(train.texts + valid.texts, dtype=object)
    labels = np.concatenate([train.labels, valid.labels])
    weights = np.concatenate([train.weights, np.full(len(valid.texts), cfg.target_weight, dtype=np.float32)])
    target = np.concatenate(target_rows(train, valid))
    counts = np.bincount(labels[target], minlength=n_classes)
    k = int(min(folds, counts[counts > 0].min()))
    out = {"tfidf": np.zeros((len(target), n_classes)), "feature_extraction": np.zeros((len(target), n_classes)),
           "rows": target, "labels": labels[target], "folds": k}
    trained = [copy.deepcopy(m.state_dict()) for m in head_modules(model)]
    epochs = max(result.best_epoch, 1)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.seed) if k >= 2 else None
    for fit_target, scored in (splitter.split(target, labels[target]) if splitter else []):
        fit = np.concatenate([np.setdiff1d(np.arange(len(texts)), target), target[fit_target]])
        rows = target[scored]
        lexical = tfidf_model().fit(list(texts[fit]), labels[fit])
        out["tfidf"][scored] = full_proba(lexical.predict_proba(list(texts[rows])), lexical.classes_, n_classes)
        for module, state in zip(head_modules(model), result.extra["head_initial"], strict=True):
            module.load_state_dict(state)
        fold_data = TrainingData(list(texts[fit]), labels[fit], weights[fit], np.full(len(fit), "target", dtype=object))
        optimizer, loss_fn = head_optimiser(model, fold_data, n_classes, cfg)
        generator = torch.Generator().manual_seed(cfg.seed)
        labels_t, weights_t = torch.tensor(labels[fit]), torch.tensor(weights[fit])
        for _ in range(epochs):
            head_epoch(model, optimizer, loss_fn, features[fit], labels_t, weights_t, cfg, generator)
        model.eval()
        with torch.no_grad():
            out["feature_extraction"][scored] = torch.softmax(head_forward(model, features[rows]).float(), -1).numpy()
    for module, state in zip(head_modules(model), trained, strict=True):
        module.load_state_dict(state)
    model.eval()
    return out

