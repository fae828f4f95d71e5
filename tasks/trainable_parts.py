"""Which parts of a BERT-style classifier train under each strategy, and at which learning rate: the encoder's blocks,
the head, LoRA adapters, the blocks gradual unfreezing thaws epoch by epoch, and the optimiser's parameter groups."""

from __future__ import annotations

import warnings

import torch

from tasks.config import TrainConfig
from tasks.errors import ConfigError


def encoder_blocks(model) -> list[torch.nn.Module]:
    base = model.base_model
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: gradual_unfreeze and feature_extraction need a "
                          "BERT-style encoder (base_model.encoder.layer); use full or lora")
    return list(layers)


def head_modules(model) -> list[torch.nn.Module]:
    """The head on the frozen encoder: the pooler (if any) and the classifier, which LP-FT's probe trains and
    cross-fitting restores per fold (feature_extraction solves the classifier alone: tasks/finetune.py
    fit_linear_head)."""
    pooler = getattr(model.base_model, "pooler", None)
    return [m for m in (pooler, model.classifier) if m is not None]


def is_no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def param_groups(model, strategy: str, cfg: TrainConfig) -> list[dict]:
    """Optimiser groups: head at head_learning_rate; LoRA adapters at lora.learning_rate; encoder at
    learning_rate, decayed per block downwards for gradual_unfreeze; no weight decay on biases and LayerNorm."""
    head_ids = {id(p) for m in head_modules(model) for p in m.parameters()} if hasattr(model, "classifier") else set()
    depth: dict[int, int] = {}
    below_all = 0
    if strategy == "gradual_unfreeze":
        blocks = encoder_blocks(model)
        below_all = len(blocks)  # the embeddings sit under the bottom block
        for i, block in enumerate(blocks):
            for p in block.parameters():
                depth[id(p)] = len(blocks) - 1 - i
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and strategy != "gradual_unfreeze":
            continue
        if id(p) in head_ids:
            lr = cfg.head_learning_rate
        elif strategy == "lora" and "lora_" in name:
            lr = cfg.lora.learning_rate
        elif strategy == "gradual_unfreeze":
            lr = cfg.learning_rate * cfg.layer_lr_decay ** depth.get(id(p), below_all)
        else:
            lr = cfg.learning_rate
        decay = 0.0 if is_no_decay(name) else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def unfreeze_for_epoch(model, epoch: int) -> int:
    """gradual_unfreeze: head plus the top `epoch + 1` blocks train; embeddings join last."""
    blocks = encoder_blocks(model)
    for p in model.parameters():
        p.requires_grad = False
    for m in head_modules(model):
        for p in m.parameters():
            p.requires_grad = True
    thawed = min(epoch + 1, len(blocks))
    for block in blocks[len(blocks) - thawed:]:
        for p in block.parameters():
            p.requires_grad = True
    if epoch + 1 > len(blocks):
        for p in model.base_model.embeddings.parameters():
            p.requires_grad = True
    return thawed


def wrap_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                        lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` property: a FutureWarning meant for peft,
        # which a user of regraft can do nothing about.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def lora_inputs_stay_in_autocast_dtype(model) -> int:
    """Under autocast, stop peft casting each adapted layer's input to the adapter's fp32 before its dropout and
    lora_A: autocast casts it back to bf16 for lora_A anyway. The inputs that come from a bf16 matmul (attention.output
    and output.dense; the others leave LayerNorm in fp32) were copied twice and dropped in fp32: a tenth of a LoRA
    step on a 2-core CPU. With tasks/dropout.py's dropout, which scales in fp32 whatever the input's dtype, outputs
    and gradients are bit for bit the same (tests/model/test_finetune.py); torch's CPU dropout would scale in bf16,
    so it is used with that dropout only. How many layers it changed."""
    changed = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):  # peft's LoRA layers (peft.helpers.disable_input_dtype_casting)
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
