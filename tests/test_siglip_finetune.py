"""SigLIP LoRA and full fine-tuning: trainable parts, save/reload, loading and config errors."""

from __future__ import annotations

import pytest
import torch
from helpers.builders import build
from helpers.siglip_toy import FP32, LORA, PROBE, examples, model_cfg, replica, tiny_path
from huggingface_hub.errors import GatedRepoError
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoImageProcessor, SiglipVisionConfig, SiglipVisionModel

from breakhis_ft.data.records import class_names, label_of
from breakhis_ft.models import siglip, siglip_loading
from breakhis_ft.models.siglip_loading import ModelLoadError, pooled_embedding

TASK = "binary"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_path(tmp_path_factory)


@pytest.fixture(scope="module")
def batch_examples(request, tmp_path_factory):
    scan = replica(request, tmp_path_factory)
    records = [r for r in scan.records if label_of(r, TASK) is not None][:16]
    images = [Image.open(scan.root / r.path).convert("RGB") for r in records]
    return examples(records, TASK, images)


def build_tiny(tiny, peft=LORA, **overrides):
    return build(model_cfg(tiny, **overrides), peft, FP32, class_names(TASK))


def train_steps(classifier, batch, steps=5, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=lr)
    classifier.train()
    for _ in range(steps):
        optimizer.zero_grad()
        classifier.loss(batch).backward()
        optimizer.step()
    classifier.eval()


def test_lora_trains_adapters_and_head_only(tiny):
    classifier = build_tiny(tiny)
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    # Tiny encoder: 2 layers, hidden 32, MLP 64; r=8 on q/k/v/out (32->32) and fc1/fc2 (32<->64).
    per_layer = 4 * 8 * (32 + 32) + 2 * 8 * (32 + 64)
    assert classifier.parameter_counts()[0] == 2 * per_layer + (32 * 2 + 2)


def test_lora_saves_and_reloads_to_identical_predictions(tiny, batch_examples, tmp_path):
    torch.manual_seed(0)
    trained = build_tiny(tiny)
    batch = trained.collate(batch_examples, train=True)
    train_steps(trained, batch)
    expected = trained.predict_proba(batch)
    trained.save_trained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()

    fresh = build_tiny(tiny)
    assert not torch.allclose(fresh.predict_proba(batch), expected, atol=1e-4)
    fresh.load_trained(tmp_path / "ckpt")
    assert torch.allclose(fresh.predict_proba(batch), expected, atol=1e-6)

    # The adapter is a standard peft adapter: PeftModel.from_pretrained on the base encoder.
    base = SiglipVisionModel.from_pretrained(str(tiny))
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "ckpt" / "adapter")).eval()
    with torch.no_grad():
        ours = pooled_embedding(trained.encoder, batch["pixel_values"])
        theirs = pooled_embedding(adapted, batch["pixel_values"])
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_full_finetune_saves_and_reloads(tiny, batch_examples, tmp_path):
    torch.manual_seed(0)
    trained = build_tiny(tiny, peft=PROBE, freeze_encoder=False)
    assert trained.mode == "full"
    assert all(p.requires_grad for p in trained.parameters())
    batch = trained.collate(batch_examples, train=True)
    train_steps(trained, batch, steps=3, lr=1e-3)
    expected = trained.predict_proba(batch)
    trained.save_trained(tmp_path / "ckpt")
    fresh = build_tiny(tiny, peft=PROBE, freeze_encoder=False)
    fresh.load_trained(tmp_path / "ckpt")
    assert torch.allclose(fresh.predict_proba(batch), expected, atol=1e-6)
    with pytest.raises(ValueError, match="full checkpoint"):
        build_tiny(tiny).load_trained(tmp_path / "ckpt")  # a LoRA classifier refuses it


def test_pad_and_stretch_preprocessing(tiny):
    red = Image.new("RGB", (48, 32), (255, 0, 0))
    pad = build_tiny(tiny, peft=PROBE, freeze_encoder=True, resize="pad").preprocessor([red])[0]
    stretch = build_tiny(tiny, peft=PROBE, freeze_encoder=True, resize="stretch").preprocessor(
        [red]
    )[0]
    assert pad.shape == stretch.shape == (3, 64, 64)
    # Pixels in [-1, 1]: red is (1, -1, -1); the padding (the processor's mean colour) is ~0.
    assert torch.allclose(stretch[:, 0, 32], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    assert torch.allclose(pad[:, 32, 32], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    assert pad[:, 0, :].abs().max() < 0.01 and pad[:, -1, :].abs().max() < 0.01


def test_vision_only_checkpoint_loads(tiny, tmp_path):
    folder = tmp_path / "vision_only"
    SiglipVisionModel.from_pretrained(str(tiny)).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(str(tiny)).save_pretrained(folder)
    classifier = build_tiny(folder, peft=PROBE, freeze_encoder=True)
    reference = build_tiny(tiny, peft=PROBE, freeze_encoder=True)
    pixels = torch.zeros(1, 3, 64, 64)
    image = Image.new("RGB", (64, 64), (200, 100, 150))
    assert torch.allclose(
        classifier.embed_images([image]), reference.embed_images([image]), atol=1e-5
    )
    assert pooled_embedding(classifier.encoder, pixels).shape == (1, 32)


def test_bad_values_name_the_key(tiny):
    with pytest.raises(ValueError, match="model.resize"):
        build_tiny(tiny, peft=PROBE, resize="crop")


def test_missing_or_gated_model_error_says_how_to_get_it(tmp_path, monkeypatch):
    cfg = model_cfg(tmp_path / "no_such_model")
    with pytest.raises(ModelLoadError, match="model.name_or_path") as info:
        build(cfg, PROBE, FP32, ["a", "b"])
    assert "local copy" in str(info.value)

    def gated(*args, **kwargs):
        # the hub's own exception; built without an HTTP response (its client library varies)
        err = GatedRepoError.__new__(GatedRepoError)
        OSError.__init__(err, "Access to model google/medsiglip-448 is restricted.")
        raise err

    monkeypatch.setattr(siglip_loading.AutoConfig, "from_pretrained", gated)
    cfg = model_cfg("google/medsiglip-448")
    with pytest.raises(ModelLoadError, match="HF_TOKEN") as info:
        build(cfg, PROBE, FP32, ["a", "b"])
    assert "accept the licence" in str(info.value) and "GatedRepoError" in str(info.value)


def test_medsiglip_448_architecture_counts_on_the_meta_device():
    # MedSigLIP-448's vision tower (docs/references.md: 428,565,440 parameters with the pooling
    # head).
    config = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=448,
        patch_size=14,
    )
    with torch.device("meta"):
        encoder = SiglipVisionModel(config)
    assert sum(p.numel() for p in encoder.parameters()) == 428_565_440
    targets = siglip.lora_targets("encoder", encoder)
    adapted = get_peft_model(encoder, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    # per layer: q, k, v, out (1152 -> 1152) and fc1, fc2 (1152 <-> 4304), r=8; 27 layers
    assert trainable == 27 * (4 * 8 * (1152 + 1152) + 2 * 8 * (1152 + 4304)) == 4_347_648
