"""`train.strategy: auto`: the candidate chosen on evidence from target_train (never the holdouts), at every size of
target, gathered on the way to the final model rather than beside it:

- the cheap models, TF-IDF + logistic regression and feature_extraction (a head on the frozen encoder's cached
  features), cross-fitted: every labelled target row is scored by models fit on the source rows and the other
  folds, so their evidence rests on all the target rows (ten times the validation split) and none of it on a row
  the head early-stopped on;
- the adaptive strategies, lora and full: each trains its real schedule for `train.auto_race_epochs` epochs and
  pauses at its checkpoint, and is scored on the validation rows held out of target_train.

Each comes with a 95% bootstrap interval and its paired difference from the best cheap model on the same validation
rows: the uncertainty the choice is made under, written to reports/finetune.json and the model card. When the best
adaptive arm is clearly behind (the paired interval below zero) the candidate is the cheap model and no minute more
goes to adaptation; otherwise that arm finishes its schedule, and the finetune stage serves it only if, finished, it
beats the cheap model on the validation rows (tasks/served_choice.py `served_model`). There is no row floor: on few rows
the intervals are wide and say so, and the gate still judges the served model against both baselines.

A data-parallel run (train.nproc > 1) cannot race in one process: the rule on data size and the shift stage's
domain-classifier AUC decides there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config import ModelConfig, TrainConfig
from tasks.render import evidence_text, interval_text
from tasks.reports import ShiftReport, StrategyEvidence

CHEAP = ("tfidf", "feature_extraction")  # cheapest first: a tie keeps the cheaper model
ADAPTIVE = ("lora", "full")
NEGATIVE_TRANSFER = "negative transfer on this data: the pretrained encoder does not beat a lexical model"
FROZEN_IS_ENOUGH = "negative transfer on this data: fine-tuning does not beat the frozen encoder with its head"
# The race ranks the frozen head alone; the evidence ladder may still serve it pooled with the lexical model.
POOLED_IS_AHEAD = ("fine-tuning does not beat the cheap models on this data, but the frozen encoder pooled with the "
                   "lexical model clearly beats the lexical model alone on the cross-fitted target rows")
RACE_RANKED_LEXICAL_FIRST = "the race: the lexical model ahead of the frozen head alone"


@dataclass
class StrategyChoice:
    strategy: str
    reason: str
    evidence: list[dict] = field(default_factory=list)  # one row per model tried: macro-F1, interval, paired difference
    negative_transfer_predicted: bool | None = None
    trained: object | None = None  # the FinetuneResult of the chosen strategy when the race already finished it
    checkpoint_dir: Path | None = None  # where the chosen strategy trains (or resumes, after the race)
    cheap: object | None = None  # the frozen encoder with its head, for the stage's last comparison after the long fit
    cross_fitted: dict | None = None  # tasks.cross_fitting.cross_fitted_cheap's out-of-fold probabilities


def domain_auc(shift_report: ShiftReport | None) -> float | None:
    """The shift stage's domain-classifier AUC (source against target on the frozen embeddings), if it has one."""
    test = shift_report.test("classifier") if shift_report else None
    auc = test.statistic if test else None
    return auc if auc is not None and 0.0 <= auc <= 1.0 else None


def rule_based(cfg: TrainConfig, n_target: int, shift_report: ShiftReport | None) -> tuple[str, str]:
    """The configured strategy, or for `auto` in a data-parallel run (which cannot race) one picked from the data size
    and the shift evidence."""
    if cfg.strategy != "auto":
        return cfg.strategy, f"configured: train.strategy={cfg.strategy}"
    verdict = shift_report.verdict if shift_report else None
    if n_target >= cfg.auto_full_min_examples:
        return "full", (f"{n_target} labelled target examples >= {cfg.auto_full_min_examples}: "
                        "enough to adapt every layer")
    few = f"{n_target} labelled target examples < {cfg.auto_full_min_examples}"
    auc = domain_auc(shift_report)
    # An effect size, not the test's severity: severity says how sure the shift is (it grows with the rows),
    # the AUC how far apart the domains sit in the features that low-rank adapters would keep.
    if auc is not None and auc >= cfg.auto_full_min_domain_auc:
        return "full", (f"{few}, but the frozen features tell target from source apart (domain classifier AUC "
                        f"{auc:.3f} >= {cfg.auto_full_min_domain_auc}): a new domain, so every layer adapts")
    if verdict == "severe":
        return "lora", (f"{few} and a severe shift within reach of the frozen features (domain classifier AUC "
                        f"{'unknown' if auc is None else f'{auc:.3f}'}): low-rank adapters move the representation "
                        "with few parameters")
    shift_note = f"shift verdict {verdict!r}" if verdict else "no shift report"
    return "feature_extraction", (f"{few} and {shift_note}: a frozen encoder with a trained head resists overfitting")


