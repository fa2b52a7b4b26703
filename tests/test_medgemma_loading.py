"""Loading MedGemma: precision guard, gated/missing models, QLoRA errors, adapters, meta counts."""

from __future__ import annotations

import logging

import httpx
import pytest
import torch
from helpers.builders import build
from helpers.medgemma_toy import classifier, tiny_path
from huggingface_hub.errors import GatedRepoError
from omegaconf import OmegaConf
from transformers import AutoModelForImageTextToText, AutoProcessor

from breakhis_ft.config import MedGemmaConfig, PeftConfig, TrainRunConfig
from breakhis_ft.errors import DeviceError
from breakhis_ft.models import gemma_loading
from breakhis_ft.models.gemma_loading import (
    ModelLoadError,
    apply_peft,
    build_meta_medgemma,
    qlora_quantization,
)
from breakhis_ft.models.lora import lora_config
from breakhis_ft.models.precision import Precision
from breakhis_ft.models.tiny import RECIPE_FILE, ensure_tiny_gemma3
from breakhis_ft.run.setup import run_precision


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_path(tmp_path_factory)


def medgemma_cfg(path) -> MedGemmaConfig:
    return MedGemmaConfig(name_or_path=str(path))


def test_precision_is_resolved_once_from_its_name(monkeypatch):
    assert Precision.of("fp16").dtype == torch.float16
    assert Precision.of("bf16").mixed_precision == "bf16"
    assert Precision.of("fp32").mixed_precision == "no"
    cfg = OmegaConf.structured(TrainRunConfig)
    assert run_precision(cfg).dtype == torch.bfloat16  # CPUs compute bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(DeviceError, match="precision=fp32"):  # checked as the run is set up
        run_precision(cfg)
    cfg.trainer.cpu = True  # the run computes on the CPU, which has bf16
    assert run_precision(cfg).dtype == torch.bfloat16
    cfg.trainer.cpu, cfg.precision.name = False, "fp32"
    assert run_precision(cfg).dtype == torch.float32


def test_missing_model_says_how_to_fix(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        build(medgemma_cfg(tmp_path / "no_such_model"), PeftConfig(), "fp32", ("a", "b"))
    message = str(error.value)
    assert "model.name_or_path=" in message and "no_such_model" in message
    assert "HF_TOKEN" in message and "local copy" in message


def test_gated_model_error_names_licence_token_and_local_copy(monkeypatch):
    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/x"))

    def gated(*args, **kwargs):
        raise GatedRepoError(
            "Access to model google/medgemma-4b-it is restricted.", response=response
        )

    monkeypatch.setattr(AutoProcessor, "from_pretrained", gated)
    with pytest.raises(ModelLoadError) as error:
        build(medgemma_cfg("google/medgemma-4b-it"), PeftConfig(), "fp32", ("a", "b"))
    message = str(error.value)
    assert "gated model" in message and "accept the licence" in message
    assert "HF_TOKEN" in message and "model.name_or_path" in message
    assert isinstance(error.value.__cause__, GatedRepoError)


def test_qlora_errors_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = qlora_quantization(torch.bfloat16)  # bitsandbytes >= 0.49 (dev extra): the CPU
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == config.bnb_4bit_quant_storage == torch.bfloat16
    with pytest.raises(ValueError, match="precision=bf16"):
        qlora_quantization(torch.float32)
    monkeypatch.setattr(gemma_loading.importlib.metadata, "version", lambda name: "0.48.2")
    with pytest.raises(ModelLoadError, match=r"on the CPU needs bitsandbytes >= 0.49.*0.48.2"):
        qlora_quantization(torch.bfloat16)
    monkeypatch.setattr(gemma_loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"breakhis-ft\[quant\].*peft=lora"):
        qlora_quantization(torch.bfloat16)


def test_tiny_checkpoint_loads_with_auto_classes_and_is_built_once(tiny, monkeypatch):
    model = AutoModelForImageTextToText.from_pretrained(tiny)
    processor = AutoProcessor.from_pretrained(tiny)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert processor.image_seq_length == model.config.mm_tokens_per_image == 16
    assert processor.image_processor.size["height"] == 112
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.image_token_id
    assert model.config.boi_token_id == tok.boi_token_id
    # the projector was re-initialised: a zero projector would hide the image from the LM
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0
    stamp = (tiny / RECIPE_FILE).stat().st_mtime_ns
    assert ensure_tiny_gemma3(tiny, tiny.parent) == tiny
    assert (tiny / RECIPE_FILE).stat().st_mtime_ns == stamp  # not rebuilt


def test_tiny_checkpoint_is_rebuilt_when_the_recipe_changes(tmp_path, monkeypatch):
    path = ensure_tiny_gemma3(tmp_path / "tiny", tmp_path)
    monkeypatch.setattr("breakhis_ft.models.tiny.recipe_hash", lambda: "changed")
    ensure_tiny_gemma3(path, path.parent)
    assert '"changed"' in (path / RECIPE_FILE).read_text()
    assert (path / "model.safetensors").is_file()


def _lora_module_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def test_target_modules_language_model_vs_all_linear(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="breakhis_ft.models.gemma_loading"):
        lm = classifier(tiny, target_modules="language_model")
    # loading says what it loaded; only a training run says what trains (predict trains nothing)
    assert "loaded" in caplog.text and "trainable" not in caplog.text
    names = _lora_module_names(lm.model)
    assert names and all("language_model" in n for n in names)
    assert len(names) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert not lm.vision_trainable
    everything = _lora_module_names(classifier(tiny, target_modules="all-linear").model)
    assert any("vision_tower" in n for n in everything)
    assert not any(n.endswith("lm_head") for n in everything)
    only_q = _lora_module_names(classifier(tiny, target_modules=["q_proj"]).model)
    assert only_q and all(n.endswith("q_proj") for n in only_q)


def test_full_fine_tune_freezes_only_vision(tiny):
    full = classifier(tiny, method="none")
    trainable, total = full.parameter_counts()
    core = full.core
    vision = sum(p.numel() for p in core.model.vision_tower.parameters())
    vision += sum(p.numel() for p in core.model.multi_modal_projector.parameters())
    assert trainable == total - vision
    assert not full.vision_trainable


def test_medgemma_4b_on_meta_device_matches_reference_counts():
    model = build_meta_medgemma()
    assert sum(p.numel() for p in model.parameters()) == 4_300_079_472
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == 416_866_032
    assert sum(p.numel() for p in model.model.multi_modal_projector.parameters()) == 2_950_272
    assert model.model.language_model.embed_tokens.weight.numel() == 671_252_480
    assert next(model.parameters()).device.type == "meta"
    lm = apply_peft(model, lora_config(PeftConfig(r=8)), "language_model")
    assert lm.get_nb_trainable_parameters()[0] == 14_901_248
    every = apply_peft(build_meta_medgemma(), lora_config(PeftConfig(r=8)), "all-linear")
    assert every.get_nb_trainable_parameters()[0] == 19_248_896
