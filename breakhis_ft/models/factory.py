"""Build the run's Classifier from the model group: the one place a tiny checkpoint is built.

The model group names its builder (`model.builder`, a `_partial_` `_target_`); the run setup, the
predictor and the exporter all come here, so a checkpoint is resolved and built the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from hydra.utils import instantiate

from breakhis_ft.models.base import Classifier
from breakhis_ft.models.lora import lora_config
from breakhis_ft.models.precision import Precision

log = logging.getLogger(__name__)


def resolve_checkpoint(model_cfg: Any, models_dir: str | Path) -> str:
    """The checkpoint to load: `model.name_or_path`, the tiny model built first when asked."""
    name = str(model_cfg.name_or_path)
    if not model_cfg.build_tiny:
        return name
    if str(model_cfg.kind) == "medgemma":
        from breakhis_ft.models.tiny import ensure_tiny_gemma3 as ensure
    else:
        from breakhis_ft.models.tiny_siglip import ensure_tiny_siglip as ensure
    return str(ensure(name, models_dir))


def build_classifier(
    model_cfg: Any,
    peft_cfg: Any,
    precision: Precision,
    class_names: Sequence[str],
    paths: Any,
    seed: int | None = None,
) -> Classifier:
    """The configured classifier: checkpoint resolved (tiny built), adapter config, dtype.

    `seed` is set after any tiny checkpoint is built (building draws random weights), so that the
    adapter or head initialisation is the same whether or not the checkpoint was already cached.
    """
    checkpoint = resolve_checkpoint(model_cfg, paths.models)
    if seed is not None:
        set_seed(seed)
    builder = instantiate(model_cfg.builder)
    return builder(
        model_cfg=model_cfg,
        checkpoint=checkpoint,
        peft_method=str(peft_cfg.method),
        lora=lora_config(peft_cfg),
        target_modules=peft_cfg.target_modules,
        precision=precision,
        class_names=tuple(class_names),
        cache_dirs=paths,
    )