def macro_f1_evidence(labels: np.ndarray, predicted: dict[str, np.ndarray], n_classes: int, reference: str,
                      resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, dict]:
    """Each model's validation macro-F1 with a percentile bootstrap interval, and its paired difference from
    `reference` (the same resampled rows for every model), from the metrics function evaluate uses."""
    from tasks.evaluate import confusion_counts, metrics_from_confusion, percentile_interval

    labels = np.asarray(labels)
    rows = np.random.default_rng(seed).integers(0, len(labels), size=(resamples, len(labels)))
    point, samples = {}, {}
    for name, pred in predicted.items():
        point[name] = float(metrics_from_confusion(confusion_counts(labels, pred, n_classes))["macro_f1"])
        samples[name] = metrics_from_confusion(confusion_counts(labels[rows], pred[rows], n_classes))["macro_f1"]
    return {name: {"validation_macro_f1": point[name],
                   "interval": percentile_interval(samples[name], confidence),
                   f"minus_{reference}": {"estimate": point[name] - point[reference],
                                          "interval": percentile_interval(samples[name] - samples[reference],
                                                                          confidence)}}
            for name in predicted}


def encoder_predictions(result, valid, max_length: int) -> np.ndarray:
    """The trained arm's labels for the validation rows: from the probabilities its last scored epoch kept, else
    (a run resumed past that epoch) predicted again."""
    from tasks.models import predict_proba

    probs = result.extra.get("validation_probs")
    if probs is None:
        probs = predict_proba(result.model, result.tokenizer, valid.texts, max_length, runtime=result.runtime)
    return probs.numpy().argmax(axis=1)


