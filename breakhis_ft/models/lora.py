"""The peft adapter config of a run, built once from the `peft` group (or None: no adapter).

Each model family then fills in its own `target_modules` (Gemma 3: the language model or all
linear layers; SigLIP: the encoder layers) and task type with `dataclasses.replace`.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel


def lora_config(peft_cfg: Any) -> LoraConfig | None:
    """The LoraConfig of `peft=lora|qlora` (target modules still unset); None for `peft=none`."""
    if str(peft_cfg.method) == "none":
        return None
    return LoraConfig(
        r=int(peft_cfg.r),
        lora_alpha=int(peft_cfg.alpha),
        lora_dropout=float(peft_cfg.dropout),
        modules_to_save=[str(m) for m in peft_cfg.modules_to_save] or None,
        bias="none",
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; peft's count, which unpacks 4-bit weights, when available."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
