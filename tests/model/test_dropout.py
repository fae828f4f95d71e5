"""tasks/dropout.py: the cheaper CPU dropout drops at the configured rate, keeps the expectation, follows torch's seed,
drops the attention probabilities too, and leaves the model as transformers' eager attention computes it when nothing
is dropped."""

from __future__ import annotations

import pytest
import torch

from tasks.dropout import (
    ATTENTION, FastDropout, drop_mask, eager_attention_fast_dropout, fast_dropout, use_fast_dropout,
)
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


def test_a_draw_advances_torchs_generator_by_one_number_whatever_the_size():
    """Data-parallel ranks drop on batches of different widths: their generators must stay in step for a resumed run
    to end where an uninterrupted one does (the checkpoint keeps rank 0's state for all)."""
    after = []
    for n in (10, 100_000):
        torch.manual_seed(5)
        drop_mask(torch.Size([n]), 0.1, torch.device("cpu"))
        after.append(torch.get_rng_state())
    assert torch.equal(*after)


def test_rates_that_round_to_nothing_or_everything():
    x = torch.ones(1000)
    assert fast_dropout(x, 1e-7, training=True) is x  # below one level in 2**16: nothing dropped, nothing scaled
    assert torch.count_nonzero(fast_dropout(x, 1 - 1e-7, training=True)) == 0


def test_gradients_flow_through_the_kept_elements_only():
    x = torch.ones(1000, requires_grad=True)
    out = fast_dropout(x, 0.3, training=True)
    out.sum().backward()
    assert torch.allclose(x.grad, (out.detach() != 0).float() / 0.7, rtol=1e-4)  # the rate is 0.3 to 2**-16


def test_model_with_fast_dropout_is_the_eager_model_in_eval(tiny_bert):
    torch.manual_seed(0)
    fast = load_classifier(tiny_bert, LABELS, attn_implementation="eager")
    eager = load_classifier(tiny_bert, LABELS, attn_implementation="eager")
    eager.load_state_dict(fast.state_dict())
    fast.eval()
    use_fast_dropout(fast)
    assert fast.config._attn_implementation == ATTENTION
    assert not any(m.training for m in fast.modules())  # a model in eval mode stays in it
    assert sum(isinstance(m, FastDropout) for m in fast.modules()) == \
        sum(type(m) is torch.nn.Dropout for m in eager.modules()) > 0
    assert not any(type(m) is torch.nn.Dropout for m in fast.modules())
    assert all(m.p == 0.1 for m in fast.modules() if isinstance(m, FastDropout))
    ids = torch.randint(1000, 2000, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding goes through the attention mask as in eager
    with torch.no_grad():
        assert torch.allclose(fast.eval()(input_ids=ids, attention_mask=mask).logits,
                              eager.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


def test_the_attention_probabilities_drop_too(tiny_bert):
    """Every dropout off but the attention's: a training pass still differs from eval, through the registered
    attention function alone."""
    model = load_classifier(tiny_bert, LABELS, attention_dropout=0.5, attn_implementation="eager")
    use_fast_dropout(model)
    for name, module in model.named_modules():
        if isinstance(module, FastDropout) and not name.endswith("attention.self.dropout"):
            module.p = 0.0
    ids = torch.randint(1000, 2000, (3, 17))
    with torch.no_grad():
        evaluated = model.eval()(input_ids=ids).logits
        model.train()
        assert not torch.allclose(model(input_ids=ids).logits, evaluated)
        for name, module in model.named_modules():
            if name.endswith("attention.self.dropout"):
                module.p = 0.0
        assert torch.allclose(model(input_ids=ids).logits, evaluated, atol=1e-6)


@pytest.mark.parametrize("p,dtype", [(0.1, torch.float32), (1.0, torch.float32), (0.1, torch.bfloat16)])
def test_the_attention_drops_its_probabilities_as_dropout_does_with_fewer_passes(p, dtype):
    """The attention's own arithmetic (the query scaled, the mask applied in the values' dtype, the keep rate on the
    product) gives what dropout on the softmax probabilities gives, the same elements dropped under the same seed,
    in value and gradient, up to rounding: in fp32, and under bf16 autocast as CPU training runs it (fp32 mask and
    probabilities, bf16 values). It returns the probabilities before dropout."""
    torch.manual_seed(1)
    query, key, value = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 7)
    mask[0, ..., 5:] = torch.finfo(torch.float32).min  # padding
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2

    def run(attention):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            output, weights = attention()
        return output.float(), weights, torch.autograd.grad(output.float().square().sum(), (query, key, value))

    def reference():
        weights = torch.softmax(query @ key.transpose(2, 3) * 8 ** -0.5 + mask, dim=-1)
        return (fast_dropout(weights, p, training=True) @ value).transpose(1, 2), weights

    module = torch.nn.Module().train()
    output, weights, grads = run(lambda: eager_attention_fast_dropout(module, query, key, value, mask, dropout=p))
    expected, expected_weights, expected_grads = run(reference)
    assert torch.allclose(weights.float(), expected_weights.float(), atol=tolerance)
    assert torch.allclose(output, expected, atol=tolerance), (output - expected).abs().max()
    assert all(torch.allclose(g, e, atol=tolerance * 10) for g, e in zip(grads, expected_grads))
    # And the dropout did drop: at p=0.1 the output is not the undropped one; at p=1 it is all zeros.
    torch.manual_seed(5)
    undropped, _ = eager_attention_fast_dropout(module.eval(), query, key, value, mask, dropout=p)
    assert (output == 0).all() if p == 1.0 else not torch.allclose(output, undropped.float(), atol=tolerance)


@pytest.mark.parametrize("strategy,cpu_dropout", [("full", "fast"), ("lora", "fast"), ("full", "torch")])
def test_training_on_a_cpu_prepares_the_model_with_it(tiny_bert, strategy, cpu_dropout):
    """finetune's preparation swaps every Dropout, LoRA's own input dropout included, and sets the attention;
    train.cpu_dropout torch keeps torch's dropout and eager attention."""
    from tasks.devices import choose_runtime
    from tasks.finetune import prepare_for_training
    from tests.model.test_finetune import train_config

    cfg, _ = train_config(strategy=strategy, cpu_dropout=cpu_dropout)
    model = prepare_for_training(load_classifier(tiny_bert, LABELS, attn_implementation="eager"), strategy, cfg,
                                 choose_runtime("fp32"))
    if cpu_dropout == "torch":
        assert not any(isinstance(m, FastDropout) for m in model.modules())
        assert model.config._attn_implementation == "eager"
        return
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    if strategy == "lora":
        assert any(isinstance(m, FastDropout) for name, m in model.named_modules() if "lora_dropout" in name)
    assert model.config._attn_implementation == ATTENTION