def choose_strategy(base: str, labels: list[str], train, valid, cfg: TrainConfig, model_cfg: ModelConfig,
                    n_target: int, shift_report: ShiftReport | None, checkpoints: Path, cache_dir: Path | None = None,
                    world: int = 1) -> StrategyChoice:
    """The strategy to train: the configured one, or for `auto` the one ahead on the validation evidence, with the
    race's arms checkpointed under `checkpoints/<strategy>`; the caller then trains (or finishes) the winner."""
    from tasks.finetune import finetune

    strategy, reason = rule_based(cfg, n_target, shift_report)
    if cfg.strategy != "auto":
        return StrategyChoice(strategy, reason, checkpoint_dir=checkpoints)
    if world > 1:
        return StrategyChoice(strategy, f"{reason} ({world} processes: the race runs in one)", checkpoint_dir=checkpoints)

    from tasks.cross_fitting import cross_fitted_cheap

    n_classes, race = len(labels), min(cfg.auto_race_epochs, cfg.epochs)
    started = time.perf_counter()
    cheap = finetune(base, labels, train, valid, cfg, model_cfg, "feature_extraction", "", cache_dir=cache_dir,
                     progress=False)
    crossed = cross_fitted_cheap(cheap, train, valid, n_classes, cfg)
    cheap_seconds = time.perf_counter() - started
    target_labels = np.concatenate([train.labels, valid.labels])[crossed["rows"]]
    on_valid = slice(len(crossed["rows"]) - len(valid.texts), None)  # the validation rows come last
    overall = macro_f1_evidence(target_labels, {name: crossed[name].argmax(axis=1) for name in CHEAP}, n_classes,
                                "tfidf", seed=cfg.seed)
    best_cheap = max(CHEAP, key=lambda name: (overall[name]["validation_macro_f1"], -CHEAP.index(name)))
    predicted = {name: crossed[name][on_valid].argmax(axis=1) for name in CHEAP}
    seconds, how = {name: cheap_seconds for name in CHEAP}, {
        name: f"{crossed['folds']}-fold cross-fitted on {len(target_labels)} target rows" for name in CHEAP}
    for name in ADAPTIVE:
        started = time.perf_counter()
        arm = finetune(base, labels, train, valid, cfg, model_cfg, name, "", progress=False,
                       checkpoint_dir=checkpoints / name, stop_after_epochs=race)
        predicted[name] = encoder_predictions(arm, valid, model_cfg.max_length)
        seconds[name], how[name] = time.perf_counter() - started, f"first {race} of {cfg.epochs} epochs"
        del arm  # the winner resumes from its checkpoint

    scored = macro_f1_evidence(valid.labels, predicted, n_classes, best_cheap, seed=cfg.seed)
    evidence = []
    for name in (*CHEAP, *ADAPTIVE):
        row = {"model": name, "how": how[name], **scored[name], "seconds": round(seconds[name], 2)}
        if name in CHEAP:
            row["cross_fitted"] = {"rows": len(target_labels), "macro_f1": overall[name]["validation_macro_f1"],
                                   "interval": overall[name]["interval"]}
        evidence.append(row)
    score = {name: row["validation_macro_f1"] for name, row in scored.items()}
    best_adaptive = max(ADAPTIVE, key=lambda name: (score[name], -ADAPTIVE.index(name)))
    gap = scored[best_adaptive][f"minus_{best_cheap}"]
    table = "; ".join(evidence_text(StrategyEvidence.model_validate(row)) for row in evidence)
    where = f"{len(valid.texts)} validation rows, {len(target_labels)} cross-fitted: {table}"
    versus = (f"{best_adaptive} - {best_cheap} on the validation rows {gap['estimate']:+.3f} "
              f"{interval_text(gap['interval'], signed=True)}")
    # Clearly behind (the paired interval below zero): no minute more goes to adaptation. Otherwise the best arm
    # finishes, since two epochs are not its last word, and the finetune stage compares the finished model with the
    # cheap one on the validation rows before either is served.
    if gap["interval"][1] is not None and gap["interval"][1] < 0:
        why = NEGATIVE_TRANSFER if best_cheap == "tfidf" else FROZEN_IS_ENOUGH
        return StrategyChoice("feature_extraction", f"{why} ({versus}; {where}): the candidate is the cheap model, and "
                              "no adaptive strategy trains on", evidence, best_cheap == "tfidf", trained=cheap,
                              checkpoint_dir=checkpoints, cheap=cheap, cross_fitted=crossed)
    return StrategyChoice(best_adaptive, f"{best_adaptive} is the adaptive strategy ahead, and not clearly behind the "
                          f"best cheap model ({versus}; {where}): it finishes its schedule, then must beat the cheap "
                          "model on the validation rows to be served", evidence, score["tfidf"] > score[best_adaptive],
                          checkpoint_dir=checkpoints / best_adaptive, cheap=cheap, cross_fitted=crossed)


def served_reason(reason: str, trained_strategy: str, served_encoder: str, served_as: str,
                  serves_lexical_alone: bool, auto: bool, ladder_pooled_frozen: bool = False) -> tuple[str, bool]:
    """The candidate's reason once the finetune stage has chosen what to serve, and whether the evidence chose a cheap
    model over adaptation (auto only): said plainly when the frozen encoder or the lexical model won.
    `ladder_pooled_frozen`: the evidence ladder stepped from the lexical model alone to the frozen encoder pooled with
    it; the race's "negative transfer" (the lexical model ahead of the frozen head alone) then no longer describes
    what is served."""
    if serves_lexical_alone:
        if NEGATIVE_TRANSFER not in reason:
            reason = f"{NEGATIVE_TRANSFER}: the lexical model alone is served ({served_as}); {reason}"
    elif ladder_pooled_frozen and NEGATIVE_TRANSFER in reason:
        reason = (f"{POOLED_IS_AHEAD}: the frozen encoder's pool is served ({served_as}); "
                  f"{reason.replace(NEGATIVE_TRANSFER, RACE_RANKED_LEXICAL_FIRST, 1)}")
    elif served_encoder != trained_strategy:
        reason = (f"{FROZEN_IS_ENOUGH} after the long fit: the frozen encoder with its head is served ({served_as}); "
                  f"{reason}")
    return reason, auto and (served_encoder == "feature_extraction" or serves_lexical_alone)
