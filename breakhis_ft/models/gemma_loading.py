"""Loading Gemma 3 / MedGemma: hub or local checkpoints, QLoRA, adapters, meta builds; the builder
of the MedGemma classifier that the model group names (`model.builder`)."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import replace
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

from breakhis_ft.errors import ConfigError, ModelLoadError
from breakhis_ft.models.base import load_error
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.precision import Precision
from breakhis_ft.models.prompts import make_prompt

log = logging.getLogger(__name__)

# LoRA on the language model's linear layers only: the SigLIP tower's layers (q/k/v/out_proj,
# fc1/fc2) and the projector stay untouched. peft full-matches a string target against module names.
LANGUAGE_MODEL_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


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
    model: Gemma3ForConditionalGeneration,
    lora: LoraConfig | None,
    target_modules: Any = "language_model",
    freeze_vision: bool = True,
) -> PreTrainedModel | PeftModel:
    """Wrap the model for training: LoRA/QLoRA adapters, or (lora None) full fine-tuning."""
    if lora is None:
        model.requires_grad_(True)
        if freeze_vision:
            for module in _vision_modules(model):
                module.requires_grad_(False)
        return model
    lora = replace(
        lora, target_modules=resolve_target_modules(target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora)


def medgemma_4b_config() -> Gemma3Config:
    """The MedGemma 4B architecture from the packaged config (public values, no weights)."""
    text = files("breakhis_ft.resources").joinpath("medgemma_4b_config.json").read_text()
    values = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    return Gemma3Config(**values)


def build_meta_medgemma(config: Gemma3Config | None = None) -> Gemma3ForConditionalGeneration:
    """MedGemma 4B built on the meta device: exact shapes and counts, no memory, no download."""
    with torch.device("meta"):
        return Gemma3ForConditionalGeneration(config or medgemma_4b_config())


def build_medgemma_classifier(
    model_cfg: Any,
    checkpoint: str,
    peft_method: str,
    lora: LoraConfig | None,
    target_modules: Any,
    precision: Precision,
    class_names: tuple[str, ...] | list[str],
    cache_dirs: Any = None,
) -> MedGemmaClassifier:
    """Load MedGemma (or the tiny Gemma 3) at `checkpoint` with its adapter, prompt and dtype."""
    quantization = qlora_quantization(precision.dtype) if peft_method == "qlora" else None
    model, processor = load_model_and_processor(
        checkpoint, precision.dtype, str(model_cfg.attn_implementation), quantization
    )
    model = apply_peft(model, lora, target_modules, freeze_vision=bool(model_cfg.freeze_vision))
    classifier = MedGemmaClassifier(
        model,
        processor,
        make_prompt(model_cfg.prompt, class_names),
        loss_on=str(model_cfg.loss_on),
        max_new_tokens=int(model_cfg.max_new_tokens),
    )
    # what trains is logged by the training run: an inference model (predict, export) trains nothing
    log.info("loaded %s (peft=%s, dtype=%s)", checkpoint, peft_method, precision.name)
    return classifier
