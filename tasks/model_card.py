"""The model card (README.md in Hugging Face conventions) from one function: the finetune stage starts it with what
training knows, the package stage completes it with the evaluation, the gate's verdict and the lineage."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.config import Params
from tasks.render import calibration_text, evidence_text, interval_text, ladder_text
from tasks.reports import Decision, EvaluateReport, FinetuneReport, GroupMetrics, ModelResult, Verdict

METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Packaged:
    """What the package stage adds: the name in the model store, reports/evaluate.json (None without one), the
    verdict, the decision on it, and the lineage (tasks/packaging.py `lineage`)."""

    model_name: str
    evaluation: EvaluateReport | None
    verdict: Verdict
    decision: Decision
    origin: dict
    serving: dict | None = None  # the checked serving precision (tasks/variants.py check_variants)


def model_card(params: Params, finetune: FinetuneReport | None, packaged: Packaged | None = None) -> str:
    """The card of the model that reports/finetune.json describes: front matter with a model-index, then what, from
    what, why this strategy, how it trained, data and parameters; with `packaged`, also the target holdout, the
    groups, the gate and the lineage."""
    from huggingface_hub import ModelCardData

    base, strategy = (finetune.base_model, finetune.strategy) if finetune else ("not recorded", "unknown")
    results = validation_results(finetune) + (holdout_results(packaged.evaluation) if packaged else [])
    data = ModelCardData(base_model=base if HUB_ID.fullmatch(base) and not Path(base).exists() else None,
                         library_name="transformers", pipeline_tag="text-classification",
                         tags=["regraft", "text-classification", strategy],
                         model_name=packaged.model_name if packaged else "regraft-candidate",
                         eval_results=results or None)
    gate = ""
    if packaged:
        verdict, decision = packaged.verdict.verdict, packaged.decision
        approved = (f", approved by {decision.by}: {decision.reason}"
                    if decision.approved and verdict != "PASS" else "")
        gate = f",\npackaged after the gate said **{verdict}**{approved}"
    lines = [
        f"# {packaged.model_name if packaged else 'regraft candidate model'}", "",
        f"A text classifier over {params.ingest.labels}, adapted from `{base}` by regraft's `{strategy}` "
        f"strategy{gate}.",
        "", *strategy_section(finetune), "", *training_section(params, finetune, packaged is None), "",
        *(evaluation_sections(packaged) if packaged else []),
        "## Data (md5 as recorded by DVC)", "",
        *([f"- `{name}`: `{digest}`" for name, digest in (finetune.data_md5 if finetune else {}).items()]
          or ["- not recorded"]), "",
        *(lineage_section(packaged.origin) if packaged else []),
        *(serving_section(packaged.serving) if packaged and packaged.serving else []),
        "## Parameters", "", "```json",
        json.dumps({"model": params.model.model_dump(mode="json"), "train": params.train.model_dump(mode="json")},
                   indent=2),
        "```", "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def strategy_section(finetune: FinetuneReport | None) -> list[str]:
    """Why this strategy: the reason, auto's evidence with its intervals, what is served and the evidence ladder."""
    lexical = finetune.lexical_companion if finetune else None
    ladder = ladder_text(lexical.evidence_ladder if lexical else None)
    return ["## Why this strategy", "", (finetune.reason if finetune else "") or "not recorded", "",
            *([f"- {evidence_text(row)}" for row in (finetune.strategy_evidence if finetune else [])]
              or ["- (no trials: the strategy was configured or chosen by rule)"]), "",
            f"Served as: {lexical.served_as if lexical else 'not recorded'}." + (f" {ladder}." if ladder else "")]


def training_section(params: Params, finetune: FinetuneReport | None, before_evaluation: bool) -> list[str]:
    """How it trained: on which rows, on what hardware, how many epochs, its validation metrics and calibration."""
    if finetune is None:
        return ["## Training", "", "- not recorded: no finetune report"]
    calibration = finetune.calibration
    mix = "target only" if params.train.data == "target" else f"target weight {params.train.target_weight}"
    return [
        "## Training", "",
        f"- Trained on: {params.train.data} ({mix}); {finetune.train_rows} train rows, "
        f"{finetune.validation_rows} validation rows",
        f"- Hardware: {finetune.hardware}; precision {finetune.precision}; {finetune.threads} "
        f"threads; {finetune.processes} process(es)",
        f"- Epochs run: {finetune.epochs_run} (best validation epoch: {finetune.best_epoch})"
        + ("; where the classifier is one linear layer (BERT's), the head is a logistic regression on the mean over "
           "the encoder's layers of each layer's token mean, solved in one fit (config.json `regraft_head_input: "
           "layer_mean`): regraft computes it, a plain transformers pipeline would run the pooler on [CLS] instead"
           if finetune.strategy == "feature_extraction" else ""),
        "- Validation (held out of target_train): "
        + (", ".join(f"{k} {v:.3f}" for k, v in finetune.validation.items()) or "-"),
        f"- Calibration ({calibration.method or 'temperature scaling'}): {calibration_text(calibration)}",
        *([f"- Test metrics: see the evaluate stage's report ({params.report_file('evaluate')}) when it exists; the "
           "packaged model's card adds them."] if before_evaluation else []),
    ]


