"""The reports stages hand each other, typed: ingest's, validate's, shift's, finetune's, the evaluation
(reports/evaluate.json), the gate's verdict (paths.verdict), the decision on it (paths.decision), package's, the run's
record (paths.run_record) and shift-watch's.

One pair of functions writes and reads them (`write_report`, `read_report`), validating on both sides, so readers
use attributes instead of spelling chains of keys, and a file that does not fit its model is refused with the
file's name and the field. The JSON keeps the keys and nesting that `dvc metrics show` and `dvc exp show` read:
what is keyed by a name from the data or the run (models, splits, groups, labels, metrics) stays a mapping. The
stage reports (`OrderedPart`) are written with their keys in the order the stage gave them, typed or not, so the
file is byte for byte the one the stage wrote before its keys were typed.

`BootstrapKey` is the one place that builds and parses the name of a bootstrap statistic
(`split|model|scope|metric`, a column of the bootstrap table; `scope|metric` names a comparison in evaluate.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_serializer,
                      model_validator)

from tasks.errors import ReportError
from tasks.files import write_json

PASS, FAIL, INCONCLUSIVE, NOT_APPLICABLE = "PASS", "FAIL", "INCONCLUSIVE", "N/A"
VerdictName = Literal["PASS", "FAIL", "INCONCLUSIVE"]
Status = Literal["PASS", "FAIL", "INCONCLUSIVE", "N/A"]

# [low, high]; an end is None where the statistic does not exist (no rows, no resamples).
Interval = Annotated[list[float | None], Field(min_length=2, max_length=2)]


def no_interval() -> list[float | None]:
    return [None, None]


# ----------------------------------------------------------------------------- bootstrap statistics

OVERALL = "overall"
GAP_PREFIX = "gap:"
KEY_SEPARATOR = "|"


class BootstrapKey(NamedTuple):
    """Which statistic a set of bootstrap resamples belongs to."""

    split: str
    model: str   # a model, or a pair "a-b" (see `pair_name`): a minus b, resample by resample
    scope: str   # "overall", "<column>=<group>" for one group, or "<column>" for the gap between its groups
    metric: str  # "accuracy" or "macro_f1"; "gap:<metric>" when the scope is a column

    @classmethod
    def overall(cls, split: str, model: str, metric: str) -> BootstrapKey:
        return cls(split, model, OVERALL, metric)

    @classmethod
    def of_group(cls, split: str, model: str, column: str, group: str, metric: str) -> BootstrapKey:
        return cls(split, model, f"{column}={group}", metric)

    @classmethod
    def gap(cls, split: str, model: str, column: str, metric: str) -> BootstrapKey:
        """The largest difference of `metric` between the column's judged groups."""
        return cls(split, model, column, f"{GAP_PREFIX}{metric}")

    @classmethod
    def from_str(cls, text: str) -> BootstrapKey:
        parts = text.split(KEY_SEPARATOR)
        if len(parts) != len(cls._fields):
            raise ValueError(f"{text!r} is not a bootstrap key (split|model|scope|metric)")
        return cls(*parts)

    def to_str(self) -> str:
        """The column name in the bootstrap table (group names never hold the separator: evaluate replaces it)."""
        return KEY_SEPARATOR.join(self)

    @property
    def comparison_name(self) -> str:
        """The key of this statistic under its pair in a split's `comparisons`."""
        return f"{self.scope}{KEY_SEPARATOR}{self.metric}"

    @property
    def pair(self) -> tuple[str, str] | None:
        """(a, b) when this is the paired difference a - b, else None."""
        reference, dash, other = self.model.partition("-")
        return (reference, other) if dash else None

    @property
    def group(self) -> tuple[str, str] | None:
        """(column, group) when the scope is one group, else None."""
        column, equals, group = self.scope.partition("=")
        return (column, group) if equals else None

    @property
    def gap_metric(self) -> str | None:
        """The metric whose between-group gap this is, or None when it is not a gap."""
        return self.metric.removeprefix(GAP_PREFIX) if self.metric.startswith(GAP_PREFIX) else None

    def for_model(self, model: str) -> BootstrapKey:
        return self._replace(model=model)


