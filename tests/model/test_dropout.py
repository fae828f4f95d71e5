"""tasks/dropout.py: the cheaper CPU dropout drops at the configured rate, keeps the expectation, follows torch's seed,
and leaves the model as transformers' eager attention computes it when nothing is dropped."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.dropout import FastDropout, drop_mask, fast_dropout, register_attention, replace_dropout_modules
from tasks.models import load_classifier

pytestmark = pytest.mark.model
LABELS = ["negative", "neutral", "positive"]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_drop_mask_drops_at_the_rate_in_each_of_the_four_lanes_of_a_word(p):
    n = 400_000
    dropped = drop_mask(torch.Size([n]), p, torch.device("cpu")).view(-1, 4).float()
    # Every 16-bit lane of the 64-bit words, not only their mean: a lane that always kept (a sign bit never set,
    # as `random_()` on int64 gives) would show here. 5 standard errors of a binomial proportion.
    tolerance = 5 * (p * (1 - p) / (n / 4)) ** 0.5
    assert torch.all((dropped.mean(0) - p).abs() < tolerance), dropped.mean(0)


def test_fast_dropout_keeps_the_expectation_and_follows_the_seed():
    x = torch.rand(200_000) + 0.5
    torch.manual_seed(3)
    first = fast_dropout(x, 0.2, training=True)
    torch.manual_seed(3)
    again = fast_dropout(x, 0.2, training=True)
    assert torch.equal(first, again)
    kept = first != 0
    assert torch.allclose(first[kept], x[kept] / 0.8)
    assert abs(first.mean().item() / x.mean().item() - 1) < 0.01
    assert fast_dropout(x, 0.2, training=False) is x and fast_dropout(x, 0.0, training=True) is x
    assert torch.count_nonzero(fast_dropout(x, 1.0, training=True)) == 0


def test_gradients_flow_through_the_kept_elements_only():
    x = torch.ones(1000, requires_grad=True)
    out = fast_dropout(x, 0.3, training=True)
    out.sum().backward()
    assert torch.equal(x.grad, (out.detach() != 0).float() / 0.7)


def test_model_with_fast_dropout_is_the_eager_model_in_eval_and_saves_no_trace_of_it(tiny_bert, tmp_path):
    torch.manual_seed(0)
    fast = load_classifier(tiny_bert, LABELS, attn_implementation=register_attention())
    eager = load_classifier(tiny_bert, LABELS, attn_implementation="eager")
    eager.load_state_dict(fast.state_dict())
    fast.eval()
    swapped = replace_dropout_modules(fast)
    assert not any(m.training for m in fast.modules())  # a model in eval mode stays in it
    assert swapped == sum(type(m) is torch.nn.Dropout for m in eager.modules()) > 0
    assert not any(type(m) is torch.nn.Dropout for m in fast.modules())
    assert all(m.p == 0.1 for m in fast.modules() if isinstance(m, FastDropout))
    ids = torch.randint(1000, 2000, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding goes through the attention mask as in eager
    with torch.no_grad():
        assert torch.allclose(fast.eval()(input_ids=ids, attention_mask=mask).logits,
                              eager.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
        # In training the two draw different masks, but both drop: two seeded passes differ from eval's output.
        fast.train()
        torch.manual_seed(1)
        assert not torch.allclose(fast(input_ids=ids).logits, fast.eval()(input_ids=ids).logits)
    fast.save_pretrained(tmp_path)  # the saved config names no attention function that only this process knows
    assert not any("attn" in key for key in json.loads((tmp_path / "config.json").read_text()))
