"""auto's evidence on the cheap models: out-of-fold probabilities of TF-IDF + logistic regression and of the frozen
encoder's head on every labelled target row, so that no score comes from a model that saw the row."""

from __future__ import annotations

import copy

import numpy as np
import torch

from tasks.config import TrainConfig
from tasks.finetune import FinetuneResult, fit_linear_head, head_epoch, head_forward, head_optimiser
from tasks.models import head_input
from tasks.trainable_parts import head_modules
from tasks.training_data import TrainingData


def target_rows(train: TrainingData, valid: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """Every labelled target row the stage holds, as (indexes into train, then len(train) + indexes into valid): the
    rows cross-fitting scores."""
    return np.flatnonzero(train.domains == "target"), len(train.texts) + np.arange(len(valid.texts))


def cross_fitted_cheap(result: FinetuneResult, train: TrainingData, valid: TrainingData, n_classes: int,
                       cfg: TrainConfig, folds: int = 5) -> dict:
    """Out-of-fold probabilities of the two cheap models on every labelled target row (train's target rows, then the
    validation rows): each fold's rows are scored by a TF-IDF + logistic regression and a frozen-encoder head fit on
    the source rows and the other folds (the pooler head for the full model's best number of epochs; the head on
    the layers' mean solved, as train_head fits it), so no score comes from a model that saw the row or stopped
    early on it. Ten times the rows the validation split alone would
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
        if head_input(model) == "layer_mean":
            fit_linear_head(model, features[fit], labels[fit], weights[fit], n_classes, cfg.class_weights)
        else:
            fold_data = TrainingData(list(texts[fit]), labels[fit], weights[fit],
                                     np.full(len(fit), "target", dtype=object))
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