def pair_name(reference: str, other: str) -> str:
    """The model part of a paired difference's key: reference minus other."""
    return f"{reference}-{other}"


# ----------------------------------------------------------------------------- the evaluation


class ReportPart(BaseModel):
    """Keys a reader does not use are kept as they are (so a round trip loses nothing); those it uses are typed."""

    model_config = ConfigDict(extra="allow")


class Comparison(ReportPart):
    """Model a minus model b on one statistic, with its paired bootstrap interval."""

    estimate: float | None
    interval: Interval


# pair ("candidate-champion") -> comparison name ("overall|macro_f1", "condition=A|accuracy", "condition|gap:accuracy")
Comparisons = dict[str, dict[str, Comparison]]


class ClassMetrics(ReportPart):
    precision: float | None
    recall: float | None
    f1: float | None
    support: int
    selection_rate: float | None


class OverallMetrics(ReportPart):
    """One model on a whole split."""

    n: int
    accuracy: float | None
    macro_f1: float | None
    ece: float | None
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]
    intervals: dict[str, Interval]  # accuracy, macro_f1 and ece (bootstrap), accuracy_wilson

    def metric(self, name: str) -> float | None:
        return getattr(self, name)


class GroupMetrics(ReportPart):
    """One model on the rows of one group."""

    n: int
    eligible: bool  # large enough to be judged on its own
    merged: bool    # the "other" group that rare groups were merged into
    accuracy: float | None
    macro_f1: float | None
    recall: dict[str, float | None]
    selection_rate: dict[str, float | None]
    intervals: dict[str, Interval]  # accuracy and macro_f1 (bootstrap); accuracy_wilson for a small group

    def metric(self, name: str) -> float | None:
        return getattr(self, name)

    def judged_interval(self, metric: str) -> list[float | None]:
        """The interval the gate uses: Wilson for a small group's accuracy, else the bootstrap."""
        return self.intervals.get(f"{metric}_wilson") or self.intervals.get(metric) or no_interval()


class Disparity(ReportPart):
    """Between the judged groups of one column: largest gap, smallest ratio, worst group."""

    groups: int
    gap: float | None
    ratio: float | None
    worst_group: str | None
    worst_value: float | None
    gap_interval: Interval


class GroupBreakdown(ReportPart):
    """One model on every group of one column."""

    groups: dict[str, GroupMetrics]
    disparity: dict[str, Disparity]  # by metric


class ModelResult(ReportPart):
    overall: OverallMetrics
    groups: dict[str, GroupBreakdown]  # by group column


class GroupColumnInfo(ReportPart):
    sizes: dict[str, int]
    eligible: list[str]
    merged_into_other: dict[str, int]
    min_group_size: int


class SplitReport(ReportPart):
    """Every model on one holdout split."""

    n: int
    models: dict[str, ModelResult]
    comparisons: Comparisons
    group_columns: dict[str, GroupColumnInfo]
    missing_group_columns: list[str]

    def comparison(self, key: BootstrapKey) -> Comparison | None:
        return self.comparisons.get(key.model, {}).get(key.comparison_name)

    def configured_columns(self) -> list[str]:
        """Every group column the configuration asked for, present in the data or not."""
        return list(self.group_columns) + list(self.missing_group_columns)


class WeightedOverall(ReportPart):
    accuracy: float | None
    macro_f1: float | None
    intervals: dict[str, Interval]

    def metric(self, name: str) -> float | None:
        return getattr(self, name)


class WeightedModelResult(ReportPart):
    overall: WeightedOverall


