"""Shared helpers of the MedGemma tests: the tiny Gemma 3, class-dependent images, classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from breakhis_ft.config import MedGemmaConfig, PeftConfig, PromptConfig
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.tiny import ensure_tiny_gemma3
from helpers.builders import build

EVA4 = ("tubular_adenoma", "mucinous_carcinoma", "fibroadenoma", "ductal_carcinoma")
# One H&E-like tint per class, plus a class-dependent stripe direction.
TINTS = np.array([[0.8, 0.4, 0.6], [0.5, 0.3, 0.7], [0.9, 0.6, 0.7], [0.6, 0.5, 0.8]])


def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 3, built once per test session (every MedGemma test module shares it)."""
    return ensure_tiny_gemma3(
        tmp_path_factory.getbasetemp() / "tiny_gemma3", tmp_path_factory.getbasetemp()
    )


def class_image(cls: int, rng: np.random.Generator, size: int = 56) -> Image.Image:
    """An image whose tint and stripe direction depend on the class, jittered per image."""
    y, x = np.mgrid[0:size, 0:size] / size
    freq, phase = rng.uniform(3, 5), rng.uniform(0, 2 * np.pi)
    waves = [y, x, (x + y) / 1.4, (x - y) / 1.4]
    pattern = np.sin(2 * np.pi * freq * waves[cls % 4] + phase)
    tint = TINTS[cls % 4] + rng.uniform(-0.08, 0.08, 3)
    pixels = tint + 0.15 * pattern[..., None] + rng.normal(0, 0.08, (size, size, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def examples(n: int, seed: int, n_classes: int = 4) -> list[dict[str, Any]]:
    """`n` dataset examples (image, label, index), classes in turn."""
    rng = np.random.default_rng(seed)
    return [
        {"image": class_image(i % n_classes, rng), "label": i % n_classes, "index": i}
        for i in range(n)
    ]


def classifier(
    path: Path,
    class_names: tuple[str, ...] = EVA4,
    style: str = "numbered",
    target_modules: Any = "language_model",
    loss_on: str = "answer",
    system: str | None = None,
    method: str = "lora",
) -> MedGemmaClassifier:
    """A MedGemma classifier over the tiny checkpoint, in float32 (fast on CPU)."""
    torch.manual_seed(0)  # LoRA init
    model_cfg = MedGemmaConfig(
        name_or_path=str(path),
        loss_on=loss_on,
        prompt=PromptConfig(style=style, system=system),
    )
    peft_cfg = PeftConfig(method=method, target_modules=target_modules, dropout=0.0)
    return build(model_cfg, peft_cfg, "fp32", class_names)
