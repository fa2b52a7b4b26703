"""Build the run's Classifier from the model group: the one place a tiny checkpoint is built, and
the one place a model family is looked up by `model.kind`.

The model group names its builder (`model.builder`, a `_partial_` `_target_`); the run setup, the
predictor and the exporter all come here, so a checkpoint is resolved and built the same way. What
a family does without a built model is a classmethod of its Classifier (`classifier_type`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from hydra.utils import get_class, get_method, instantiate

from breakhis_ft.models.base import Classifier
from breakhis_ft.models.lora import lora_config
from breakhis_ft.models.precision import Precision

log = logging.getLogger(__name__)


# each family by `model.kind`: its Classifier, and the builder of its tiny checkpoint (imported
# when first asked for: a family's modules load only where it is used)
CLASSIFIERS = {
    "medgemma": "breakhis_ft.models.medgemma.MedGemmaClassifier",
    "siglip": "breakhis_ft.models.siglip.SiglipClassifier",
}
TINY_BUILDERS = {
    "medgemma": "breakhis_ft.models.tiny.ensure_tiny_gemma3",
    "siglip": "breakhis_ft.models.tiny_siglip.ensure_tiny_siglip",
}


def classifier_type(model_cfg: Any) -> type[Classifier]:
    """The Classifier subclass of the config's model family (`model.kind`)."""
    return get_class(CLASSIFIERS[str(model_cfg.kind)])


def resolve_checkpoint(model_cfg: Any, models_dir: str | Path) -> str:
    """The checkpoint to load: `model.name_or_path`, the tiny model built first when asked."""
    name = str(model_cfg.name_or_path)
    if not model_cfg.build_tiny:
        return name
    ensure = get_method(TINY_BUILDERS[str(model_cfg.kind)])
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