class WeightedSplit(ReportPart):
    """The source holdout weighted by the shift stage's importance weights, to look like the target."""

    split: str
    rows_without_weight: int = 0
    n: int
    effective_sample_size: float
    models: dict[str, WeightedModelResult]
    comparisons: Comparisons

    def comparison(self, key: BootstrapKey) -> Comparison | None:
        return self.comparisons.get(key.model, {}).get(key.comparison_name)


class WeightedUnavailable(ReportPart):
    """Why there is no weighted evaluation (no importance weights, or none for these rows)."""

    split: str
    problem: str


class TransferGain(ReportPart):
    """Candidate minus TF-IDF on target_holdout."""

    metric: str
    estimate: float | None
    interval: Interval
    negative_transfer: bool | None  # the whole interval below zero; None without the comparison
    below_zero: bool | None = None


class EvaluateReport(ReportPart):
    """reports/evaluate.json."""

    stage: Literal["evaluate"] = "evaluate"
    labels: list[str]
    champion: str | None  # the production model's folder, None when there is none
    models: dict[str, str | None]  # what each model is, in words
    bootstrap: int
    confidence: float
    splits: dict[str, SplitReport]
    transfer_gain: TransferGain
    weighted: WeightedSplit | WeightedUnavailable
    bootstrap_file: str
    plots: list[str] = Field(default_factory=list)

    def comparison(self, key: BootstrapKey) -> Comparison | None:
        """A comparison on one of the holdout splits; None when the split or the comparison is missing."""
        split = self.splits.get(key.split)
        return None if split is None else split.comparison(key)


# ----------------------------------------------------------------------------- the verdict and the decision


class Check(ReportPart):
    """One criterion of the gate: is `value` on the right side of `threshold`?"""

    name: str
    status: Status
    value: float | None = None
    interval: Interval = Field(default_factory=no_interval)
    threshold: float | None = None
    direction: Literal[">=", "<="] = ">="  # ">=": higher is better; "<=": lower is better
    margin: float | None = None  # how far the interval's worse bound is on the good side (negative: short)
    p_meets: float | None = None
    p_violates: float | None = None
    detail: str = ""


class InsufficientGroup(ReportPart):
    """A group too small to be judged on its own."""

    column: str
    group: str
    n: int
    detail: str


class Verdict(ReportPart):
    """The gate's verdict (paths.verdict): written once per run, never changed; its sha256 names it."""

    stage: Literal["gate"] = "gate"
    verdict: VerdictName
    champion: bool
    criteria: list[Check]
    failed: list[str]
    inconclusive: list[str]
    insufficient_data: list[InsufficientGroup]
    notes: list[str]


class Decision(ReportPart):
    """What became of one verdict (paths.decision), and who decided."""

    verdict: VerdictName
    verdict_sha256: str
    approved: bool
    by: str
    reason: str
    undecided: list[str]
    at: str  # ISO 8601, UTC


# ----------------------------------------------------------------------------- the finetune report


class OrderedPart(ReportPart):
    """A report part written with its keys in the order the stage gave them, typed or not, so typing a key that a
    reader uses does not move it in the file; an optional key the stage did not give (left at None) is not written."""

    _given: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_order(cls, data: Any, handler):
        part = handler(data)
        if isinstance(data, dict):
            part._given = tuple(data)
        return part

    @model_serializer(mode="wrap")
    def _in_given_order(self, handler) -> dict[str, Any]:
        dumped = handler(self)
        left_out = {name for name in type(self).model_fields
                    if name not in self.model_fields_set and dumped.get(name) is None}
        given = [key for key in self._given if key in dumped and key not in left_out]
        return {**{key: dumped[key] for key in given},
                **{key: value for key, value in dumped.items() if key not in given and key not in left_out}}


