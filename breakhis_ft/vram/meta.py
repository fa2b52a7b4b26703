"""The configured model on the meta device: exact parameter counts and bytes, LoRA sites."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from breakhis_ft.errors import ModelLoadError
from breakhis_ft.models.precision import Precision
from breakhis_ft.vram.activations import LoraSite, nf4_bytes

MEDGEMMA_HUB_IDS = ("google/medgemma-4b-it", "google/medgemma-4b-pt")
# google/medsiglip-448 (gated): the SigLIP So400m vision tower at 448 px with its pooling head.
MEDSIGLIP_448_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 448,
    "patch_size": 14,
    "vision_use_head": True,
}

GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "out_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "fc1": "mlp_in",
    "down_proj": "mlp_mid",
    "fc2": "mlp_mid",
}


def _local_config(name: str, key: str = "model.name_or_path") -> Any:
    """AutoConfig of a local folder or an already-cached hub checkpoint; a clear error otherwise."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{key}={name!r}: no config.json could be read ({type(err).__name__}). "
            "The estimator needs the architecture only: point it at a local checkpoint folder, use "
            f"one of {MEDGEMMA_HUB_IDS + ('google/medsiglip-448',)} (built in), or a tiny model"
        ) from err


def _gemma_checkpoint(cfg: Any) -> tuple[Any, str | None]:
    """(Gemma3Config, local folder or None): the built-in MedGemma 4B config, or AutoConfig."""
    from breakhis_ft.models.factory import resolve_checkpoint
    from breakhis_ft.models.gemma_loading import medgemma_4b_config

    name = resolve_checkpoint(cfg.model, cfg.paths.models)  # builds a tiny model as a run does
    if name in MEDGEMMA_HUB_IDS and not Path(name).is_dir():
        return medgemma_4b_config(), None
    config = _local_config(name)
    if config.model_type != "gemma3":
        raise ModelLoadError(
            f"model.name_or_path={name!r} is a {config.model_type!r} checkpoint; "
            "model.kind=medgemma expects a Gemma 3 image-text model (model_type gemma3)"
        )
    return config, name if Path(name).is_dir() else None


def _quantized_weights(model: nn.Module) -> set[int]:
    """ids of the weights bitsandbytes would turn into NF4 (transformers' own selection rules)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(
        getattr(model, "_keep_in_fp32_modules", None) or []
    )
    return {
        id(module.weight)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    }


def lora_sites(model: nn.Module, prefix: str) -> dict[int, list[LoraSite]]:
    """LoRA-adapted linears per layer index, for layers under `prefix` (e.g. `language_model`)."""
    from peft.tuners.lora import LoraLayer

    sites: dict[int, list[LoraSite]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or prefix not in name or ".layers." not in name:
            continue
        index = int(name.split(".layers.")[1].split(".")[0])
        short = name.rsplit(".", 1)[-1]
        for _adapter, r in module.r.items():
            base = module.get_base_layer()
            site = LoraSite(GROUPS.get(short, short), base.in_features, base.out_features, int(r))
            sites.setdefault(index, []).append(site)
    return sites


@dataclass
class ParamBytes:
    """Parameter counts and bytes of a model as training holds it."""

    total: int = 0
    trainable: int = 0
    trainable_tensors: int = 0
    frozen_bytes: int = 0
    trainable_bytes: int = 0
    quantized: int = 0  # weights held in 4 bit
    base: int = 0  # the model's own parameters (no adapters, no modules_to_save copies)


def param_bytes(model: nn.Module, quantized: set[int] = frozenset()) -> ParamBytes:
    """Counts and bytes of every parameter (tied ones once); 4-bit bytes for `quantized` ids."""
    out = ParamBytes()
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        out.total += param.numel()
        if "lora_" not in name and ".modules_to_save." not in name:
            out.base += param.numel()
        if param.requires_grad:
            out.trainable += param.numel()
            out.trainable_tensors += 1
            out.trainable_bytes += size
        elif id(param) in quantized:
            out.quantized += param.numel()
            out.frozen_bytes += nf4_bytes(param.numel())
        else:
            out.frozen_bytes += size
    return out


def build_meta_gemma(cfg: Any) -> tuple[nn.Module, ParamBytes, Any, str | None]:
    """The configured Gemma 3 model + adapter on meta: (model, bytes, config, local folder)."""
    from breakhis_ft.models.gemma_loading import apply_peft, build_meta_medgemma
    from breakhis_ft.models.lora import lora_config

    config, folder = _gemma_checkpoint(cfg)
    qlora = cfg.peft.method == "qlora"
    dtype = torch.bfloat16 if qlora else Precision.of(cfg.precision.name).dtype
    model = build_meta_medgemma(config).to(dtype)
    quantized = _quantized_weights(model) if qlora else set()
    lora = lora_config(cfg.peft)
    model = apply_peft(model, lora, cfg.peft.target_modules, bool(cfg.model.freeze_vision))
    return model, param_bytes(model, quantized), config, folder


def build_meta_siglip(cfg: Any, n_classes: int) -> tuple[nn.Module, ParamBytes, Any, str]:
    """The configured SigLIP classifier (encoder + adapter + head) on meta, and its mode."""
    from peft import get_peft_model
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from breakhis_ft.models.factory import resolve_checkpoint
    from breakhis_ft.models.lora import lora_config
    from breakhis_ft.models.siglip import classifier_mode, lora_targets

    mode = classifier_mode(str(cfg.peft.method), bool(cfg.model.freeze_encoder))
    name = resolve_checkpoint(cfg.model, cfg.paths.models)
    if name == "google/medsiglip-448" and not Path(name).is_dir():
        vision = SiglipVisionConfig(**MEDSIGLIP_448_VISION)
    else:
        config = _local_config(name)
        vision = getattr(config, "vision_config", config)
    dtype = torch.float32 if mode == "full" else Precision.of(cfg.precision.name).dtype
    with torch.device("meta"):
        encoder: nn.Module = SiglipVisionModel(vision).to(dtype)
        head = nn.Linear(vision.hidden_size, n_classes)
    if mode == "probe":
        encoder.requires_grad_(False)
    if mode == "lora":
        lora = replace(
            lora_config(cfg.peft), target_modules=lora_targets(cfg.peft.target_modules, encoder)
        )
        encoder = get_peft_model(encoder, lora)
    model = nn.ModuleDict({"encoder": encoder, "head": head})
    return model, param_bytes(model), vision, mode
