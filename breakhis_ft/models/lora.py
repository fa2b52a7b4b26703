"""The peft adapter config of a run, built once from the `peft` group (or None: no adapter), and
adapters merged into their model's weights for export.

Each model family then fills in its own `target_modules` (Gemma 3: the language model or all
linear layers; SigLIP: the encoder layers) and task type with `dataclasses.replace`.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel


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


def merge_dequantized(model: PeftModel) -> PreTrainedModel:
    """A QLoRA model merged for export: its NF4 base dequantized to float32, plus W + BA."""
    # peft's merge into 4-bit layers re-quantizes W + BA and rounds most of the adapter away; and
    # the original 16-bit checkpoint is not the base the adapter learned on: the 4-bit layers
    # compute with the dequantized NF4 weights, so those are the base it is added to.
    config = model.peft_config[model.active_adapter]
    adapter = get_peft_model_state_dict(model)
    base = model.unload()  # the adapters removed, the Linear4bit layers back in place
    base.dequantize(dtype=torch.float32)  # nn.Linear layers; the quantization config is dropped
    merged = get_peft_model(base.float(), config)
    set_peft_model_state_dict(merged, adapter)
    return merged.merge_and_unload()


def merged_weights(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with any LoRA adapter merged into its weights (a QLoRA base dequantized first, see
    `merge_dequantized`); `model` itself where it has none."""
    if not isinstance(model, PeftModel):
        return model
    if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        return merge_dequantized(model)
    return model.merge_and_unload()
