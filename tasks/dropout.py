"""Dropout for training on CPU, with its random mask drawn four times cheaper than torch's.

Profiled on the demo (py-spy, 2-core AMD EPYC, bf16): torch's CPU dropout took 57 of the finetune stage's 180
seconds, more than every linear layer's forward together. The cost is the random draw, one 32- or 64-bit number per
element (about 250 million a second here), not the multiply. This draws 64-bit words from torch's own generator and
reads each as four 16-bit numbers: an element is dropped when its number is below round(p * 2**16), so the rate is p
to within 1e-5, and the draw stays seeded by `torch.manual_seed` and saved by `torch.get_rng_state` (a resumed run
still ends with the weights of an uninterrupted one). On CUDA torch's fused kernel is fast, so nothing changes there.

Two places drop: every `torch.nn.Dropout` module (hidden states, embeddings, LoRA's input dropout), replaced by
`FastDropout` with the same p, and the attention probabilities, which BERT-family models drop inside their attention
function rather than through the module: a copy of transformers' eager attention with this dropout is registered
under ATTENTION and the model is loaded with it.
"""

from __future__ import annotations

import math

import torch

ATTENTION = "regraft_cpu_eager"  # the attention function's name in transformers' AttentionInterface
_LEVELS = 1 << 16


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """True where an element is dropped: each with probability round(p * 2**16) / 2**16."""
    n = math.prod(shape)
    words = torch.randint(torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max, ((n + 3) // 4,),
                          dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n].view(shape) < round(p * _LEVELS) - _LEVELS // 2


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p, training)` with the cheaper mask: kept elements are scaled by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return x.masked_fill(drop_mask(x.shape, p, x.device), 0.0) * (1.0 / (1.0 - p))


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


def eager_attention_fast_dropout(module, query, key, value, attention_mask, scaling=None,
                                 dropout: float = 0.0, **kwargs):
    """transformers' eager attention for encoder models (BERT's `eager_attention_forward`), with this module's dropout
    on the attention probabilities."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1)
    weights = fast_dropout(weights, dropout, module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def register_attention() -> str:
    """Make ATTENTION loadable (`attn_implementation=ATTENTION`), with eager attention's additive mask (an unknown
    name would get SDPA's boolean one, which the addition above would read as "attend everywhere"); idempotent.
    Called when a model is loaded for training, not at import."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION, eager_attention_fast_dropout)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return ATTENTION
