"""Loading Gemma 3 / MedGemma: hub or local checkpoints, QLoRA, adapters, meta builds; the builder
of the MedGemma classifier that the model group names (`model.builder`)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import replace
from importlib.resources import files
from typing import Any

import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from packaging.version import Version
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

from breakhis_ft.errors import ModelLoadError
from breakhis_ft.models.base import load_error
from breakhis_ft.models.medgemma import FinalEvaluation, MedGemmaClassifier
from breakhis_ft.models.precision import Precision
from breakhis_ft.models.prompts import make_prompt
from breakhis_ft.third_party import enable_bitsandbytes

log = logging.getLogger(__name__)

# LoRA on the language model's linear layers only: the SigLIP tower's layers (q/k/v/out_proj,
# fc1/fc2) and the projector stay untouched. peft full-matches a string target against module names.
LANGUAGE_MODEL_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
BNB_CPU_MIN = "0.49"  # the first bitsandbytes with 4-bit layers and 8-bit optimizers on the CPU


def kbit_device() -> torch.device:
    """Where 4-bit weights are placed at load: this process's accelerate device (its GPU under
    DDP, the CPU with trainer.cpu=true) once a run's Accelerator exists, else the current GPU, else
    the CPU."""
    from accelerate.state import PartialState, is_initialized

    if is_initialized():
        return PartialState().device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def qlora_quantization(dtype: torch.dtype) -> BitsAndBytesConfig:
    """The 4-bit NF4 config of Google's QLoRA notebook; a clear error where it cannot run."""
    enable_bitsandbytes()  # held back by the entrypoints until 4-bit is used (third_party.py)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "peft=qlora needs bitsandbytes, which is not installed: "
            "pip install 'breakhis-ft[quant]', or use peft=lora"
        )
    if dtype == torch.float32:
        raise ValueError("peft=qlora computes in 16-bit: give bfloat16 (precision=bf16)")
    device = kbit_device()
    installed = importlib.metadata.version("bitsandbytes")
    if device.type == "cpu" and Version(installed) < Version(BNB_CPU_MIN):
        raise ModelLoadError(
            f"peft=qlora on the CPU needs bitsandbytes >= {BNB_CPU_MIN} (4-bit CPU kernels); "
            f"{installed} is installed: pip install 'bitsandbytes>={BNB_CPU_MIN}', or use peft=lora"
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def prepare_kbit_model(model: PreTrainedModel) -> PreTrainedModel:
    """QLoRA's preparation of a 4-bit model before its adapters: the base frozen, nothing upcast."""
    # Google's notebook did not prepare the model itself; trl 0.18's SFTTrainer called peft's
    # prepare_model_for_kbit_training, which freezes the base, upcasts every weight left in 16 bit
    # to float32 and turns on checkpointing. We do as trl 1.x does (trl PRs 4335, 4457): freeze,
    # no upcast. The upcast buys nothing for Gemma 3 (its RMSNorm computes in float32; the frozen
    # embedding is only looked up; the tiny model's losses agree, see the README) and costs 1.3 GB
    # on MedGemma (the tied 262,208 x 2,560 embedding in float32), memory QLoRA is there to save.
    # peft's adapters stay float32 (trl 1.x casts them to bf16): AdamW updates in float32, as in
    # every other run. Checkpointing is the engine's (trainer.gradient_checkpointing), and
    # non-reentrant, so no input-gradient hook is needed.
    if not getattr(model, "is_loaded_in_4bit", False):
        raise ModelLoadError("prepare_kbit_model: the model was not loaded in 4 bit")
    model.requires_grad_(False)
    _keep_4bit_layers_differentiable(model)
    return model


def _keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (AVX512-BF16 CPUs)."""
    # bitsandbytes repacks a Linear4bit's weight for its CPU inference kernel the first time it
    # runs in eval mode without autograd, and keeps that kernel after model.train() until a
    # state_dict() (a checkpoint) unpacks it. The kernel has no backward: after an evaluation that
    # no checkpoint follows (trainer.eval_every_steps) the gradient stopped at every 4-bit layer
    # (torch only warns) and the vision tower's biased layers failed. So the repacking stays off.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
        # 4-bit weights are quantized as they load, on the device that computes with them.
        kwargs["device_map"] = {"": str(kbit_device())}
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
    if quantization_config is not None:
        model = prepare_kbit_model(model)
    return model, processor


def resolve_target_modules(target_modules: Any) -> str | list[str]:
    """peft target_modules from `peft.target_modules`: language_model, all-linear, list or regex."""
    if isinstance(target_modules, str):
        if target_modules == "language_model":
            return LANGUAGE_MODEL_TARGETS
        return target_modules  # "all-linear" (vision tower included) or a peft regex
    names = [str(name) for name in target_modules]
    if not names:
        raise ValueError("peft.target_modules: the list is empty")
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
        evaluation=FinalEvaluation(
            mode=str(model_cfg.eval_mode),
            max_new_tokens=int(model_cfg.max_new_tokens),
            merge_adapter=bool(model_cfg.merge_for_eval),
        ),
        # absent from configs saved before the setting: the template's <bos> only
        add_special_tokens=bool(getattr(model_cfg, "add_special_tokens", False)),
    )
    # what trains is logged by the training run: an inference model (predict, export) trains nothing
    log.info("loaded %s (peft=%s, dtype=%s)", checkpoint, peft_method, precision.name)
    return classifier