def validated_under(key: str, kind: type[BaseModel], value: Any, owner: BaseModel) -> BaseModel:
    """`value` (the `key` of `owner`, checked by `owner`'s own validator) as a `kind`; a misfit is said under `key`, as
    a declared field's would be."""
    try:
        return kind.model_validate(value)
    except ValidationError as exc:
        raise ValidationError.from_exception_data(type(owner).__name__, [
            {"type": error["type"], "loc": (key, *error["loc"]), "input": error["input"],
             **({"ctx": error["ctx"]} if "ctx" in error else {})} for error in exc.errors()]) from None


class CrossFitted(OrderedPart):
    """A cheap model scored on every labelled target row, out of fold."""

    rows: int
    macro_f1: float | None
    interval: Interval


PAIRED_PREFIX = "minus_"


class StrategyEvidence(OrderedPart):
    """One model that `auto` tried (tasks/strategy.py): its validation macro-F1 with its interval, and under the key
    `minus_<reference>` its paired difference from the reference model on the same rows."""

    model: str
    how: str
    validation_macro_f1: float | None
    interval: Interval
    seconds: float
    cross_fitted: CrossFitted | None = None

    @model_validator(mode="after")
    def _paired_differences_are_comparisons(self) -> StrategyEvidence:
        for key, value in (self.model_extra or {}).items():
            if key.startswith(PAIRED_PREFIX) and not isinstance(value, Comparison):
                self.model_extra[key] = validated_under(key, Comparison, value, self)
        return self

    @property
    def paired(self) -> tuple[str, Comparison] | None:
        """(reference, this model minus the reference), or None without a paired difference."""
        return next(((key.removeprefix(PAIRED_PREFIX), value) for key, value in (self.model_extra or {}).items()
                     if key.startswith(PAIRED_PREFIX)), None)


class LadderStep(OrderedPart):
    """One step up auto's evidence ladder (tasks/served_choice.py `evidence_ladder`): from a model to a costlier one."""

    model_config = ConfigDict(extra="allow", validate_by_name=True, serialize_by_alias=True)

    below: str = Field(alias="from")
    to: str
    rows: int
    difference: float | None
    interval: Interval
    taken: bool


class EvidenceLadder(OrderedPart):
    served: str
    confidence: float
    steps: list[LadderStep]


class ServedChoice(OrderedPart):
    """How the served model was chosen (tasks/served_choice.py `served_model`): the encoder, the lexical companion's
    weight in the pool, and in words what is served."""

    encoder: str
    weight: float
    served_as: str
    evidence_ladder: EvidenceLadder | None = None


class ServedSummary(OrderedPart):
    """What the candidate serves, and whether the evidence chose a cheap model over adaptation (auto only)."""

    encoder: str
    lexical_weight: float
    cheap: bool
    served_as: str


class Calibration(OrderedPart):
    """The served encoder's temperature (tasks/calibration.py): with the validation ECE before and after, or with a
    note saying why it was not fitted."""

    temperature: float
    validation_rows: int | None = None
    validation_ece_before: float | None = None
    validation_ece_after: float | None = None
    method: str | None = None
    note: str | None = None


class FinetuneReport(OrderedPart):
    """reports/finetune.json: what trained and why, what is served, on which rows, on what hardware, how it scored on
    the validation rows held out of target_train."""

    stage: Literal["finetune"] = "finetune"
    strategy: str
    reason: str
    strategy_evidence: list[StrategyEvidence]  # empty when the strategy was configured or chosen by rule
    negative_transfer_predicted: bool | None
    served_model: ServedSummary
    base_model: str
    init: str
    model_dir: str
    device: str
    precision: str
    hardware: str
    threads: int
    processes: int
    train_rows: int
    validation_rows: int
    epochs_run: int
    best_epoch: int
    resumed_from_step: int | None
    train_seconds: float
    samples_per_second: float
    validation: dict[str, float]  # by metric
    calibration: Calibration
    lexical_companion: ServedChoice
    data_md5: dict[str, str]  # by split, as DVC records it


# ----------------------------------------------------------------------------- the shift report

ShiftVerdictName = Literal["none", "moderate", "severe"]


