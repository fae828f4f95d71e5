"""The models evaluate compares: the trained classifiers' probabilities, and two baselines fit on the
same train splits as the candidate (TF-IDF + logistic regression; the frozen pretrained encoder with a
logistic head). Kept apart from tasks/evaluate.py, whose metrics need no model code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.lexical import MAX_FEATURES, LexicalCompanion, full_proba


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


def tfidf_model(max_features: int | None = None):
    """The lexical baseline: TF-IDF of word 1-2 grams + class-balanced logistic regression (unfitted)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=max_features),
                         balanced_logistic_regression())


def balanced_logistic_regression():
    """Class-balanced L2 logistic regression (scikit-learn's default C) by Newton-CG: on the demo's 782 train rows it
    reached the minimiser 6x (TF-IDF, 9,586 features) to 30x (the encoder's 384) faster than the default L-BFGS, and
    closer (L-BFGS stopped at its tolerance 0.005 away in probability on the encoder's features)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(solver="newton-cg", max_iter=2000, class_weight="balanced")


def baseline_probabilities(train: pd.DataFrame, texts: dict[str, list[str]], labels: list[str], base: str,
                           max_length: int, cache: Path | None) -> dict[str, dict[str, np.ndarray]]:
    """TF-IDF + logistic regression, and the pretrained encoder frozen with a linear (logistic) head."""
    from tasks.models import mean_pooled_embeddings

    y = train["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    train_texts = train["text"].astype("str").tolist()
    out: dict[str, dict[str, np.ndarray]] = {"tfidf": {}, "frozen_encoder": {}}
    tfidf = tfidf_model().fit(train_texts, y)

    def embed(rows: list[str]) -> np.ndarray:
        return mean_pooled_embeddings(base, rows, max_length, cache).numpy()

    head = balanced_logistic_regression().fit(embed(train_texts), y)
    for split, rows in texts.items():
        out["tfidf"][split] = full_proba(tfidf.predict_proba(rows), tfidf.classes_, len(labels))
        out["frozen_encoder"][split] = full_proba(head.predict_proba(embed(rows)), head.classes_, len(labels))
    return out


def softmax_coefficients(regression) -> tuple[np.ndarray, np.ndarray]:
    """A fitted logistic regression's (coef, intercept) with one row per class it saw, so that the softmax of
    x @ coef.T + intercept is its predict_proba: binary fits keep one row, and sigmoid(s) is the softmax of
    (-s/2, s/2)."""
    coef, intercept = regression.coef_, regression.intercept_
    if coef.shape[0] == 1:
        return np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def fit_companion(texts: list[str], labels: np.ndarray, weights: np.ndarray, n_classes: int) -> LexicalCompanion | None:
    """TF-IDF + class-balanced logistic regression on the candidate's train rows (target rows weighted as in
    training); None when the rows share no word pair twice (nothing lexical to learn)."""
    model = tfidf_model(max_features=MAX_FEATURES)
    try:
        model.fit(texts, labels, logisticregression__sample_weight=weights)
    except ValueError:  # empty vocabulary, or a single class
        return None
    vectorizer, regression = model.steps[0][1], model.steps[1][1]
    coef, intercept = softmax_coefficients(regression)
    return LexicalCompanion({term: int(i) for term, i in vectorizer.vocabulary_.items()}, vectorizer.idf_, coef,
                            intercept, [int(c) for c in regression.classes_], n_classes, 0.0)
