"""Loading SigLIP checkpoints (MedSigLIP or the tiny one): config, vision tower, preprocessing.

A full `SiglipModel` checkpoint (as MedSigLIP ships) contributes its vision tower; a vision-only one
(`SiglipVisionModel`) loads as is. Errors name `model.name_or_path` and how to get access.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, SiglipVisionModel
from transformers.utils import logging as hf_logging

from breakhis_ft.errors import ModelLoadError
from breakhis_ft.models.base import load_error as base_load_error

SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")


def load_error(name: str, err: Exception) -> ModelLoadError:
    """The load error of a SigLIP checkpoint (see models.base.load_error)."""
    return base_load_error(name, err, "model=tiny_siglip")


def load_config(name: str) -> Any:
    """The checkpoint's config; refuses non-SigLIP architectures by name."""
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise load_error(name, err) from err
    if config.model_type not in SIGLIP_MODEL_TYPES:
        raise ModelLoadError(
            f"model.name_or_path: {name!r} is a {config.model_type!r} checkpoint; "
            f"model.kind=siglip needs one of {SIGLIP_MODEL_TYPES}"
        )
    return config


def checkpoint_identity(name: str, config: Any) -> dict[str, Any]:
    """What identifies the weights: name, hub commit, config hash, local files' size/mtime."""
    identity: dict[str, Any] = {
        "name_or_path": name,
        "commit": getattr(config, "_commit_hash", None),
        "config_sha": hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16],
    }
    folder = Path(name).expanduser()
    if folder.is_dir():
        identity["name_or_path"] = str(folder.resolve())
        identity["weights"] = [
            [f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(folder.glob("*.safetensors"))
        ]
    return identity


RESIZE_MODES = ("pad", "stretch", "shorter_side_crop")


def input_side(image_processor: Any) -> int:
    """The square input size of a SigLIP image processor (448 for MedSigLIP)."""
    size = getattr(image_processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge")
    if not side or size.get("width", side) != side:
        raise ValueError(f"model.resize=shorter_side_crop needs a square input size, got {size}")
    return int(side)


def shorter_side_crop(image: Image.Image, side: int) -> Image.Image:
    """eva's ResizeAndCrop: the shorter side to `side` (bilinear, antialiased as torchvision's
    v2.Resize), then the centred `side` x `side` crop (700x460 -> 682x448 -> 448x448)."""
    width, height = image.size
    scale = side / min(width, height)
    new = (max(side, round(width * scale)), max(side, round(height * scale)))
    image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - side) // 2, (new[1] - side) // 2
    return image.crop((left, top, left + side, top + side))


class SiglipPreprocessor:
    """Images -> pixel values by the checkpoint's processor; non-square: padded, stretched, or
    resized on the shorter side and centre-cropped (eva's preprocessing)."""

    def __init__(self, image_processor: Any, resize: str) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"model.resize: got {resize!r}, allowed: {', '.join(RESIZE_MODES)}")
        self.image_processor = image_processor
        self.resize = resize
        self.side = input_side(image_processor) if resize == "shorter_side_crop" else None
        # Pad with the processor's mean colour: after normalisation it is 0, a neutral input.
        mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def square(self, image: Image.Image) -> Image.Image:
        """A square image for the processor: padded (pad), cropped (shorter_side_crop), or left
        for the processor to stretch (stretch)."""
        image = image.convert("RGB")
        width, height = image.size
        if self.side is not None:
            return shorter_side_crop(image, self.side)
        if self.resize == "stretch" or width == height:
            return image
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel values (N, 3, H, W), float32, as the checkpoint's processor makes them."""
        out = self.image_processor(images=[self.square(i) for i in images], return_tensors="pt")
        return out["pixel_values"].float()

    def identity(self) -> dict[str, Any]:
        """Everything that changes the pixels: the processor's settings, resize mode, pad colour."""
        settings = json.loads(
            json.dumps(self.image_processor.to_dict(), sort_keys=True, default=str)
        )
        return {"resize": self.resize, "fill": list(self.fill), "processor": settings}


def load_preprocessor(name: str, resize: str) -> SiglipPreprocessor:
    """The checkpoint's image processor, wrapped with the resize mode."""
    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise load_error(name, err) from err
    return SiglipPreprocessor(image_processor, resize)


def load_vision_encoder(name: str, dtype: torch.dtype) -> SiglipVisionModel:
    """The vision tower of a full SiglipModel checkpoint, or a vision-only checkpoint."""
    verbosity = hf_logging.get_verbosity()
    # SiglipVisionModel reads the vision part of a full checkpoint (same weight names); transformers
    # would print every skipped text-tower weight: its report is silenced and checked here instead.
    hf_logging.set_verbosity_error()
    try:
        encoder, info = SiglipVisionModel.from_pretrained(
            name, dtype=dtype, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise load_error(name, err) from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        missing, mismatched = list(info["missing_keys"])[:5], list(info["mismatched_keys"])[:5]
        raise ModelLoadError(
            f"model.name_or_path={name!r}: the vision weights do not match the architecture "
            f"(missing {missing}, mismatched {mismatched})"
        )
    return contiguous_pooling(encoder)


class SequenceFirstAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention that runs its batch-first keys as one contiguous sequence-first copy.

    Batch-first, it transposes the keys into a strided view; with frozen weights torch 2.13 then
    projects them on the CPU as a `bmm` against the weight expanded once per patch (SigLIP-448's
    pooling head, bf16, batch 2: 42 s). A contiguous copy makes it one matmul (0.18 s), same values.
    """

    def forward(self, query, key, value, *args, **kwargs):  # noqa: D102 - nn.MultiheadAttention's
        if not self.batch_first or key is not value or query.dim() != 3:
            return super().forward(query, key, value, *args, **kwargs)
        kv = key.transpose(0, 1).contiguous()
        self.batch_first = False
        try:
            out, weights = super().forward(query.transpose(0, 1), kv, kv, *args, **kwargs)
        finally:
            self.batch_first = True
        return out.transpose(0, 1), weights


def contiguous_pooling(model: nn.Module) -> nn.Module:
    """`model` with every batch-first nn.MultiheadAttention run as SequenceFirstAttention (the
    same parameters and state-dict names: only the class changes)."""
    for module in model.modules():
        if type(module) is nn.MultiheadAttention and module.batch_first:
            module.__class__ = SequenceFirstAttention
    return model


def pooled_embedding(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pooled image embedding (the attention-pooling head, else the patches' mean), fp32."""
    weight = next(encoder.parameters())
    out = encoder(pixel_values=pixel_values.to(device=weight.device, dtype=weight.dtype))
    pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)
    return pooled.float()


def labels_and_indices(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The `class_label` and `index` tensors every batch carries (see base.Classifier)."""
    return {
        "class_label": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long),
        "index": torch.tensor([int(e["index"]) for e in examples], dtype=torch.long),
    }
