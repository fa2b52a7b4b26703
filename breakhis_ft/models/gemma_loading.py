"""Loading Gemma 3 / MedGemma: precision, hub or local checkpoints, QLoRA, adapters, meta builds."""

from __future__ import annotations

import importlib.util
import json
import logging
from importlib.resources import files
from typing import Any

import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    PreTrainedModel,
    ProcessorMixin,
)

from breakhis_ft.config import ConfigError
from breakhis_ft.models.base import ModelLoadError, load_error

log = logging.getLogger(__name__)

# LoRA on the language model's linear layers only: the SigLIP tower's layers (q/k/v/out_proj,
# fc1/fc2) and the projector stay untouched. peft full-matches a string target against module names.
LANGUAGE_MODEL_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
FP16_MESSAGE = (
    "config error: precision: fp16 overflows to NaN on Gemma 3 (activations exceed 65,504); "
    "use precision=bf16, or set precision.allow_fp16=true to try anyway"
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def resolve_dtype(precision_cfg: Any, device_supports_bf16: bool | None = None) -> torch.dtype:
    """The weights' dtype for `precision`; refuses fp16 on Gemma 3 and bf16 where unsupported."""
    name = str(precision_cfg.name)
    if name not in DTYPES:
        raise ConfigError(f"config error: precision.name: got {name!r}, allowed: bf16, fp32, fp16")
    if name == "fp16" and not precision_cfg.allow_fp16:
        raise ConfigError(FP16_MESSAGE)
    if name == "bf16":
        if device_supports_bf16 is None:
            from accelerate.utils import is_bf16_available

            device_supports_bf16 = is_bf16_available()
        if not device_supports_bf16:
            raise ConfigError(
                "config error: precision: this device does not support bfloat16 (bf16); use "
                "precision=fp32 (fp16 overflows on Gemma 3), or a GPU with bf16 (Ampere or newer)"
            )
    return DTYPES[name]


def qlora_quantization(dtype: torch.dtype) -> BitsAndBytesConfig:
    """The 4-bit NF4 config of QLoRA; a clear error where bitsandbytes or CUDA is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "peft=qlora needs bitsandbytes, which is not installed: "
            "pip install 'breakhis-ft[quant]' on a machine with a CUDA GPU, or use peft=lora"
        )
    if not torch.cuda.is_available():
        raise ModelLoadError(
            "peft=qlora needs a CUDA GPU (bitsandbytes 4-bit); none is visible here. Use peft=lora"
        )
    if dtype == torch.float32:
        raise ConfigError("config error: peft.method: qlora computes in 16-bit; use precision=bf16")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_model_and_processor(
    name_or_path: str,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    quantization_config: BitsAndBytesConfig | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a Gemma 3 model and its processor by hub id or local folder (Auto classes)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        # 4-bit weights are placed at load time, on this process's GPU.
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except (GatedRepoError, RepositoryNotFoundError, OSError) as error:
        raise load_error(name_or_path, error, "model=tiny_gemma3") from error
    if not isinstance(model, Gemma3ForConditionalGeneration):
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r} is a {type(model).__name__}; model.kind=medgemma "
            "expects a Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration)"
        )
    return model, processor


def resolve_target_modules(target_modules: Any) -> str | list[str]:
    """peft target_modules from `peft.target_modules`: language_model, all-linear, list or regex."""
    if isinstance(target_modules, str):
        if target_modules == "language_model":
            return LANGUAGE_MODEL_TARGETS
        return target_modules  # "all-linear" (vision tower included) or a peft regex
    names = [str(name) for name in target_modules]
    if not names:
        raise ConfigError("config error: peft.target_modules: the list is empty")
    return names


def _vision_modules(model: Gemma3ForConditionalGeneration) -> list[torch.nn.Module]:
    return [model.model.vision_tower, model.model.multi_modal_projector]


def apply_peft(
    model: Gemma3ForConditionalGeneration, peft_cfg: Any, freeze_vision: bool = True
) -> PreTrainedModel | PeftModel:
    """Wrap the model for training: LoRA/QLoRA adapters, or full fine-tuning for method none."""
    method = str(peft_cfg.method)
    if method == "none":
        model.requires_grad_(True)
        if freeze_vision:
            for module in _vision_modules(model):
                module.requires_grad_(False)
        return model
    if method not in ("lora", "qlora"):
        raise ConfigError(f"config error: peft.method: got {method!r}, allowed: lora, qlora, none")
    lora = LoraConfig(
        r=int(peft_cfg.r),
        lora_alpha=int(peft_cfg.alpha),
        lora_dropout=float(peft_cfg.dropout),
        target_modules=resolve_target_modules(peft_cfg.target_modules),
        modules_to_save=[str(m) for m in peft_cfg.modules_to_save] or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; peft's count, which unpacks 4-bit weights, when available."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def medgemma_4b_config() -> Gemma3Config:
    """The MedGemma 4B architecture from the packaged config (public values, no weights)."""
    text = files("breakhis_ft.resources").joinpath("medgemma_4b_config.json").read_text()
    values = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    return Gemma3Config(**values)


def build_meta_medgemma(config: Gemma3Config | None = None) -> Gemma3ForConditionalGeneration:
    """MedGemma 4B built on the meta device: exact shapes and counts, no memory, no download."""
    with torch.device("meta"):
        return Gemma3ForConditionalGeneration(config or medgemma_4b_config())
