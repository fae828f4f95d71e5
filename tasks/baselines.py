"""The models evaluate compares: the trained classifiers' probabilities, and two baselines fit on the
same train splits as the candidate (TF-IDF + logistic regression; the frozen pretrained encoder with a
logistic head). Kept apart from tasks/evaluate.py, whose metrics need no model code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def train_frame(splits: dict[str, pd.DataFrame], data: str) -> pd.DataFrame:
    """The rows the baselines learn from: the same train splits as the candidate (train.data)."""
    names = ["target_train"] if data == "target" else ["source_train", "target_train"]
    return pd.concat([splits[name] for name in names], ignore_index=True)


def classifier_probabilities(path: Path, texts: dict[str, list[str]], labels: list[str], max_length: int,
                             role: str) -> dict[str, np.ndarray]:
    """A trained classifier's class probabilities on each split's texts."""
    from tasks.models import load_tokenizer, load_trained_classifier, predict_proba

    model = load_trained_classifier(path, labels, role)
    tokenizer = load_tokenizer(path)
    return {split: predict_proba(model, tokenizer, rows, max_length).numpy() for split, rows in texts.items()}


def tfidf_model():
    """The lexical baseline: TF-IDF of word 1-2 grams + class-balanced logistic regression (unfitted)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(max_iter=2000, class_weight="balanced"))


def baseline_probabilities(train: pd.DataFrame, texts: dict[str, list[str]], labels: list[str], base: str,
                           max_length: int, cache: Path | None) -> dict[str, dict[str, np.ndarray]]:
    """TF-IDF + logistic regression, and the pretrained encoder frozen with a linear (logistic) head."""
    from sklearn.linear_model import LogisticRegression

    from tasks.models import mean_pooled_embeddings

    y = train["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    train_texts = train["text"].astype("str").tolist()
    out: dict[str, dict[str, np.ndarray]] = {"tfidf": {}, "frozen_encoder": {}}
    tfidf = tfidf_model().fit(train_texts, y)

    def embed(rows: list[str]) -> np.ndarray:
        return mean_pooled_embeddings(base, rows, max_length, cache).numpy()

    head = LogisticRegression(max_iter=5000, class_weight="balanced").fit(embed(train_texts), y)
    for split, rows in texts.items():
        out["tfidf"][split] = full_proba(tfidf.predict_proba(rows), tfidf.classes_, len(labels))
        out["frozen_encoder"][split] = full_proba(head.predict_proba(embed(rows)), head.classes_, len(labels))
    return out


def full_proba(proba: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """sklearn drops classes it never saw in training; put their (zero) columns back."""
    out = np.zeros((len(proba), k))
    out[:, classes] = proba
    return out
