"""`train.strategy: auto`: the transfer strategy chosen from evidence on the validation rows held out of
target_train (never the holdouts), gathered on the way to the final model rather than beside it:

- the lexical baseline: TF-IDF + logistic regression fit on the train rows (what evaluate compares with);
- feature_extraction: a head on the frozen encoder's cached features (cheap, so trained in full);
- lora and full race: each trains its real schedule for `train.auto_race_epochs` epochs and pauses at its
  checkpoint; the one ahead on validation macro-F1 then resumes and finishes, so the race costs the loser's
  epochs only. (Measured on the demo: one-epoch trials on 512 rows ended at the majority class for both, so
  shorter trials carry no signal there.)

The best validation macro-F1 wins (ties go to the cheaper strategy). When TF-IDF is ahead of every strategy at
the race, the evidence predicts negative transfer, and the stage says so before the winner's remaining epochs.

Fewer than `train.auto_min_validation_rows` validation rows, or a data-parallel run, fall back to the rule on data
size, the shift stage's domain-classifier AUC and its verdict. Measured on the demo's 43 validation rows, the race
picked full (0.612 against lora's 0.407 after two epochs), which then scored 0.484 target-holdout macro-F1 where
the rule's lora scores 0.547: on so few rows the noise (a standard error near 0.07) is larger than the differences
it must resolve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import ModelConfig, TrainConfig

# Cheapest first: a tie keeps the cheaper strategy.
ARMS = ("feature_extraction", "lora", "full")


@dataclass
class StrategyChoice:
    strategy: str
    reason: str
    evidence: list[dict] = field(default_factory=list)  # one row per model tried: what, how, validation macro-F1, seconds
    negative_transfer_predicted: bool | None = None
    trained: object | None = None  # the FinetuneResult of the chosen strategy when the race already finished it
    checkpoint_dir: Path | None = None  # where the chosen strategy trains (or resumes, after the race)


def domain_auc(shift_report: dict | None) -> float | None:
    """The shift stage's domain-classifier AUC (source against target on the frozen embeddings), if it has one."""
    tests = (shift_report or {}).get("tests")
    for test in tests if isinstance(tests, list) else []:
        if isinstance(test, dict) and test.get("name") == "classifier":
            auc = test.get("statistic")
            if isinstance(auc, int | float) and not isinstance(auc, bool) and 0.0 <= auc <= 1.0:
                return float(auc)
    return None


def rule_based(cfg: TrainConfig, n_target: int, shift_report: dict | None) -> tuple[str, str]:
    """The configured strategy, or for `auto` one picked from the data size and the shift evidence."""
    if cfg.strategy != "auto":
        return cfg.strategy, f"configured: train.strategy={cfg.strategy}"
    verdict = (shift_report or {}).get("verdict")
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


def lexical_score(train, valid, n_classes: int) -> float:
    """Validation macro-F1 of evaluate's lexical baseline (TF-IDF + logistic regression) fit on the train rows."""
    import torch

    from tasks.baselines import tfidf_model
    from tasks.finetune import validation_metrics
    from tasks.lexical import full_proba

    model = tfidf_model().fit(train.texts, train.labels)
    scores = full_proba(model.predict_proba(valid.texts), model.classes_, n_classes)
    return validation_metrics(valid.labels, torch.as_tensor(scores))["macro_f1"]


def choose_strategy(base: str, labels: list[str], train, valid, cfg: TrainConfig, model_cfg: ModelConfig,
                    n_target: int, shift_report: dict | None, checkpoints: Path, cache_dir: Path | None = None,
                    world: int = 1) -> StrategyChoice:
    """The strategy to train: the configured one, or for `auto` the one ahead on the validation evidence, with the
    race's arms checkpointed under `checkpoints/<strategy>`; the caller then trains (or finishes) the winner."""
    from tasks.finetune import finetune

    strategy, reason = rule_based(cfg, n_target, shift_report)
    if cfg.strategy != "auto":
        return StrategyChoice(strategy, reason, checkpoint_dir=checkpoints)
    if world > 1 or len(valid.texts) < cfg.auto_min_validation_rows:
        why = (f"{world} processes: the race runs in one" if world > 1
               else f"{len(valid.texts)} validation rows are too few to compare strategies "
                    f"(train.auto_min_validation_rows: {cfg.auto_min_validation_rows})")
        return StrategyChoice(strategy, f"{reason} ({why})", checkpoint_dir=checkpoints)

    evidence, results = [], {}
    started = time.perf_counter()
    lexical = lexical_score(train, valid, len(labels))
    evidence.append({"model": "tfidf", "how": "TF-IDF + logistic regression on the train rows",
                     "validation_macro_f1": lexical, "seconds": round(time.perf_counter() - started, 2)})
    race = min(cfg.auto_race_epochs, cfg.epochs)
    for name in ARMS:
        started = time.perf_counter()
        if name == "feature_extraction":
            results[name] = finetune(base, labels, train, valid, cfg, model_cfg, name, "", cache_dir=cache_dir,
                                     progress=False)
            how = "head on frozen features, the full schedule"
        else:
            results[name] = finetune(base, labels, train, valid, cfg, model_cfg, name, "", progress=False,
                                     checkpoint_dir=checkpoints / name, stop_after_epochs=race)
            how = f"first {race} of {cfg.epochs} epochs"
        evidence.append({"model": name, "how": how,
                         "validation_macro_f1": results[name].metrics["validation"].get("macro_f1", 0.0),
                         "seconds": round(time.perf_counter() - started, 2)})
    scored = {row["model"]: row["validation_macro_f1"] for row in evidence}
    best = max(ARMS, key=lambda name: (scored[name], -ARMS.index(name)))
    negative = scored["tfidf"] > scored[best]
    table = ", ".join(f"{row['model']} {row['validation_macro_f1']:.3f}" for row in evidence)
    reason = (f"ahead on validation macro-F1 ({len(valid.texts)} target rows: {table})"
              + ("; TF-IDF is ahead of every strategy: the evidence predicts negative transfer" if negative else ""))
    return StrategyChoice(best, reason, evidence, negative,
                          trained=results[best] if best == "feature_extraction" else None,
                          checkpoint_dir=checkpoints / best if best != "feature_extraction" else checkpoints)
