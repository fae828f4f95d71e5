"""Dropout for training an encoder on a CPU, with its random mask drawn about four times cheaper than torch's.

Profiled on the demo (py-spy, 2-core AMD EPYC, bf16): torch's CPU dropout took 57 of the finetune stage's 180
seconds, more than every linear layer's forward together. The cost is the random draw, one 32- or 64-bit number per
element (about 250 million a second here), not the multiply. This draws 64-bit words and reads each as four 16-bit
numbers: an element is dropped when its number is below round(p * 2**16), so the rate is p to within 1e-5 (the
scaling uses that exact rate). Each call takes one number from torch's generator and draws its words from a generator
seeded with it, so the global generator advances by one draw per call whatever the tensor's size, as torch's MKL
dropout did: seeded by `torch.manual_seed`, saved by `torch.get_rng_state`, and the data-parallel ranks, whose
batches differ in size, stay in step (a resumed run still ends with the weights of an uninterrupted one). On CUDA
torch's fused kernel is fast, and nothing changes there.

Two places drop: every `torch.nn.Dropout` module (hidden states, embeddings, the classifier, LoRA's input dropout),
replaced by `FastDropout` with the same p, and, in the model types whose eager attention is BERT's, the attention
probabilities, which those models drop inside their attention function rather than through the module: a copy of that
function with this dropout is registered under ATTENTION. Other model types keep their own eager attention (and its
dropout). The heads trained on cached features (feature_extraction, the linear probe) keep torch's dropout: their
tensors are small.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ATTENTION = "regraft_cpu_eager"  # the attention function's name in transformers' AttentionInterface
# Model types whose eager attention in transformers 5 is BERT's `eager_attention_forward` (the same arguments and
# arithmetic), so the copy below replaces it, up to rounding; ModernBERT (softmax in fp32) and DeBERTa (its own
# attention) are not among them.
BERT_EAGER_ATTENTION = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert",
                                  "mobilebert"})
_LEVELS = 1 << 16


def drop_level(p: float) -> int:
    """Of 2**16 equally likely 16-bit numbers, how many drop an element: the rate actually applied is this / 2**16."""
    return min(max(round(p * _LEVELS), 0), _LEVELS)


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True where an element is dropped: each with probability drop_level(p) / 2**16."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the one draw from torch's generator, whatever n is
    words = random_words((n + 3) // 4, seed, torch.device(device))
    return words.view(torch.int16)[:n].view(shape) < drop_level(p) - _LEVELS // 2


def random_words(count: int, seed: int, device: torch.device) -> torch.Tensor:
    """`count` random 64-bit words from a generator seeded with `seed`: on a CPU numpy's SFC64, which drew them twice
    as fast as torch's Mersenne Twister (2-core AMD EPYC: 0.23 against 0.49 ms for the 169,000 words of a 384-wide
    hidden state at batch 16), elsewhere torch's generator on the device."""
    if device.type == "cpu":
        return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))
    return torch.randint(torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max, (count,), dtype=torch.int64,
                         device=device, generator=torch.Generator(device).manual_seed(seed))


def keep_scale(p: float, training: bool = True) -> float:
    """What the kept elements are multiplied by: one over the rate at which they are kept (1 when nothing is
    dropped, 0 when everything is)."""
    level = drop_level(p)
    if not training or level == 0:
        return 1.0
    return 0.0 if level == _LEVELS else _LEVELS / (_LEVELS - level)


def fast_dropout(x: torch.Tensor, p: float, training: bool, scaled: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p, training)` with the cheaper mask: kept elements are scaled by one over the
    kept rate (`scaled=False`: left as they are, for a caller that scales a smaller product by keep_scale instead)."""
    level = drop_level(p)
    if not training or level == 0:
        return x
    if level == _LEVELS:
        return x * 0.0
    # Multiplying by a 0/1 tensor of x's dtype is masked_fill(mask, 0) for finite values (up to the sign of a zero;
    # an inf or NaN that is dropped gives NaN, as it would after the next layer anyway) and, forward and backward, a
    # fifth to a quarter cheaper on a CPU (bf16, batch 16: 1.8 -> 1.5 ms for a 384-wide hidden state, 6.2 -> 4.6 ms
    # for the attention probabilities).
    dropped = x * drop_mask(x.shape, p, x.device).logical_not_().to(x.dtype)
    return dropped * keep_scale(p) if scaled else dropped


class FastDropout(torch.nn.Dropout):
    """A `torch.nn.Dropout` (same p, same place in the model) that drops with `fast_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def replace_dropout_modules(model: torch.nn.Module) -> int:
    """Swap every plain `torch.nn.Dropout` in the model for a FastDropout with the same p; how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                # In the mode of the one it replaces: a model in eval mode must not start dropping.
                setattr(parent, name, FastDropout(child.p).train(child.training))
                swapped += 1
    return swapped


def use_fast_dropout(model: torch.nn.Module) -> None:
    """The model (a transformers model, or peft's wrapper of one) as it trains on a CPU: every Dropout module
    swapped, and the attention function too where the model type's eager attention is BERT's and eager runs now."""
    replace_dropout_modules(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if (getattr(config, "model_type", None) in BERT_EAGER_ATTENTION
            and getattr(config, "_attn_implementation", None) == "eager"):
        base.set_attn_implementation(register_attention())


def eager_attention_fast_dropout(module, query, key, value, attention_mask, scaling=None,
                                 dropout: float = 0.0, **kwargs):
    """transformers' eager attention for BERT-type encoders (`eager_attention_forward`), with this module's dropout on
    the attention probabilities, and fewer passes over the (batch, heads, length, length) scores, a step's largest
    tensors (py-spy on the demo's fine-tuning: the dropout's passes over them a sixth of the process): the query is
    scaled rather than the scores, the probabilities are cast to the values' dtype (as the product does under autocast
    anyway) before the mask, and the keep rate scales the product, which has head-size columns where the
    probabilities have length. The same arithmetic as transformers' up to rounding. Returns the attention
    probabilities before dropout."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1)
    kept = fast_dropout(weights.to(value.dtype), dropout, module.training, scaled=False)
    output = torch.matmul(kept, value)
    if (scale := keep_scale(dropout, module.training)) != 1.0:
        output = output * scale
    return output.transpose(1, 2).contiguous(), weights


def register_attention() -> str:
    """Make ATTENTION usable (`set_attn_implementation(ATTENTION)`), with eager attention's additive mask: transformers
    builds no mask at all for a name its mask registry does not know, and the padding would be attended to.
    Idempotent; called when a model is prepared for training, not at import."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, eager_attention_fast_dropout)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return ATTENTION