class LabelPriors(OrderedPart):
    """The label-shift test's class priors: the source's, the labelled target's, and the target's estimated from
    unlabelled rows with its 95% interval, or a note saying why there is no estimate."""

    labels: list[str]
    source_prior: list[float]
    labelled_target_prior: list[float] | None = None
    estimated_target_prior: list[float] | None = None
    estimated_interval_95: list[list[float]] | None = None  # [lows, highs], one per label
    note: str | None = None


LABEL_SHIFT = "label_shift"


class ShiftTest(OrderedPart):
    """One two-sample test (tasks/shift.py `TestResult`): its effect against the source-vs-source null cut-off. A
    statistic that is not finite is None."""

    name: str  # "mmd", "classifier", "label_shift", ..., "group_mix:<column>"
    statistic: float | None
    p_value: float | None
    effect: float | None
    effect_name: str
    detail: dict[str, Any]  # by test; the label-shift test's is `priors`
    cutoff: float | None
    flagged: bool
    severe: bool

    @model_validator(mode="after")
    def _label_priors_fit(self) -> ShiftTest:
        if self.name == LABEL_SHIFT:
            validated_under("detail", LabelPriors, self.detail, self)
        return self

    @property
    def priors(self) -> LabelPriors | None:
        """The class priors, for the label-shift test; None for every other test."""
        return LabelPriors.model_validate(self.detail) if self.name == LABEL_SHIFT else None


class ShiftAnalysis(OrderedPart):
    """Source against target (tasks/shift.py `analyse_shift`, its per-row arrays left out): the verdict, why, and
    every test. What the shift stage, `regraft shift` and shift-watch report."""

    verdict: ShiftVerdictName
    reasons: list[str]
    alpha: float
    tests: list[ShiftTest]
    null_cutoffs: dict[str, float]  # by test
    n_source: int
    n_target: int
    most_target_specific: list[dict[str, Any]]  # text, target_score, label

    def test(self, name: str) -> ShiftTest | None:
        return next((test for test in self.tests if test.name == name), None)


class ShiftReport(ShiftAnalysis):
    """reports/shift.json: the analysis, its plots, and what the stage did about a severe shift."""

    stage: Literal["shift"] = "shift"
    on_severe: Literal["warn", "block"]
    plots: list[str]


# ----------------------------------------------------------------------------- the validation report


class ExpectationResult(OrderedPart):
    """One expectation on one split (tasks/validate.py `describe_result`), with a sentence a person can act on."""

    split: str
    expectation: str  # the GX expectation type
    column: str | list[str] | None  # a column, or the columns of a compound expectation
    kwargs: dict[str, Any]
    success: bool
    observed: Any
    unexpected_count: int | None
    unexpected_percent: float | None
    examples: list[Any]
    input_column: str | None  # the data's own column behind a derived one (a text's hash, its length)
    message: str
    error: str | None = None  # why the expectation could not run


class SplitValidation(OrderedPart):
    rows: int
    success: bool
    failed: int
    expectations: int


class ValidateReport(OrderedPart):
    """reports/validate.json (and `regraft validate FILE`): every expectation on every split, the failures in words."""

    stage: Literal["validate"] = "validate"
    success: bool
    splits: dict[str, SplitValidation]
    failures: list[str]
    data_docs: str
    expectations: list[ExpectationResult]
    columns: dict[str, Any] | None = None  # `regraft validate FILE`: which columns were read as what, and from where

    @property
    def expectation_count(self) -> int:
        return sum(split.expectations for split in self.splits.values())


# ----------------------------------------------------------------------------- shift-watch's report


class MethodEstimate(OrderedPart):
    """One label-free estimator's accuracy and macro-F1 on the traffic (tasks/estimate.py `MethodEstimate`)."""

    method: str
    accuracy: float | None
    accuracy_interval: Interval
    macro_f1: float | None
    macro_f1_interval: Interval
    detail: dict[str, Any]


