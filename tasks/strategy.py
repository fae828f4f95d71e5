"""`train.strategy: auto`: the transfer strategy chosen from evidence gathered before the expensive fit.

On the validation rows held out of target_train (never the holdouts) it measures:
- the lexical baseline: TF-IDF + logistic regression fit on the train rows (what evaluate compares with);
- feature_extraction itself: a head on the frozen encoder's cached features (cheap, so trained in full);
- short budgeted trials of lora and full: one epoch on at most `train.auto_trial_rows` train rows.

The strategy with the best validation macro-F1 wins (ties go to the cheaper one); a feature_extraction win
keeps the model already trained. When TF-IDF beats every strategy, the evidence predicts negative transfer,
and the stage says so before training. Too few validation rows to judge, or a data-parallel run, fall back
to the rule on data size and shift verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tasks.config import ModelConfig, TrainConfig

# Cheapest first: a tie keeps the cheaper strategy.
TRIALS = ("feature_extraction", "lora", "full")
MIN_VALIDATION_ROWS = 20


@dataclass
class StrategyChoice:
    strategy: str
    reason: str
    evidence: list[dict] = field(default_factory=list)  # one row per model tried: what, how, validation macro-F1, seconds
    negative_transfer_predicted: bool | None = None
    trained: object | None = None  # the FinetuneResult of the chosen strategy when a trial already is the model


def rule_based(cfg: TrainConfig, n_target: int, shift_report: dict | None) -> tuple[str, str]:
    """The configured strategy, or for `auto` one picked from the data size and the shift verdict."""
    if cfg.strategy != "auto":
        return cfg.strategy, f"configured: train.strategy={cfg.strategy}"
    verdict = (shift_report or {}).get("verdict")
    if n_target >= cfg.auto_full_min_examples:
        return "full", (f"{n_target} labelled target examples >= {cfg.auto_full_min_examples}: "
                        "enough to adapt every layer")
    if verdict == "severe":
        return "lora", (f"{n_target} labelled target examples < {cfg.auto_full_min_examples} and a severe shift: "
                        "the representation must move, and low-rank adapters do so with few parameters")
    shift_note = f"shift verdict {verdict!r}" if verdict else "no shift report"
    return "feature_extraction", (f"{n_target} labelled target examples < {cfg.auto_full_min_examples} and "
                                  f"{shift_note}: a frozen encoder with a trained head resists overfitting")


def lexical_score(train, valid, n_classes: int) -> float:
    """Validation macro-F1 of evaluate's lexical baseline (TF-IDF + logistic regression) fit on the train rows."""
    import torch

    from tasks.baselines import full_proba, tfidf_model
    from tasks.finetune import validation_metrics

    model = tfidf_model().fit(train.texts, train.labels)
    scores = full_proba(model.predict_proba(valid.texts), model.classes_, n_classes)
    return validation_metrics(valid.labels, torch.as_tensor(scores))["macro_f1"]


def trial_rows(train, limit: int, seed: int):
    """At most `limit` train rows, drawn with every class kept in proportion (a trial's budget)."""
    from sklearn.model_selection import train_test_split

    from tasks.finetune import TrainingData

    if len(train.texts) <= limit:
        return train
    counts = np.bincount(train.labels)
    stratify = train.labels if counts[counts > 0].min() >= 2 else None
    keep, _ = train_test_split(np.arange(len(train.texts)), train_size=limit, random_state=seed, stratify=stratify)
    keep = np.sort(keep)
    return TrainingData(texts=[train.texts[i] for i in keep], labels=train.labels[keep], weights=train.weights[keep],
                        domains=train.domains[keep])


def choose_strategy(base: str, labels: list[str], train, valid, cfg: TrainConfig, model_cfg: ModelConfig,
                    n_target: int, shift_report: dict | None, cache_dir=None, world: int = 1) -> StrategyChoice:
    """The strategy to train: the configured one, or for `auto` the one the evidence favours."""
    from tasks.finetune import finetune

    strategy, reason = rule_based(cfg, n_target, shift_report)
    if cfg.strategy != "auto":
        return StrategyChoice(strategy, reason)
    if world > 1 or len(valid.texts) < MIN_VALIDATION_ROWS:
        why = (f"{world} processes: trials run in one" if world > 1
               else f"{len(valid.texts)} validation rows are too few to compare strategies (< {MIN_VALIDATION_ROWS})")
        return StrategyChoice(strategy, f"{reason} ({why})")

    evidence, results = [], {}
    started = time.perf_counter()
    lexical = lexical_score(train, valid, len(labels))
    evidence.append({"model": "tfidf", "how": "TF-IDF + logistic regression on the train rows",
                     "validation_macro_f1": lexical, "seconds": time.perf_counter() - started})
    trial_cfg = cfg.model_copy(update={"epochs": cfg.auto_trial_epochs, "early_stopping_patience": 0})
    budget = trial_rows(train, cfg.auto_trial_rows, cfg.seed)
    for name in TRIALS:
        started = time.perf_counter()
        if name == "feature_extraction":  # cheap: trained in full, and kept if it wins
            result = finetune(base, labels, train, valid, cfg, model_cfg, name, "", cache_dir=cache_dir, progress=False)
            how = "head on frozen features, the full schedule"
        else:
            result = finetune(base, labels, budget, valid, trial_cfg, model_cfg, name, "", progress=False)
            how = f"trial: {cfg.auto_trial_epochs} epoch(s) on {len(budget.texts)} train rows"
        results[name] = result
        evidence.append({"model": name, "how": how, "validation_macro_f1": result.metrics["validation"]["macro_f1"],
                         "seconds": time.perf_counter() - started})
    scored = {row["model"]: row["validation_macro_f1"] for row in evidence}
    best = max(TRIALS, key=lambda name: (scored[name], -TRIALS.index(name)))
    table = ", ".join(f"{row['model']} {row['validation_macro_f1']:.3f}" for row in evidence)
    negative = scored["tfidf"] > scored[best]
    reason = (f"best validation macro-F1 of the strategies tried on {len(valid.texts)} target rows ({table})"
              + ("; TF-IDF scores higher than every strategy: the evidence predicts negative transfer" if negative else ""))
    for row in evidence:
        row["seconds"] = round(row["seconds"], 2)
    return StrategyChoice(best, reason, evidence, negative,
                          trained=results["feature_extraction"] if best == "feature_extraction" else None)
