"""Stage finetune: adapt a pretrained encoder to the labelled data with a transfer strategy.

Strategies:
- feature_extraction: the encoder is frozen; the mean over its layers of each layer's token mean is computed once
  (cached by model and text) and only a linear classifier trains on it (tasks/models.py HEAD_INPUT_KEY).
- full: every layer trains; small encoder learning rate, warmup, weight decay.
- gradual_unfreeze: ULMFiT-style; the head and the top block first, one more block per epoch, with
  layer-wise decayed (discriminative) learning rates.
- lora: low-rank adapters (peft), merged into the weights at the end so serving needs no peft.
- auto: picks one of these from evidence on held-out target rows (tasks/strategy.py).

Training is resumable (a checkpoint every N optimiser steps restores weights, optimiser, scheduler,
RNG and the position in the epoch's batch order) and data-parallel under torchrun (gloo on CPU).

What it trains on is tasks/training_data.py's; which parameters train, tasks/trainable_parts.py's. After training,
tasks/calibration.py tempers the encoders, tasks/served_choice.py chooses what the candidate serves, and
tasks/cross_fitting.py scores the cheap models out of fold for auto.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from tasks.config import ModelConfig, TrainConfig
from tasks.devices import Runtime, autocast, choose_runtime
from tasks.dropout import use_fast_dropout
from tasks.evaluate import confusion_counts, metrics_from_confusion
from tasks.files import write_atomically
from tasks.models import (
    HEAD_INPUT_KEY, check_head_input, classifier_over_hidden_states, head_input, load_classifier, load_tokenizer,
    model_fingerprint, pad_batch, pooled_embeddings, predict_proba, tokenize,
)
from tasks.progress import Progress
from tasks.trainable_parts import (head_modules, lora_inputs_stay_in_autocast_dtype, param_groups, unfreeze_for_epoch,
                                   wrap_lora)
from tasks.training_data import TrainingData, class_weights, length_grouped_batches

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"


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


# ----------------------------------------------------------------------------- trained weights


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
    check_head_input(model, f"{base}: the model training starts from")
    if head_input(model) == "layer_mean" and strategy != "feature_extraction":
        # A champion trained as feature_extraction: its classifier was solved on the layers' mean, meaningless on the
        # pooler's output that full, lora and gradual_unfreeze train through, so it starts again as transformers
        # starts a new head (normal weights at the config's initializer_range, zero bias).
        torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
        torch.nn.init.zeros_(model.classifier.bias)
    setattr(model.config, HEAD_INPUT_KEY, None)  # what trains now reads what this strategy does (train_head sets it)
    if strategy == "feature_extraction":
        return train_head(model, tokenizer, base, labels, train, valid, cfg, model_cfg, runtime, cache_dir,
                          reason, progress and dist.is_main, reads="layer_mean")
    if cfg.linear_probe_first:
        train_head(model, tokenizer, base, labels, train, valid, cfg, model_cfg, runtime, cache_dir, reason,
                   progress and dist.is_main, what=f"linear probe before {strategy}", reads="pooler")
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
    if runtime.device.type == "cpu" and cfg.cpu_dropout == "fast":  # CUDA's fused dropout is fast; torch's CPU one is not
        use_fast_dropout(model)
        if strategy == "lora" and runtime.precision != "fp32":  # under autocast, with a dropout that scales in fp32
            lora_inputs_stay_in_autocast_dtype(model)
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
    checkpointed_step: int = 0  # the step of the last checkpoint, saved or resumed from
    valid_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # by epoch, the epochs this process ran


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
    state.checkpointed_step = saved["step"]
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
    state.checkpointed_step = state.step
    plan.dist.barrier()


def train_epoch(plan: TrainingPlan, state: TrainingState, epoch: int, bar: Progress) -> None:
    """The optimiser steps of one epoch over this process's share of the batches, skipping the batches a
    resumed checkpoint already did, logging each step and checkpointing once `checkpoint_every` steps have passed
    since the last checkpoint (an epoch's end saves one too: counting from it, the demo's race and epochs skip two
    saves of 270 MB that came a few steps after one)."""
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
        if state.step - state.checkpointed_step >= cfg.checkpoint_every:
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
    probs = predict_proba(plain_model(plan.model), plan.tokenizer, plan.valid.texts, plan.model_cfg.max_length,
                          runtime=plan.runtime)
    state.valid_probs[epoch + 1] = probs
    metrics = validation_metrics(plan.valid.labels, probs)
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
    # The validation probabilities of the weights the model ends with (the best epoch under early stopping, else the
    # last), when this process scored that epoch: the race reads them instead of predicting again.
    final_epoch = state.best["epoch"] if plan.cfg.early_stopping_patience else epochs_run
    if final_epoch in state.valid_probs:
        extra["validation_probs"] = state.valid_probs[final_epoch]
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


def head_forward(model, features: torch.Tensor) -> torch.Tensor:
    """The head on cached features, the same computation the trained model does (tasks/models.py classifier_logits):
    pooler + dropout + classifier on [CLS] states, or dropout + classifier on the layers' mean."""
    if head_input(model) == "layer_mean":
        return model.classifier(getattr(model, "dropout", torch.nn.Identity())(features))
    pooler = getattr(model.base_model, "pooler", None)
    pooled = pooler.activation(pooler.dense(features)) if pooler is not None else features
    dropout = getattr(model, "dropout", torch.nn.Identity())
    return model.classifier(dropout(pooled))


