"""The peft adapter config of a run, built once from the `peft` group (or None: no adapter).

Each model family then fills in its own `target_modules` (Gemma 3: the language model or all
linear layers; SigLIP: the encoder layers) and task type with `dataclasses.replace`.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig


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
