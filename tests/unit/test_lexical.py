"""The lexical companion: fit on train rows, saved as JSON, read back with the same probabilities, pooled with the
encoder's, its weight chosen on validation log-loss; a malformed file is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks.baselines import fit_companion, tfidf_model
from tasks.errors import RegraftError
from tasks.lexical import COMPANION_FILE, full_proba, read_companion, write_companion
from tasks.served_choice import choose_weight, served_model
from tasks.training_data import TrainingData

GOOD = ["works well for me", "great relief fast", "really helped a lot", "works great no side effects"]
BAD = ["terrible side effects", "made it worse", "awful headache all day", "side effects were awful"]
MEH = ["not sure it works", "some days ok some days not", "no change so far", "ok but not great"]


def rows(n_classes: int = 3, repeat: int = 4) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for label, group in enumerate([BAD, MEH, GOOD][:n_classes]):
        for i in range(repeat):
            texts += [f"{text} week {i}" for text in group]
            labels += [label] * len(group)
    return texts, np.array(labels)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_companion_read_back_gives_the_fitted_pipelines_probabilities(tmp_path, n_classes):
    texts, labels = rows(n_classes)
    weights = np.ones(len(texts))
    companion = fit_companion(texts, labels, weights, n_classes)
    write_companion(companion, tmp_path)
    again = read_companion(tmp_path, n_classes)
    unseen = ["great relief but headache", "made everything worse", "no idea"]
    pipeline = tfidf_model().fit(texts, labels)
    expected = full_proba(pipeline.predict_proba(unseen), pipeline.classes_, n_classes)
    np.testing.assert_allclose(again.proba(unseen), expected, atol=1e-6)


def test_a_class_absent_from_training_gets_probability_zero(tmp_path):
    texts, labels = rows(2)
    companion = fit_companion(texts, labels * 2, np.ones(len(texts)), 3)  # classes 0 and 2 only
    proba = companion.proba(["awful", "great"])
    assert proba.shape == (2, 3) and np.all(proba[:, 1] == 0) and np.allclose(proba.sum(axis=1), 1)


def test_pool_weighs_encoder_and_lexical_probabilities():
    texts, labels = rows(3)
    companion = fit_companion(texts, labels, np.ones(len(texts)), 3)
    companion.weight = 0.25
    encoder = torch.tensor([[1.0, 0.0, 0.0]])
    pooled = companion.pool(encoder, ["great relief fast"])
    np.testing.assert_allclose(pooled.numpy(), 0.75 * encoder.numpy() + 0.25 * companion.proba(["great relief fast"]),
                               atol=1e-6)


def test_weight_has_the_best_validation_macro_f1_then_the_lowest_log_loss():
    labels = np.array([0, 1, 0, 1])
    confident_wrong = np.array([[0.05, 0.95], [0.95, 0.05], [0.9, 0.1], [0.1, 0.9]])  # 2 of 4 right, overconfident
    lexical = np.array([[0.7, 0.3], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])  # all right, modest
    weight, table = choose_weight(confident_wrong, lexical, labels, [0.0, 0.5, 1.0])
    assert weight == 1.0 and [row["weight"] for row in table] == [0.0, 0.5, 1.0]
    assert table[0]["log_loss"] > table[1]["log_loss"] > table[2]["log_loss"]
    assert choose_weight(lexical, confident_wrong, labels, [0.0, 0.5, 1.0])[0] == 0.0
    # Every row right but barely (encoder) against confident on three and wrong on one (lexical): pooling lowers
    # the log-loss, but macro-F1, what the gate judges, keeps the encoder alone.
    barely = np.array([[0.51, 0.49], [0.49, 0.51], [0.51, 0.49], [0.49, 0.51]])
    sure = np.array([[0.99, 0.01], [0.01, 0.99], [0.99, 0.01], [0.6, 0.4]])
    weight, table = choose_weight(barely, sure, labels, [0.0, 0.25])
    assert table[1]["log_loss"] < table[0]["log_loss"] and table[1]["macro_f1"] < table[0]["macro_f1"] == 1.0
    assert weight == 0.0


def training_data(texts, labels) -> TrainingData:
    return TrainingData(texts, labels, np.ones(len(texts), dtype=np.float32), np.array(["target"] * len(texts)))


def test_candidate_gets_no_companion_when_off_or_validation_is_too_small():
    texts, labels = rows(3)
    train, valid = training_data(texts, labels), training_data(texts[:12], labels[:12])
    encoder = np.full((12, 3), 1 / 3)
    served = served_model({"lora": encoder}, train, valid, 3, [0.0])
    assert served.companion is None and served.report["served_as"] == \
        "the encoder (lora) alone (train.lexical_weights is [0])"
    small = training_data(texts[:6], labels[:6])
    served = served_model({"lora": encoder[:6]}, train, small, 3, [0.0, 0.5])
    assert served.companion is None and "too few" in served.report["served_as"]
    served = served_model({"lora": encoder}, train, valid, 3, [0.0, 0.5])
    assert served.companion is not None and served.companion.weight == 0.5 == served.report["weight"]  # uniform loses
    assert served.report["served_as"].startswith("(1 - 0.5) x the encoder (lora) + 0.5 x TF-IDF")


def test_the_best_served_model_wins_cheapest_first_and_its_pool_is_calibrated(tmp_path):
    """The frozen encoder with its head beats a fine-tuned encoder that is wrong on validation; a tie goes to the
    cheaper encoder; when the lexical model alone is best, it is served alone (the encoder is not even run) with a
    temperature fitted on the pool, which survives the round trip through the model directory."""
    texts, labels = rows(3)
    train, valid = training_data(texts, labels), training_data(texts, labels)
    right = np.eye(3)[labels] * 0.6 + 0.4 / 3
    wrong = np.eye(3)[(labels + 1) % 3] * 0.9 + 0.1 / 3
    served = served_model({"feature_extraction": right, "full": wrong}, train, valid, 3, [0.0])
    assert served.encoder == "feature_extraction" and served.companion is None  # [0]: the first encoder
    served = served_model({"feature_extraction": right, "full": wrong}, train, valid, 3, [0.0, 0.5])
    assert served.encoder == "feature_extraction" and "the frozen encoder with its trained head" in \
        served.report["served_as"]
    served = served_model({"feature_extraction": wrong, "full": wrong}, train, valid, 3, [0.0, 1.0])
    assert served.encoder == "feature_extraction" and served.companion.serves_alone  # tie: the cheaper
    assert served.report["served_as"].startswith("TF-IDF + logistic regression alone")
    # The lexical model alone is evaluate's baseline itself: refit on every row, untempered.
    assert served.companion.temperature == 1.0 == served.report["pool_temperature"]
    pipeline = tfidf_model().fit(texts + texts, np.concatenate([labels, labels]))
    np.testing.assert_allclose(served.companion.proba(texts[:3]),
                               full_proba(pipeline.predict_proba(texts[:3]), pipeline.classes_, 3), atol=1e-6)
    # A blend keeps the temperature fitted on its pool, which survives the round trip through the model directory.
    barely = np.eye(3)[labels] * 0.1 + 0.3  # right on every row, but barely: pooling lowers its log-loss
    served = served_model({"feature_extraction": wrong, "full": barely}, train, valid, 3, [0.0, 0.5])
    t = served.companion.temperature
    assert served.encoder == "full" and t != 1.0 and served.report["pool_temperature"] == t
    write_companion(served.companion, tmp_path)
    again = read_companion(tmp_path, 3)
    assert again.temperature == t and not again.serves_alone
    encoder = torch.as_tensor(barely[:3], dtype=torch.float32)
    pooled = 0.5 * encoder + 0.5 * torch.as_tensor(again.proba(texts[:3]), dtype=torch.float32)
    expected = torch.softmax(torch.log(pooled) / t, dim=-1)
    np.testing.assert_allclose(again.pool(encoder, texts[:3]).numpy(), expected.numpy(), atol=1e-5)
    lexical_only = type(again)(again.vocabulary, again.idf, again.coef, again.intercept, again.classes, 3, 1.0, t)
    np.testing.assert_allclose(lexical_only.pool(None, texts[:3]).numpy(),
                               torch.softmax(torch.log(torch.as_tensor(again.proba(texts[:3]), dtype=torch.float32))
                                             / t, dim=-1).numpy(), atol=1e-5)


def test_the_frozen_encoders_weight_comes_from_every_cross_fitted_target_row():
    """An encoder that happens to be right on the 12 validation rows but wrong on the other 36 target rows: on the
    validation split alone it is served alone; with the cross-fitted rows the lexical model takes the weight."""
    texts, labels = rows(3)
    train, valid = training_data(texts, labels), training_data(texts[:12], labels[:12])
    lucky = np.eye(3)[labels[:12]] * 0.8 + 0.2 / 3
    alone_on_valid = served_model({"feature_extraction": lucky}, train, valid, 3, [0.0, 1.0])
    assert alone_on_valid.companion is None
    everywhere = np.vstack([np.eye(3)[(labels[12:] + 1) % 3] * 0.8 + 0.2 / 3, lucky])
    lexical = np.eye(3)[np.concatenate([labels[12:], labels[:12]])] * 0.7 + 0.1
    crossed = {"feature_extraction": everywhere, "tfidf": lexical,
               "labels": np.concatenate([labels[12:], labels[:12]])}
    served = served_model({"feature_extraction": lucky}, train, valid, 3, [0.0, 1.0], crossed)
    assert served.companion is not None and served.companion.serves_alone
    assert served.report["by_encoder"]["feature_extraction"]["rows"] == len(texts)


@pytest.mark.parametrize("change, problem", [
    (lambda raw: raw.update(weight=1.5), "weight 1.5 is not in [0, 1]"),
    (lambda raw: raw.update(n_classes=5), "made for 5 classes"),
    (lambda raw: raw.update(temperature=float("nan")), "temperature nan is not in"),
    (lambda raw: raw.update(temperature=0), "temperature 0.0 is not in"),
    (lambda raw: raw.update(format="pickle"), "format 'pickle'"),
    (lambda raw: raw["coef"].pop(), "coefficient shapes"),
    (lambda raw: raw.update(classes=[0, 0, 1]), "not distinct class indexes"),
    (lambda raw: raw["vocabulary"].update({"zzz": 10 ** 6}), "vocabulary's indexes"),
    (lambda raw: raw.pop("idf"), "unreadable"),
])
def test_a_malformed_companion_is_refused_by_name(tmp_path, change, problem):
    texts, labels = rows(3)
    write_companion(fit_companion(texts, labels, np.ones(len(texts)), 3), tmp_path)
    raw = json.loads((tmp_path / COMPANION_FILE).read_text())
    change(raw)
    (tmp_path / COMPANION_FILE).write_text(json.dumps(raw))
    with pytest.raises(RegraftError, match=COMPANION_FILE) as error:
        read_companion(tmp_path, 3)
    assert problem in str(error.value)


def test_no_file_means_no_companion(tmp_path):
    assert read_companion(tmp_path, 3) is None


def predictions(labels: np.ndarray, right: int, last: bool = False) -> np.ndarray:
    """Probabilities that are right on the first (or the last) `right` rows and one class off on the rest."""
    rows = np.arange(len(labels))
    predicted = np.where(rows >= len(labels) - right if last else rows < right, labels, (labels + 1) % 3)
    return np.eye(3)[predicted] * 0.7 + 0.1


def ladder_rows(n_valid: int, n_all: int = 240):
    labels = np.arange(n_all) % 3
    return labels, labels[-n_valid:]


@pytest.mark.parametrize("fe_right, full_right, served", [
    (150, 14, "tfidf"),                # neither costlier model clearly ahead: the lexical model alone
    (150, 16, "tfidf"),                # fine-tuned right on 12 rows TF-IDF misses, wrong on 8 it gets: not clearly
    (150, 24, "full"),                 # right on every validation row where TF-IDF is right on half: clearly ahead
    (200, 0, "feature_extraction"),    # the frozen encoder clearly ahead on every cross-fitted row; full is not
])
def test_auto_serves_the_cheapest_model_no_costlier_one_clearly_beats(fe_right, full_right, served):
    """The lexical model is right on the last 144 of 240 cross-fitted rows and the last 12 of the 24 validation rows,
    each other model on its first rows; each costlier model must show a paired interval above zero over the one
    below to be served."""
    from tasks.served_choice import evidence_ladder

    labels, valid_labels = ladder_rows(24)
    weights = [{"weight": w} for w in (0.0, 1.0)]
    scoring = {"feature_extraction": (predictions(labels, fe_right), predictions(labels, 144, last=True), labels),
               "full": (predictions(valid_labels, full_right), predictions(valid_labels, 12, last=True), valid_labels)}
    tried = {name: (0.0, weights) for name in scoring}
    encoder, ladder = evidence_ladder(["feature_extraction", "full"], scoring, tried, 24, 3)
    assert ladder["served"] == served and encoder == (served if served != "tfidf" else "feature_extraction")
    assert [step["rows"] for step in ladder["steps"]] == [240, 24]
    assert all(step["taken"] == (step["interval"][0] > 0) for step in ladder["steps"])


def test_auto_keeps_the_frozen_pool_when_an_adaptive_model_is_ahead_of_it_but_not_clearly():
    """Full right on 16 of the 24 validation rows, the frozen pool on 12 (8 of them rows full gets wrong): ahead on the
    estimate, not clearly, so the frozen pool, clearly ahead of TF-IDF on the cross-fitted rows, is served."""
    from tasks.served_choice import evidence_ladder

    labels, valid_labels = ladder_rows(24)
    rows = np.arange(len(labels))
    frozen = np.eye(3)[np.where((rows < 200) | (rows >= 228), labels, (labels + 1) % 3)] * 0.7 + 0.1
    weights = [{"weight": w} for w in (0.0, 1.0)]
    scoring = {"feature_extraction": (frozen, predictions(labels, 144, last=True), labels),
               "full": (predictions(valid_labels, 16), predictions(valid_labels, 12, last=True), valid_labels)}
    encoder, ladder = evidence_ladder(["feature_extraction", "full"], scoring, {name: (0.0, weights) for name in scoring},
                                      24, 3)
    cheap, adaptive = ladder["steps"]
    assert cheap["taken"] and adaptive["difference"] > 0 and adaptive["interval"][0] < 0 and not adaptive["taken"]
    assert ladder["served"] == encoder == "feature_extraction"


def test_auto_with_cross_fitted_rows_reports_the_ladder_and_serves_the_lexical_model_alone():
    texts, labels = rows(3)
    train, valid = training_data(texts, labels), training_data(texts[:12], labels[:12])
    barely_ahead = np.eye(3)[labels[:12]] * 0.8 + 0.2 / 3  # right on the 12 validation rows: too few to be clear
    crossed = {"feature_extraction": np.vstack([np.full((36, 3), 1 / 3), barely_ahead]),
               "tfidf": np.vstack([np.eye(3)[labels[12:]] * 0.7 + 0.1, np.eye(3)[labels[:12]] * 0.7 + 0.1]),
               "labels": np.concatenate([labels[12:], labels[:12]])}
    served = served_model({"feature_extraction": barely_ahead, "full": barely_ahead}, train, valid, 3,
                          [0.0, 0.5, 1.0], crossed)
    assert served.companion is not None and served.companion.serves_alone
    assert served.report["evidence_ladder"]["served"] == "tfidf"
    assert [step["to"] for step in served.report["evidence_ladder"]["steps"]] == ["feature_extraction", "full"]
    from tasks.render import ladder_text
    from tasks.reports import ServedChoice

    shown = ladder_text(ServedChoice.model_validate(served.report).evidence_ladder)  # the model card's and the run's line
    assert shown.startswith("Served the cheapest model no costlier one clearly beats") and "tfidf -> full on 12 rows" in shown


@pytest.mark.parametrize("pooled_frozen, says, not_says", [
    (True, "the frozen encoder pooled with the lexical model clearly beats", "does not beat a lexical model"),
    # No pool served (too few validation rows, no lexical model, or a ladder without the step): the race's words stand.
    (False, "negative transfer on this data: the pretrained encoder does not beat", None),
])
def test_the_reason_says_what_is_served_when_the_race_put_the_lexical_model_first(pooled_frozen, says, not_says):
    """The race ranked TF-IDF above the frozen head alone (its reason: negative transfer); when the ladder serves the
    frozen encoder pooled with TF-IDF, the reason must not say the encoder loses to the lexical model."""
    from tasks.strategy import NEGATIVE_TRANSFER, POOLED_IS_AHEAD, served_reason

    race = f"{NEGATIVE_TRANSFER} (lora - tfidf on the validation rows -0.2 [-0.3, -0.1]): the candidate is the cheap model"
    served_as = "(1 - 0.5) x the frozen encoder with its trained head + 0.5 x TF-IDF"
    reason, cheap = served_reason(race, "feature_extraction", "feature_extraction", served_as, False, True, pooled_frozen)
    assert says in reason and cheap
    assert not_says is None or (not_says not in reason and served_as in reason)
    # The run's one-line summary (pipelines/finetune.py prints the reason up to its first parenthesis).
    assert reason.split(" (")[0] == (f"{POOLED_IS_AHEAD}: the frozen encoder's pool is served" if pooled_frozen
                                     else NEGATIVE_TRANSFER)


def test_the_ladders_step_to_the_frozen_pool_is_read_from_the_served_model():
    """pools_frozen_over_lexical is true only when the ladder took the step from TF-IDF to the frozen encoder and a
    pool (neither model alone) is served."""
    from tasks.served_choice import pools_frozen_over_lexical, served_model

    texts, labels = rows(3)
    train, valid = training_data(texts, labels), training_data(texts[:12], labels[:12])
    right = np.eye(3)[np.concatenate([labels[12:], labels[:12]])]
    crossed = {"feature_extraction": right * 0.6 + 0.4 / 3, "tfidf": np.vstack([np.full((36, 3), 1 / 3), right[36:]]),
               "labels": np.concatenate([labels[12:], labels[:12]])}
    ahead = served_model({"feature_extraction": right[36:]}, train, valid, 3, [0.5, 1.0], crossed)
    assert ahead.report["evidence_ladder"]["steps"][0]["taken"] and pools_frozen_over_lexical(ahead)
    alone = served_model({"feature_extraction": right[36:]}, train, valid, 3, [0.0, 1.0], crossed)
    assert alone.encoder == "feature_extraction" and alone.companion is None and not pools_frozen_over_lexical(alone)
    behind = served_model({"feature_extraction": right[36:]}, train, valid, 3, [0.5, 1.0],
                          {**crossed, "feature_extraction": crossed["tfidf"], "tfidf": crossed["feature_extraction"]})
    assert behind.companion.serves_alone and not pools_frozen_over_lexical(behind)
