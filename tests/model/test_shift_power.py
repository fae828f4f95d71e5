"""Statistical correctness of the shift stage on real MiniLM embeddings of the demo reviews:
false-positive rate under the null and power against injected shifts. (Label-shift recovery is
tested on synthetic data in tests/unit/test_shift.py: on 220 demo rows a logistic regression on
frozen embeddings is too weak a classifier for EM to recover priors.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from tasks.config import load_params
from tasks.models import load_tokenizer, mean_pooled_embeddings
from tasks.shift import build_sample, calibrate, decide, distribution_tests, source_classifier_probabilities
from tests.conftest import REPO

pytestmark = [pytest.mark.model, pytest.mark.timeout(1800)]
PARAMS = load_params(REPO / "params.yaml")
# Every target here is labelled, so the label-shift p-value is the chi-squared test of the label mix; the
# bootstrap (one classifier refit per draw) only sets the reported prior interval: 20 draws keep it cheap.
CFG = PARAMS.shift.model_copy(update={"permutations": 99, "bootstrap": 20})
LABELS = PARAMS.ingest.labels
SEEDS = range(20)


def shuffled(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    return " ".join(rng.permutation(words))


@pytest.fixture(scope="module")
def pool(demo_splits, tmp_path_factory):
    """All source rows with their embeddings, and the same texts word-shuffled and truncated."""
    cache = tmp_path_factory.mktemp("emb")
    source = pd.concat([demo_splits["source_train"], demo_splits["source_holdout"]], ignore_index=True)
    target = pd.concat([demo_splits["target_train"], demo_splits["target_holdout"]], ignore_index=True)
    rng = np.random.default_rng(0)
    texts = source["text"].tolist()
    variants = {
        "original": texts,
        "shuffled": [shuffled(t, rng) for t in texts],
        "truncated": [" ".join(t.split()[:8]) for t in texts],
    }
    tokenizer = load_tokenizer(PARAMS.model.base)
    embed = lambda ts: mean_pooled_embeddings(PARAMS.model.base, ts, 128, cache)  # noqa: E731
    samples, embedded = {}, {}
    for name, ts in variants.items():
        embedded[name] = embed(ts)
        samples[name] = build_sample(source.assign(text=ts), embedded[name], tokenizer, ["condition"], LABELS)
    everything = pd.concat([source, target], ignore_index=True)
    both = torch.cat([embedded["original"], embed(target["text"].tolist())])
    samples["everything"] = build_sample(everything, both, tokenizer, ["condition"], LABELS)
    samples["everything_frame"] = everything
    return samples


def with_predictions(source, target):
    target.class_probs = source_classifier_probabilities(source.embeddings, source.labels, target.embeddings)
    return source, target


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2:]


@pytest.fixture(scope="module")
def null_p_values(pool):
    original = pool["original"]
    found: dict[str, list[float]] = {}
    for seed in SEEDS:
        a, b = halves(len(original), 1000 + seed)
        source, target = with_predictions(original.take(a), original.take(b))
        results, _ = distribution_tests(source, target, CFG, LABELS, seed=seed)
        for r in results:
            found.setdefault(r.name, []).append(r.p_value)
    return found


def test_null_false_positive_rate_is_at_most_alpha(null_p_values):
    # 20 null splits at alpha 0.05: more than 4 rejections has probability < 2% for a valid test.
    for name, p_values in null_p_values.items():
        assert sum(p < CFG.alpha for p in p_values) <= 4, (name, p_values)


@pytest.mark.parametrize("name", ["mmd", "classifier", "text_length", "vocabulary"])
def test_null_p_values_are_roughly_uniform(null_p_values, name):
    assert stats.kstest(null_p_values[name], "uniform").pvalue > 0.01


def injected(pool, kind: str, seed: int):
    """A source half against a target built from the other half with one known shift."""
    original = pool["original"]
    a, b = halves(len(original), 2000 + seed)
    rng = np.random.default_rng(seed)
    if kind == "class mix":
        labels_b = original.labels[b]
        keep = np.r_[b[labels_b != 2], rng.choice(b[labels_b == 2], size=40, replace=False)]
        return with_predictions(original.take(a), original.take(keep))
    if kind in ("shuffled", "truncated"):
        return with_predictions(original.take(a), pool[kind].take(b))
    # A different topic: reviews for mental-health conditions against everything else.
    everything, frame = pool["everything"], pool["everything_frame"]
    topic = frame["condition"].isin(["Depression", "Anxiety", "Bipolar Disorde", "Major Depressive Disorde",
                                     "Panic Disorde", "Anxiety and Stress", "Insomnia", "ADHD"]).to_numpy()
    other = rng.permutation(np.flatnonzero(~topic))[:200]
    on_topic = rng.permutation(np.flatnonzero(topic))[:100]
    return with_predictions(everything.take(other), everything.take(on_topic))


@pytest.fixture(scope="module")
def cutoffs(pool):
    return calibrate(pool["original"], CFG, LABELS)


@pytest.mark.parametrize("kind", ["class mix", "topic", "shuffled", "truncated"])
def test_injected_shifts_are_detected(pool, cutoffs, kind):
    detected = 0
    for seed in range(10):
        source, target = injected(pool, kind, seed)
        results, _ = distribution_tests(source, target, CFG, LABELS, seed=seed)
        verdict, _ = decide(results, cutoffs, CFG)
        detected += verdict != "none"
    assert detected >= 9, f"power {detected}/10 for {kind}"