def fit_linear_head(model, features: torch.Tensor, labels: np.ndarray, weights: np.ndarray, n_classes: int,
                    class_weights: str = "balanced") -> None:
    """The classifier (one linear layer on the layers' mean) set to a row-weighted L2 logistic regression on the
    features, class-balanced unless `class_weights` (train.class_weights) is "none", solved to its optimum
    (tasks/baselines.py balanced_logistic_regression, what evaluate's frozen-encoder baseline fits). AdamW epochs
    from a random start, as the pooler head trains, scored 0.017 to 0.153 lower cross-fitted macro-F1 than the
    solved fit on 5 of 6 datasets (0.015 higher on one).
    A class no training row has gets a zero row and a bias of -1e4 (a probability of 0 at any temperature); rows of
    a single class, nothing to regress, give that class alone."""
    from tasks.baselines import balanced_logistic_regression, softmax_coefficients

    seen = np.unique(labels)
    if len(seen) < 2:
        coef, intercept = np.zeros((1, features.shape[1])), np.zeros(1)
    else:
        regression = balanced_logistic_regression()
        if class_weights == "none":
            regression.set_params(class_weight=None)
        regression.fit(features.float().numpy(), labels, sample_weight=weights)
        coef, intercept = softmax_coefficients(regression)
        seen = regression.classes_
    weight, bias = torch.zeros(n_classes, coef.shape[1]), torch.full((n_classes,), -1e4)
    seen = torch.as_tensor(seen, dtype=torch.long)
    weight[seen] = torch.as_tensor(coef, dtype=torch.float32)
    bias[seen] = torch.as_tensor(intercept, dtype=torch.float32)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)


def train_head(model, tokenizer, base, labels, train, valid, cfg, model_cfg, runtime, cache_dir, reason,
               progress, what: str = "feature extraction", reads: str = "layer_mean") -> FinetuneResult:
    """The head fitted on the frozen encoder's cached features: feature_extraction's model, a linear classifier on
    the layers' mean (`reads` "layer_mean", where the classifier is linear; else as "pooler"), or LP-FT's starting
    point, the pooler + classifier on the [CLS] state that fine-tuning goes on from ("pooler"); `what` names which in
    the log."""
    started = time.perf_counter()
    if reads == "layer_mean" and not classifier_over_hidden_states(model):
        reads = "pooler"
    setattr(model.config, HEAD_INPUT_KEY, None if reads == "pooler" else reads)
    # The frozen encoder's features, from the per-text cache the shift stage filled in the same pass as its mean
    # embeddings (pooled_embeddings, at the same precision): only texts not embedded yet run here.
    pooling = "cls" if reads == "pooler" else reads
    both = pooled_embeddings(base, train.texts + valid.texts, model_cfg.max_length, pooling, cache_dir, runtime=runtime)
    features, valid_features = both[: len(train.texts)], both[len(train.texts):]
    initial = [copy.deepcopy(m.state_dict()) for m in head_modules(model)]  # cross-fitting starts each fold here
    fit = solved_head if reads == "layer_mean" else epoch_head
    log, best, epochs_run = fit(model, train, valid, features, valid_features, cfg, len(labels))
    if progress:
        fitted = (f"a logistic regression on the layers' mean, validation macro-F1 {best['macro_f1']:.3f}"
                  if reads == "layer_mean" else
                  f"{epochs_run} head epochs, best validation macro-F1 {best['macro_f1']:.3f} at epoch {best['epoch']}")
        print(f"finetune: {what}, {fitted}", flush=True)
    seconds = time.perf_counter() - started
    return FinetuneResult(
        model=model, tokenizer=tokenizer, strategy="feature_extraction", reason=reason, runtime=runtime, log=log,
        metrics={"validation": best["metrics"]}, epochs_run=epochs_run, best_epoch=best["epoch"],
        resumed_from_step=None, train_seconds=seconds, samples_per_second=len(train.texts) * epochs_run / max(seconds, 1e-9),
        extra={"world_size": 1, "head_features": (features, valid_features),
               "head_initial": initial},
    )


def epoch_head(model, train, valid, features, valid_features, cfg, n_classes: int) -> tuple[list, dict, int]:
    """train_head's fit of the pooler + classifier on the [CLS] state: `head_epochs` of AdamW with early stopping on
    validation macro-F1, the best epoch's head kept: (log, best, epochs run)."""
    optimizer, loss_fn = head_optimiser(model, train, n_classes, cfg)
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
    return log, best, epochs_run


def solved_head(model, train, valid, features, valid_features, cfg, n_classes: int) -> tuple[list, dict, int]:
    """train_head's fit on the layers' mean: the linear classifier solved in one fit (fit_linear_head), the encoder
    frozen; reported as one epoch: (log, best, epochs run) as epoch_head reports them."""
    started = time.perf_counter()
    for p in model.parameters():
        p.requires_grad = False
    model.cpu()
    fit_linear_head(model, features, train.labels, train.weights, n_classes, cfg.class_weights)
    model.eval()
    with torch.no_grad():
        metrics = validation_metrics(valid.labels, head_forward(model, valid_features))
        weights = torch.tensor(train.weights)
        rows_loss = torch.nn.functional.cross_entropy(head_forward(model, features), torch.tensor(train.labels),
                                                      reduction="none")
        loss = float((rows_loss * weights).sum() / weights.sum())
    log = [{"step": 1, "epoch": 1, "loss": loss, "learning_rate": 0.0,
            "samples_per_second": len(train.texts) / max(time.perf_counter() - started, 1e-9)}]
    return log, {"macro_f1": metrics["macro_f1"], "epoch": 1, "metrics": metrics}, 1


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
