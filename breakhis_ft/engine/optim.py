"""The optimizer's parameter groups and the default AdamW (the config names the optimizer)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: decayed matrices; biases and norms without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or "norm" in name.lower() or name.endswith("bias")
        (no_decay if plain else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the classifier has no trainable parameters (check peft / freeze options)")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(params: list[dict[str, Any]], lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """torch AdamW, fused where the device and dtype support it (`trainer/optimizer=adamw`)."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, ValueError) as err:
        log.info("fused AdamW unavailable (%s); using the default implementation", err)
        return torch.optim.AdamW(params, lr=lr, **kwargs)
