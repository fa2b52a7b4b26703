"""Zero-shot SigLIP classification: image-text similarity to class-name prompts, no training.

Each class's text embedding is the mean of its prompts' normalised embeddings (one prompt per
template in `model.zero_shot_templates`, `{}` replaced by the class name with spaces), normalised
again (CLIP's prompt ensembling). SigLIP scores an image-text pair with a sigmoid logit,
`scale * cos + bias`, each pair independently, so the C sigmoids need not sum to 1. The class
probabilities are the softmax of the C logits: the sigmoids renormalised to sum 1 in SigLIP's regime
(logits well below 0, where sigmoid(x) ~ exp(x)); the shared bias cancels, and it stays finite where
every sigmoid underflows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, SiglipModel

from breakhis_ft.errors import ModelLoadError
from breakhis_ft.models.base import Batch, Classifier, processor_side
from breakhis_ft.models.siglip_loading import (
    SiglipPreprocessor,
    contiguous_pooling,
    labels_and_indices,
    load_config,
    load_error,
    load_preprocessor,
    pooled_embedding,
)

log = logging.getLogger(__name__)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """The prompts of each class: every template with `{}` replaced by the readable class name."""
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(
            "model.zero_shot_templates: needs at least one template and each needs a "
            f"'{{}}' where the class name goes, got {templates}"
        )
    return [[t.format(name.replace("_", " ")) for t in templates] for name in class_names]


class ZeroShotClassifier(Classifier):
    """SigLIP image-text similarity to class-name prompts as class probabilities; trains nothing."""

    def __init__(
        self,
        model: SiglipModel,
        tokenizer: Any,
        preprocessor: SiglipPreprocessor,
        class_names: Sequence[str],
        templates: Sequence[str],
    ) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        self.model = model.requires_grad_(False).eval()
        self.preprocessor = preprocessor
        self.prompts = class_prompts(self.class_names, templates)
        self.register_buffer(
            "text_embeds", self._class_text_embeddings(tokenizer), persistent=False
        )

    @property
    def input_side(self) -> int | None:
        """The square the SigLIP image processor resizes to (448 for MedSigLIP)."""
        return processor_side(self.preprocessor.image_processor)

    def train(self, mode: bool = True) -> ZeroShotClassifier:
        """The model stays in eval mode: there is nothing to train."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def _class_text_embeddings(self, tokenizer: Any) -> torch.Tensor:
        """(C, D) normalised text embeddings, each the normalised mean over its templates."""
        flat = [p for prompts in self.prompts for p in prompts]
        # SigLIP was trained on texts padded to the full length (it pools the last position).
        length = self.model.config.text_config.max_position_embeddings
        ids = tokenizer(
            flat, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )["input_ids"]
        embeds = F.normalize(
            self.model.get_text_features(input_ids=ids).pooler_output.float(), dim=-1
        )
        per_class = embeds.view(len(self.class_names), len(self.prompts[0]), -1).mean(1)
        return F.normalize(per_class, dim=-1)

    @torch.no_grad()
    def logits_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP's image-text logits (N, C): scale * cosine + bias."""
        device = self.text_embeds.device
        image = pooled_embedding(self.model.vision_model, pixel_values.to(device))
        image = F.normalize(image, dim=-1)
        scale = self.model.logit_scale.float().exp()
        return image @ self.text_embeds.T * scale + self.model.logit_bias.float()

    def zero_shot_proba(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Class probabilities (N, C) of PIL images; rows sum to 1 (see the module doc)."""
        return self.logits_from_pixels(self.preprocessor(images)).softmax(-1)

    def collate(self, examples: list[dict[str, Any]], train: bool) -> Batch:
        """Pixel values + class_label + index."""
        batch = labels_and_indices(examples)
        batch["pixel_values"] = self.preprocessor([e["image"] for e in examples])
        return batch

    def loss(self, batch: Batch, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Zero-shot has no training."""
        raise RuntimeError(
            "model.zero_shot: a zero-shot classifier has nothing to train; run with "
            "train=false (evaluation only), or set model.zero_shot=false to train a head"
        )

    def predict_proba(self, batch: Batch) -> torch.Tensor:
        """Softmax over the SigLIP logits, (B, C)."""
        return self.logits_from_pixels(batch["pixel_values"]).softmax(-1)


def build_zero_shot_classifier(
    model_cfg: Any, name: str, dtype: torch.dtype, class_names: Sequence[str]
) -> ZeroShotClassifier:
    """The zero-shot classifier of a full SigLIP checkpoint `name` (vision and text towers)."""
    config = load_config(name)
    if config.model_type != "siglip":
        raise ModelLoadError(
            f"model.zero_shot: {name!r} is a vision-only checkpoint "
            f"({config.model_type}); zero-shot needs the text tower (a full SiglipModel checkpoint "
            "such as google/medsiglip-448)"
        )
    try:
        model = SiglipModel.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except ImportError as err:  # e.g. a sentencepiece-only tokenizer without sentencepiece
        raise ImportError(f"loading the tokenizer of {name!r} needs: {err}") from err
    except (OSError, ValueError) as err:
        raise load_error(name, err) from err
    preprocessor = load_preprocessor(name, model_cfg.resize)
    templates = list(model_cfg.zero_shot_templates)
    log.info("siglip zero-shot from %s with templates %s", name, templates)
    return ZeroShotClassifier(
        contiguous_pooling(model), tokenizer, preprocessor, class_names, templates
    )