class PointAndInterval(OrderedPart):
    """A statistic's estimate and its interval."""

    estimate: float | None
    interval: Interval


class CombinedEstimate(PointAndInterval):
    """The label-free estimators together (tasks/estimate.py `combine`)."""

    methods_agree: bool


class PerformanceDrop(OrderedPart):
    """Has the model got worse than validated by more than monitor.max_drop (tasks/estimate.py `performance_drop`)."""

    metric: str
    validated: float
    estimated: float | None
    interval: Interval
    drop: float | None
    max_drop: float
    degraded: bool


class PerformanceEstimate(OrderedPart):
    """A model's label-free estimated performance on texts without labels (tasks/estimate.py `estimate_performance`)."""

    verdict: Literal["ESTIMATED", "INCONCLUSIVE"]
    confidence: float
    target_rows: int
    validated: dict[str, Any]  # accuracy, macro_f1 and their intervals on the holdout rows; rows
    methods: dict[str, MethodEstimate]
    estimate: dict[str, CombinedEstimate]  # by metric
    notes: list[str]


class ServedPerformance(PerformanceEstimate):
    """The production model's estimated performance on served texts (tasks/monitoring.py `served_performance`)."""

    validation: dict[str, int]  # holdout rows learned from, by split
    drop: PerformanceDrop
    window: dict[str, str]  # from, to: the served time span


class ShiftWatchReport(ShiftAnalysis):
    """reports/shift-watch.json: the production model's training data against the latest served texts, and its
    estimated performance on them."""

    stage: Literal["shift-watch"] = "shift-watch"
    production_model: str
    served_rows: int
    log: str
    performance: ServedPerformance


# ----------------------------------------------------------------------------- the shadow comparison


class Agreement(OrderedPart):
    share: float
    agreeing: int
    interval: Interval  # Wilson


class MeasuredPerformance(OrderedPart):
    """Realized metrics on labelled rows (tasks/estimate.py `measured_performance`)."""

    accuracy: float
    macro_f1: float
    rows: int
    accuracy_interval: Interval  # Wilson


class PairedDifference(PointAndInterval):
    """The candidate minus production on one metric, with its paired interval."""


class MetricDifferences(OrderedPart):
    """Both metrics' differences (an estimated one also keeps each estimator's, under `methods`)."""

    accuracy: PairedDifference
    macro_f1: PairedDifference


class ShadowDifference(OrderedPart):
    metric: str  # the one the verdict reads
    basis: Literal["estimated", "realized"] | None  # which difference decided
    estimated: MetricDifferences | None
    realized: MetricDifferences | None


class GroupComparison(OrderedPart):
    """A shadow's or canary's comparison on the texts of one group value (tasks/shadow.py `compare_by_group`)."""

    rows: int
    agreement: Agreement
    estimated: dict[str, PerformanceEstimate] | None  # by role; from monitor.min_shadow_rows rows with a holdout
    realized: dict[str, MeasuredPerformance] | None  # by role, on the labelled texts


class ShadowReport(OrderedPart):
    """reports/shadow.json (`regraft shadow`): the shadow candidate against production on the texts both predicted
    (tasks/shadow.py `compare_shadow`), and the three-way verdict."""

    stage: Literal["shadow", "canary"] = "shadow"  # a canary is judged the same way (tasks/shadow.py canary_report)
    production_model: str
    candidate: str
    since: str
    logs: dict[str, str]  # production, shadow
    served: dict[str, int]  # served, joined, without_shadow
    rows: int
    labels: list[str]
    confidence: float
    max_drop: float
    min_rows: int
    notes: list[str]
    agreement: Agreement | None
    confusion: list[list[int]] | None  # rows: production's label; columns: the candidate's
    estimated: dict[str, PerformanceEstimate] | None  # by role
    realized: dict[str, MeasuredPerformance] | None  # by role
    difference: ShadowDifference
    verdict: str
    reason: str
    groups: dict[str, dict[str, GroupComparison]] | None = None  # group column -> value -> comparison


