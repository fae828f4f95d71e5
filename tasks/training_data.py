"""What the finetune stage trains on: train and validation rows (validation a stratified share of target_train),
each row's class and loss weight, and the length-grouped batches the training loop draws them in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from tasks.config import TrainConfig
from tasks.errors import DataError


@dataclass(frozen=True)
class TrainingData:
    texts: list[str]
    labels: np.ndarray  # class index per row
    weights: np.ndarray  # loss weight per row
    domains: np.ndarray  # "source" | "target" per row


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
