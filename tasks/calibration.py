"""Temperature scaling of the trained encoders (Guo et al., 2017), fitted on rows held out of their training: the
temperature goes into the model's config, so every reader of its probabilities gets calibrated ones."""

from __future__ import annotations

import math

import numpy as np
import torch

from tasks.finetune import FinetuneResult
from tasks.training_data import TrainingData


# A row's loss counts at most -log(1e-12), as if its probability were clipped there (as calibrate_cross_fitted's are):
# a class a head never saw in training scores about -1e4 (tasks/finetune.py fit_linear_head), and one such row among
# the validation rows would otherwise drive T to its bound and flatten every probability.
MAX_ROW_LOSS = -math.log(1e-12)


def fit_temperature(logits: torch.Tensor, labels: np.ndarray) -> float:
    """The temperature T that minimises the negative log-likelihood of softmax(logits / T) (Guo et al., 2017)."""
    from scipy.optimize import minimize_scalar

    target = torch.tensor(np.asarray(labels), dtype=torch.long)  # a copy: the labels may be a read-only array

    def nll(log_t: float) -> float:
        rows = torch.nn.functional.cross_entropy(logits / math.exp(log_t), target, reduction="none")
        return float(rows.clamp(max=MAX_ROW_LOSS).mean())

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
    row (cross_fitted_cheap): ten times the validation rows, and none scored by a head fit on it. With
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
