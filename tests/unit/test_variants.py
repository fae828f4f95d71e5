"""Reduced-precision serving variants (tasks/variants.py): judged against fp32 on the same texts, and chosen only
when faithful and clearly faster."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.variants import FP32, Measured, choose_variant, judge_variant

pytestmark = pytest.mark.unit


def one_hot(labels: list[int], k: int = 3) -> np.ndarray:
    proba = np.full((len(labels), k), 0.1)
    proba[np.arange(len(labels)), labels] = 0.8
    return proba


def test_a_variant_that_agrees_and_keeps_the_metric_is_faithful_and_one_that_flips_labels_is_not():
    truth = np.array([0, 1, 2] * 100)
    fp32 = Measured(one_hot(list(truth)), seconds=2.0)
    same = judge_variant(fp32, Measured(one_hot(list(truth)), seconds=0.8), truth, margin=0.02, confidence=0.9)
    assert same["faithful"] and same["agreement"] == 1.0 and same["speedup"] == 2.5 and same["interval"] == [0.0, 0.0]
    flipped = list(truth)
    for i in range(0, 30):  # 10% of the texts change label
        flipped[i] = (flipped[i] + 1) % 3
    worse = judge_variant(fp32, Measured(one_hot(flipped), seconds=0.5), truth, margin=0.02, confidence=0.9)
    assert not worse["faithful"] and worse["agreement"] == 0.9
    assert any("agrees with fp32 on 90.0%" in p for p in worse["problems"])
    assert any("reaches below -0.02" in p for p in worse["problems"])
    moving = judge_variant(fp32, Measured(one_hot(list(truth)), seconds=0.8, batch_spread=0.03), truth, margin=0.02,
                           confidence=0.9)  # answers that move with the batch's other texts (dynamic int8)
    assert not moving["faithful"] and "with the other texts in its batch" in moving["problems"][0]
    int8 = judge_variant(fp32, Measured(one_hot(list(truth)), seconds=0.5), truth, margin=0.02, confidence=0.9,
                         name="int8")  # faithful on these texts, but batch-dependent by construction: never served
    assert not int8["faithful"] and "depends on the other texts batched with it" in int8["problems"][0]


def test_the_fastest_faithful_variant_serves_only_when_clearly_faster():
    faithful = {"faithful": True, "problems": [], "agreement": 1.0, "macro_f1_difference": 0.0, "interval": [0.0, 0.0]}
    assert choose_variant({"bf16": {**faithful, "speedup": 2.4}, "int8": {**faithful, "speedup": 1.6}})[0] == "bf16"
    assert choose_variant({"bf16": {**faithful, "speedup": 1.05}}) == (FP32, "fp32: bf16 only 1.05x fp32 (< 1.1x)")
    unfaithful = {**faithful, "faithful": False, "problems": ["agrees with fp32 on 97.0% of the texts (< 99%)"],
                  "speedup": 3.0}
    precision, why = choose_variant({"bf16": unfaithful, "int8": {**faithful, "speedup": 1.3}})
    assert precision == "int8" and why.startswith("int8: 1.30x fp32 here")
    assert choose_variant({"bf16": unfaithful}) == (FP32, "fp32: bf16 agrees with fp32 on 97.0% of the texts (< 99%)")
    assert choose_variant({})[0] == FP32


def test_an_int8_variant_loads_and_predicts_like_the_service(tiny_bert, tmp_path):
    """The int8 variant as a check measures it: Linear layers quantized, probabilities per text that sum to 1 (on the
    CPU, where quantized kernels run, whatever else the machine has)."""
    import torch

    from tasks.models import load_classifier, load_tokenizer
    from tasks.serving import load_model, predict, serving_precision

    torch.manual_seed(0)
    load_classifier(tiny_bert, ["a", "b"]).save_pretrained(tmp_path / "model")
    load_tokenizer(tiny_bert).save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model", "m:1", 32, "int8")
    assert loaded.precision == "int8"
    assert any("Quantized" in type(module).__name__ or "quantized" in type(module).__module__
               for module in loaded.model.modules())
    rows = predict(loaded, ["works well", "no effect"])
    assert [abs(sum(r["probabilities"].values()) - 1) < 1e-3 for r in rows] == [True, True]
    assert serving_precision({}) == ("fp32", "no reduced-precision variant was checked for this model")
    # int8 is never served, whatever a record says (its answers depend on the batch).
    assert serving_precision({"precision": "int8", "reason": "int8: 1.5x"})[0] == "fp32"
    assert serving_precision({"precision": "fp16"})[0] == "fp32"


def test_a_bf16_variant_keeps_its_weights_in_bf16_and_answers_exactly_as_autocast_from_fp32(tiny_bert, tmp_path):
    """The served bf16 variant stores its Linear layers in bf16 once instead of autocast casting them on every
    forward pass; the probabilities are the same bits as the fp32 model's under bf16 autocast (what the check of
    the variant measured before), one text or a batch."""
    import torch

    from tasks.devices import choose_runtime
    from tasks.models import load_classifier, load_tokenizer
    from tasks.serving import load_model, predict_probabilities

    torch.manual_seed(0)
    load_classifier(tiny_bert, ["a", "b"]).save_pretrained(tmp_path / "model")
    load_tokenizer(tiny_bert).save_pretrained(tmp_path / "model")
    bf16 = load_model(tmp_path / "model", "m:1", 32, "bf16")
    linear = [m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(m.weight.dtype == torch.float32 for m in bf16.model.modules() if isinstance(m, torch.nn.LayerNorm))
    fp32 = load_model(tmp_path / "model", "m:1", 32, "fp32")
    texts = ["works well", "no effect at all on the pain", "made me dizzy"]
    autocast = predict_probabilities(fp32, texts, runtime=choose_runtime("bf16"))
    assert np.array_equal(predict_probabilities(bf16, texts), autocast)
    assert np.array_equal(predict_probabilities(bf16, texts[1:2]),
                          predict_probabilities(fp32, texts[1:2], runtime=choose_runtime("bf16")))


def test_batches_are_cut_where_padding_would_cost_more_than_a_pass():
    """tasks/models.py length_batches: every row once, in ascending length, within the row and token limits, at the
    least padded tokens plus passes; eight short texts and two long ones go in two passes, not one padded to 200."""
    import itertools
    import random

    from tasks.models import length_batches

    assert length_batches([10] * 8 + [200] * 2, 64, 2048, 40) == [list(range(8)), [8, 9]]
    assert length_batches([10] * 8 + [200] * 2, 64, 2048, 10**6) == [list(range(10))]  # passes priced above padding
    assert length_batches([300, 5], 64, 256, 40) == [[1], [0]]  # longer than the budget: alone
    with pytest.raises(ValueError, match="batch_size"):
        length_batches([3, 4], 0, 2048)

    def cost(batches, lengths):
        return sum(40 + len(b) * max(lengths[i] for i in b) for b in batches)

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
        batches = length_batches(lengths, 3, 120, 40)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 120) for b in batches)
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths)
                   for n in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), n)
                   if all(b - a <= 3 and (b - a == 1 or (b - a) * lengths[order[b - 1]] <= 120)
                          for a, b in zip((0, *cuts), (*cuts, len(order)))))
        assert cost(batches, lengths) == best


def test_fp32_served_on_onednn_answers_like_torchs_own_kernel(tiny_bert, tmp_path, monkeypatch):
    """Where this machine measured oneDNN faster, the fp32 model's Linear layers run on it: the same labels and
    probabilities within float rounding of torch's own kernel, one text or a batch."""
    import torch

    from tasks import devices
    from tasks.models import OneDnnLinear, load_classifier, load_tokenizer
    from tasks.serving import load_model, predict_probabilities

    if not devices.onednn_linear_available() or torch.cuda.is_available():
        pytest.skip("fp32 on oneDNN: a CPU machine whose torch has oneDNN's Linear kernel")
    torch.manual_seed(0)
    load_classifier(tiny_bert, ["a", "b"]).save_pretrained(tmp_path / "model")
    load_tokenizer(tiny_bert).save_pretrained(tmp_path / "model")
    texts = ["works well", "no effect at all on the pain", "made me dizzy"]
    monkeypatch.setattr(devices, "onednn_fp32_speedup", lambda: 1.0)
    mkl = load_model(tmp_path / "model", "m:1", 32, "fp32")
    assert not any(isinstance(m, OneDnnLinear) for m in mkl.model.modules())
    monkeypatch.setattr(devices, "onednn_fp32_speedup", lambda: 1.5)
    on_onednn = load_model(tmp_path / "model", "m:1", 32, "fp32")
    assert any(isinstance(m, OneDnnLinear) for m in on_onednn.model.modules())
    torch_linear, calls = torch.nn.functional.linear, []
    for rows in (texts, texts[1:2]):
        expected = predict_probabilities(mkl, rows)
        monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: calls.append(1) or torch_linear(*args))
        served = predict_probabilities(on_onednn, rows)
        monkeypatch.setattr(torch.nn.functional, "linear", torch_linear)
        assert not calls  # every Linear layer ran on oneDNN
        assert np.allclose(served, expected, atol=1e-5) and np.array_equal(served.argmax(1), expected.argmax(1))