# ----------------------------------------------------------------------------- the run's record


class RunRecord(OrderedPart):
    """paths.run_record: this run's id, its overrides and every parameter in force (params.yaml as the run used it)."""

    run_id: str
    overrides: dict[str, Any]
    params: dict[str, Any]


# ----------------------------------------------------------------------------- the ingest and package reports


class SplitSummary(OrderedPart):
    """One split as ingest wrote it."""

    rows: int
    labels: dict[str, int]  # rows by label
    time_range: list[str] | None  # [first day, last day], None without timestamps
    groups: dict[str, int]  # distinct values by group column


class IngestReport(OrderedPart):
    """reports/ingest.json: what came in (files with sha256, the split rule) and what went into each split."""

    stage: Literal["ingest"] = "ingest"
    inputs: list[dict[str, Any]]
    split: dict[str, Any]  # the split rule as configured (ingest.split)
    duplicates_dropped: int
    texts_in_both_domains: int
    splits: dict[str, SplitSummary]


class SmokeTest(OrderedPart):
    """The built Bento served for real: on which URL, how many texts, how long (tasks/packaging.py `smoke_test`)."""

    url: str
    examples: int
    mismatches: int
    model_version: str
    seconds: float


class Lineage(OrderedPart):
    """Where the packaged model came from (tasks/packaging.py `lineage`); the keys no report reader uses stay open."""

    data_md5: dict[str, str | None]
    git_commit: str | None


class PackageReport(OrderedPart):
    """reports/package.json: the packaged model and its Bento, the smoke test, the export and how to promote it."""

    stage: Literal["package"] = "package"
    model: str  # the tag in the BentoML model store
    bento: str
    verdict: VerdictName
    smoke_test: SmokeTest
    registry: str
    remote: dict[str, Any] | None  # the archives exported to the shared remote; None without one
    lineage: Lineage
    promote: str  # the command that promotes it


# ----------------------------------------------------------------------------- writing and reading

ReportModel = TypeVar("ReportModel", bound=BaseModel)
SHOWN_MISMATCHES = 5


def write_report(path: Path, report: BaseModel) -> None:
    """Check the report against its model (attribute assignments are not checked when made), then write it
    atomically as JSON."""
    # Serialising a misfit warns; it is refused just below, with the file and the field named.
    checked = parse_report(type(report), report.model_dump(warnings=False), str(path))
    # Python mode keeps NaN a float, written as the JSON readers have always read.
    write_json(path, checked.model_dump())


def read_report(path: Path, kind: type[ReportModel]) -> ReportModel:
    """The report at `path` as a `kind`; missing, unreadable or not fitting the model is a ReportError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from None
    return parse_report(kind, data, str(path))


def parse_report(kind: type[ReportModel], data: Any, source: str) -> ReportModel:
    """`data` (a report as JSON gives it) as a `kind`, or a ReportError naming `source` and each field that does not
    fit. For a report already read as plain JSON; files go through `read_report`."""
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        problems = [mismatch_text(error) for error in exc.errors()]
        more = f"; and {len(problems) - SHOWN_MISMATCHES} more" if len(problems) > SHOWN_MISMATCHES else ""
        raise ReportError(f"{source}: not a valid {kind.__name__}: "
                          + "; ".join(problems[:SHOWN_MISMATCHES]) + more) from None


def mismatch_text(error: dict) -> str:
    """One field that does not fit, as `splits.target_holdout.n: Input should be a valid integer (got 'ten')`."""
    field = ".".join(str(part) for part in error["loc"]) or "the whole report"
    given = error.get("input")
    shown = (f" (got {given!r})" if error["type"] != "missing" and isinstance(given, str | int | float | bool)
             else "")
    return f"{field}: {error['msg']}{shown}"
