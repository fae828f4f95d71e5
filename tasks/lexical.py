"""The lexical companion a candidate serves with: TF-IDF + logistic regression fit on the candidate's own train
rows, pooled with the encoder's calibrated probabilities, p = (1 - w) p_encoder + w p_lexical.

On small target data a fine-tuned encoder and a lexical model can err on different rows; w is chosen on the
validation rows held out of target_train, by macro-F1 (then log-loss), and w = 0 serves the encoder alone. The
companion is saved as JSON (vocabulary, idf, coefficients) beside the weights, never as a pickle: a model
directory is input from someone else, and loading one must not run code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import RegraftError

COMPANION_FILE = "regraft_lexical.json"
FORMAT = "regraft-lexical/1"
# Word 1-2 grams kept by the companion: bounds the file (and serving memory) on large data.
MAX_FEATURES = 100_000


@dataclass
class LexicalCompanion:
    vocabulary: dict[str, int]
    idf: np.ndarray  # (features,)
    coef: np.ndarray  # (classes seen in training, features)
    intercept: np.ndarray  # (classes seen in training,)
    classes: list[int]  # the class index of each row of coef
    n_classes: int
    weight: float  # w of the pool
    temperature: float = 1.0  # T on the pool: softmax(log(pool) / T), fitted on the validation rows

    def vectorizer(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=self.vocabulary)
        vectorizer.idf_ = self.idf
        return vectorizer

    def proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities over all n_classes (classes never seen in training get 0)."""
        scores = np.asarray(self.vectorizer().transform(list(texts)) @ self.coef.T) + self.intercept
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        return full_proba(scores / scores.sum(axis=1, keepdims=True), self.classes, self.n_classes)

    def pool(self, encoder_proba, texts: list[str]):
        """The served probabilities: the encoder's (a tensor, rows in `texts` order; None when the weight is 1 and
        the encoder's are not needed) pooled with this model's, then tempered."""
        import torch

        lexical = torch.as_tensor(self.proba(texts), dtype=torch.float32 if encoder_proba is None else encoder_proba.dtype)
        pooled = lexical if self.weight >= 1.0 else (1.0 - self.weight) * encoder_proba + self.weight * lexical
        if self.temperature == 1.0:
            return pooled
        return torch.softmax(torch.log(pooled.clamp_min(1e-12)) / self.temperature, dim=-1)

    @property
    def serves_alone(self) -> bool:
        """The lexical model alone is served: the encoder's forward pass would be multiplied by zero."""
        return self.weight >= 1.0

    def to_json(self) -> dict:
        return {"format": FORMAT, "weight": self.weight, "temperature": self.temperature,
                "n_classes": self.n_classes, "classes": self.classes,
                "vocabulary": self.vocabulary, "idf": self.idf.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist()}


def full_proba(proba: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """sklearn (and the companion) drop classes never seen in training; put their (zero) columns back."""
    out = np.zeros((len(proba), k))
    out[:, classes] = proba
    return out


def write_companion(companion: LexicalCompanion, folder: Path) -> None:
    (Path(folder) / COMPANION_FILE).write_text(json.dumps(companion.to_json()), encoding="utf-8")


def read_companion(folder: Path, n_classes: int) -> LexicalCompanion | None:
    """The companion saved in a model directory, None when there is none; a malformed one is refused by name."""
    path = Path(folder) / COMPANION_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        companion = LexicalCompanion(
            {str(k): int(v) for k, v in raw["vocabulary"].items()}, np.asarray(raw["idf"], dtype=float),
            np.asarray(raw["coef"], dtype=float), np.asarray(raw["intercept"], dtype=float),
            [int(c) for c in raw["classes"]], int(raw["n_classes"]), float(raw["weight"]),
            float(raw.get("temperature", 1.0)))  # companions written before the pool was tempered have none
        problem = companion_problem(companion, raw.get("format"), n_classes)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem:
        raise RegraftError(f"{path}: {problem}")
    return companion


def companion_problem(c: LexicalCompanion, fmt, n_classes: int) -> str | None:
    n = len(c.idf)
    if fmt != FORMAT:
        return f"format {fmt!r}, expected {FORMAT!r}"
    if c.n_classes != n_classes:
        return f"made for {c.n_classes} classes, the model has {n_classes}"
    if not 0.0 <= c.weight <= 1.0 or math.isnan(c.weight):
        return f"weight {c.weight} is not in [0, 1]"
    if not (math.isfinite(c.temperature) and 0.01 <= c.temperature <= 100.0):
        return f"temperature {c.temperature} is not in [0.01, 100]"
    if sorted(set(c.classes)) != sorted(c.classes) or not all(0 <= k < n_classes for k in c.classes) or not c.classes:
        return f"classes {c.classes} are not distinct class indexes below {n_classes}"
    if c.coef.shape != (len(c.classes), n) or c.intercept.shape != (len(c.classes),) or c.idf.ndim != 1:
        return "coefficient shapes do not match the classes and the vocabulary"
    if sorted(c.vocabulary.values()) != list(range(n)):
        return "the vocabulary's indexes are not 0..n-1 over the idf"
    if not (np.isfinite(c.idf).all() and np.isfinite(c.coef).all() and np.isfinite(c.intercept).all()):
        return "non-finite numbers"
    return None
