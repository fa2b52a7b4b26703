"""The MedSigLIP-448 part of the real-size benchmark: its vision tower (random, bf16) embeds two
images as a linear-probe run does, then the probe's head takes one optimizer step."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import SiglipVisionConfig, SiglipVisionModel

from benchmarks.real_size_measure import SavedTensors, phase, rate, static_bytes
from breakhis_ft.data.records import class_names
from breakhis_ft.engine.optim import adamw, param_groups
from breakhis_ft.models.siglip import SiglipClassifier
from breakhis_ft.models.siglip_loading import SiglipPreprocessor
from breakhis_ft.models.tiny_siglip import build_tiny_image_processor
from breakhis_ft.vram.meta import MEDSIGLIP_448_VISION

PROBE = ["model=medsiglip_448", "peft=none", "model.freeze_encoder=true", "precision=bf16"]


def siglip_section(
    images: list, reduced_layers: int | None, peak: float, results: dict, estimate: Callable
) -> dict[str, Any]:
    """Embed `images` with MedSigLIP-448's tower, one probe-head step; compare with the estimate."""
    vision = SiglipVisionConfig(**MEDSIGLIP_448_VISION)
    if reduced_layers:
        vision.num_hidden_layers = reduced_layers
    names = class_names("subtype8")
    with tempfile.TemporaryDirectory() as tmp, phase(results, "medsiglip build") as entry:
        torch.manual_seed(0)
        encoder = SiglipVisionModel._from_config(vision, dtype=torch.bfloat16)
        preprocessor = SiglipPreprocessor(build_tiny_image_processor(448), "pad")
        clf = SiglipClassifier(encoder, preprocessor, names, "probe", {"name": "random"})
        entry["parameters"] = sum(p.numel() for p in clf.parameters())
        vision.save_pretrained(tmp)  # the estimator reads the architecture from a folder
        est = estimate(Path(tmp), [*PROBE, f"trainer.batch_size={len(images)}"])
    counter = FlopCounterMode(display=False)
    with phase(results, "medsiglip embed") as entry, counter:
        embeddings = clf.embed_images(images)  # as prepare_embeddings computes them
        assert embeddings.shape == (len(images), vision.hidden_size)
        assert torch.isfinite(embeddings).all()
    rate(entry, counter.get_total_flops(), peak)
    batch = {
        "embeddings": embeddings,
        "class_label": torch.arange(len(images)),
        "index": torch.arange(len(images)),
    }
    clf.train()
    optimizer = adamw(param_groups(clf, 0.0), lr=1e-3)
    saved = SavedTensors(clf)
    with phase(results, "medsiglip probe step") as entry:
        with saved.active():
            loss = clf.loss(batch)
        loss.backward()
        optimizer.step()
    entry.update(static_bytes(clf, optimizer))
    entry["loss"] = float(loss.detach())
    entry["saved_activations_bytes"] = saved.bytes
    entry["estimate_static_bytes"] = est.static_bytes
    entry["static_ratio"] = round(entry["static_bytes"] / est.static_bytes, 4)
    entry["estimate_activations_bytes"] = est.extra["activations_gc_bytes"]
    entry["activations_ratio"] = round(saved.bytes / est.extra["activations_gc_bytes"], 4)
    assert torch.isfinite(loss)
    return {"vision_layers": vision.num_hidden_layers, "image_size": 448, "mode": "linear probe"}
