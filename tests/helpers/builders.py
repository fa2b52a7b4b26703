"""Build classifiers in tests the way the run's factory does, from config dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from breakhis_ft.models.base import Classifier
from breakhis_ft.models.gemma_loading import build_medgemma_classifier
from breakhis_ft.models.lora import lora_config
from breakhis_ft.models.precision import Precision
from breakhis_ft.models.siglip import build_siglip_classifier


def build(
    model_cfg: Any,
    peft_cfg: Any,
    precision: str,
    class_names: Sequence[str],
    embeddings_dir: str | Path | None = None,
) -> Classifier:
    """The classifier of `model_cfg` (kind medgemma or siglip) at its name_or_path."""
    builder = build_medgemma_classifier if model_cfg.kind == "medgemma" else build_siglip_classifier
    return builder(
        model_cfg=model_cfg,
        checkpoint=str(model_cfg.name_or_path),
        peft_method=str(peft_cfg.method),
        lora=lora_config(peft_cfg),
        target_modules=peft_cfg.target_modules,
        precision=Precision.of(precision),
        class_names=tuple(class_names),
        cache_dirs=None if embeddings_dir is None else SimpleNamespace(embeddings=embeddings_dir),
    )