def validation_results(finetune: FinetuneReport | None) -> list:
    """model-index entries for the validation rows held out of target_train."""
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="text-classification", dataset_type="regraft", dataset_name="target validation split",
                       dataset_split="validation", metric_type=metric, metric_name=METRIC_NAMES.get(metric, metric),
                       metric_value=round(float(value), 4))
            for metric, value in (finetune.validation if finetune else {}).items()]


def holdout_results(evaluation: EvaluateReport | None) -> list:
    """model-index entries for the candidate on the target holdout: accuracy and macro-F1, and each group's macro-F1."""
    from huggingface_hub import EvalResult

    candidate = holdout_models(evaluation).get("candidate")
    if not candidate:
        return []
    results = [EvalResult(task_type="text-classification", dataset_type="regraft", dataset_name="target holdout",
                          dataset_split="target_holdout", metric_type=metric, metric_name=METRIC_NAMES[metric],
                          metric_value=round(float(candidate.overall.metric(metric)), 4))
               for metric in ("accuracy", "macro_f1")]
    for column, value, group in holdout_groups(candidate):
        results.append(EvalResult(task_type="text-classification", dataset_type="regraft",
                                  dataset_name=f"target holdout, {column} = {value}", dataset_split="target_holdout",
                                  dataset_config=f"{column}={value}", metric_type="macro_f1", metric_name="macro-F1",
                                  metric_value=round(float(group.macro_f1), 4)))
    return results


def holdout_models(evaluation: EvaluateReport | None) -> dict[str, ModelResult]:
    """Every model's results on the target holdout, by name; none without an evaluation report."""
    split = evaluation.splits.get("target_holdout") if evaluation else None
    return split.models if split else {}


def holdout_groups(candidate: ModelResult | None) -> list[tuple[str, str, GroupMetrics]]:
    """(column, value, metrics) of every group the candidate has a macro-F1 for."""
    return [(column, value, group) for column, entry in (candidate.groups if candidate else {}).items()
            for value, group in entry.groups.items() if group.macro_f1 is not None]


def evaluation_sections(packaged: Packaged) -> list[str]:
    """The target holdout (every model, the transfer gain), the candidate per group, and the gate's criteria."""
    evaluation = packaged.evaluation
    models = holdout_models(evaluation)
    interval = f"{evaluation.confidence:.0%} interval" if evaluation else "interval"
    gain = evaluation.transfer_gain if evaluation else None
    return [
        "## Target holdout", "", f"| model | accuracy | macro-F1 ({interval}) |", "|---|---:|---|",
        *([f"| {name} | {model.overall.accuracy:.3f} | {model.overall.macro_f1:.3f} "
           f"{interval_text(model.overall.intervals.get('macro_f1'))} |"
           for name, model in models.items()] or ["| (no evaluation report) | | |"]), "",
        "Transfer gain (candidate minus TF-IDF + logistic regression, macro-F1): "
        + (f"{gain.estimate:+.3f} {interval_text(gain.interval, signed=True)}"
           if gain and gain.estimate is not None else "n/a") + ".", "",
        "## Per group (candidate, target holdout)", "", f"| group | n | accuracy | macro-F1 ({interval}) |",
        "|---|---:|---:|---|",
        *([f"| {column} = {value} | {group.n} | {group.accuracy:.3f} | {group.macro_f1:.3f} "
           f"{interval_text(group.intervals.get('macro_f1'))} |"
           for column, value, group in holdout_groups(models.get("candidate"))]
          or ["| (no groups) | | | |"]), "",
        "## Gate", "", "| criterion | status | value | interval |", "|---|---|---:|---|",
        *[f"| {c.name} | {c.status} | {'' if c.value is None else format(c.value, '.3f')} | "
          f"{interval_text(c.interval)} |" for c in packaged.verdict.criteria], "",
    ]


def serving_section(serving: dict) -> list[str]:
    """The precision it serves in, and each reduced-precision variant checked against fp32 on the target holdout."""
    rows = [f"| {name} | {v['agreement']:.1%} | {v['macro_f1_difference']:+.3f} {interval_text(v['interval'], signed=True)} "
            f"| {v['speedup']:.2f}x | {'yes' if v['faithful'] else 'no: ' + '; '.join(v['problems'])} |"
            for name, v in serving["variants"].items()]
    checked = (f" Checked on {serving['rows']} target-holdout texts on {serving['machine']}." if serving["rows"]
               else "")
    return ["## Serving precision", "", f"Served in **{serving['precision']}** where the serving machine runs it too "
            f"(else fp32): {serving['reason']}.{checked}",
            "", "| variant | agreement with fp32 | macro-F1 minus fp32 | speed vs fp32 | faithful |",
            "|---|---:|---|---:|---|", *(rows or ["| (none offered here) | | | | |"]), ""]


def lineage_section(origin: dict) -> list[str]:
    """The data the model learned from and was judged on (md5 from dvc.lock) and the git commit."""
    data = ", ".join(f"`{k}` {v}" for k, v in (origin.get("data_md5") or {}).items()) or "n/a"
    return ["## Lineage", "", f"Data md5 (DVC): {data}. Git commit: `{origin.get('git_commit') or 'none'}`.", ""]
