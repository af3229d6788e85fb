"""The optimizer side of a step: AdamW's parameter groups, the learning-rate schedule, clipping and the step.

learning_rate is transformers' linear/cosine schedule as a pure function of the step, so a resumed run sets
exactly the rate an uninterrupted one would have.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import distributed
from .config import TrainConfig
from .inject import lora_config_of, lora_layers


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """transformers' linear/cosine schedule with linear warmup, as a pure function of the step."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps of a run, rounded up as transformers' TrainingArguments.get_warmup_steps (TRL's schedule)."""
    return math.ceil(warmup_ratio * total_steps)  # int() dropped a partial step: 0.1 of 6 steps gave no warmup


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over adapter and head only; the head may have its own learning rate.

    LoRA+ (Hayou et al. 2024; PEFT's create_loraplus_optimizer): lr_B = loraplus_lr_ratio x lr_A. With B = 0 at
    init and B's fan-in r far below A's fan-in d_in, one learning rate is either too small for B or too large for A;
    a larger step on B lets the update B A grow as fast as the features need (the paper suggests a ratio of 16).
    The head keeps its own group at head_lr (PEFT puts a 2-D head weight in A's group at lr, the same as ours by
    default, but every 1-D parameter, e.g. a head bias, in B's group: a rule for lora_B's bias, not for a head).
    """
    head_names = tuple(f"{name}." for name in lora_config_of(model).modules_to_save)
    head, adapter = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith(head_names) else adapter).append(param)
    groups = [{"params": adapter, "lr": config.lr, "peak_lr": config.lr}]
    if config.loraplus_lr_ratio is not None:  # group 0 stays A's, at lr: the lr logged and checked
        ids_B = {id(layer.lora_B.weight) for _, layer in lora_layers(model)}
        # PEFT's rule puts every 1-D adapter tensor in B's group: DoRA's magnitude m too
        ids_B |= {id(layer.lora_magnitude_vector) for _, layer in lora_layers(model) if layer.use_dora}
        lr_B = config.lr * config.loraplus_lr_ratio
        groups = [{"params": [p for p in adapter if id(p) not in ids_B], "lr": config.lr, "peak_lr": config.lr},
                  {"params": [p for p in adapter if id(p) in ids_B], "lr": lr_B, "peak_lr": lr_B}]
    head_lr = config.head_lr or config.lr
    groups.append({"params": head, "lr": head_lr, "peak_lr": head_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def trained_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimizer updates (adapter and head), across its groups."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_gradients(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   max_grad_norm: float) -> torch.Tensor:
    """Unscale and clip the global gradient norm; returns the norm before clipping (the same on every rank), a
    0-dim tensor left on the device."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trained_parameters(optimizer), max_grad_norm)
    return distributed.full_tensor(grad_norm)  # a DTensor under FSDP


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Step (fp16's scaler skips a step with inf/NaN gradients) and zero the grads."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
