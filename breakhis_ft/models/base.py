"""The one interface between models and the engine: a Classifier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from breakhis_ft.errors import ModelLoadError

Batch = dict[str, Any]


def load_error(name: str, err: Exception, tiny_option: str) -> ModelLoadError:
    """The error for a gated, missing or unreadable checkpoint: names the key and the fixes."""
    local_copy = (
        "point model.name_or_path at a local copy of the checkpoint (config.json, *.safetensors "
        f"and the processor files); {tiny_option} builds a tiny local one for tests"
    )
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        return ModelLoadError(
            f"model.name_or_path={name!r}: no such folder. Fix: {local_copy}; or give a hub id "
            "(gated ones, such as google/medgemma-4b-it, need their licence accepted and HF_TOKEN)"
        )
    gated = "gated" in type(err).__name__.lower() or "gated" in str(err).lower()
    first_line = str(err).splitlines()[0] if str(err) else ""
    return ModelLoadError(
        f"could not load model.name_or_path={name!r} "
        f"({type(err).__name__}{', gated model: access not granted' if gated else ''}: "
        f"{first_line}). Fix: for a gated hub model (google/medgemma-4b-it and "
        f"google/medsiglip-448 are), accept the licence on https://huggingface.co/{name} and set "
        f"HF_TOKEN (or run `hf auth login`); or {local_copy}"
    )


class Classifier(nn.Module):
    """A model that classifies images into `class_names`.

    Examples reaching `collate` are dicts with `image` (PIL RGB), `label` (class index) and `index`
    (position of the record in its split). Every batch it returns carries `class_label` and `index`
    (LongTensors) beside the model's own inputs, so the engine can gather predictions per record.

    What differs between model families beyond that lives on the family's subclass: its run-time
    caches, the final evaluation, and export. The classmethods answer from a family's config
    (`model.*`) without building a model (`models.factory.classifier_type` finds the family).
    """

    class_names: tuple[str, ...]
    eval_mode: str = "score"  # how a run's final evaluation classifies: score | generate | both

    def collate(self, examples: list[dict[str, Any]], train: bool) -> Batch:
        """Turn dataset examples into a batch of tensors (train: with training targets)."""
        raise NotImplementedError

    def loss(self, batch: Batch, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar training loss of a batch; `class_weights` (n_classes,) reweights examples."""
        raise NotImplementedError

    def predict_proba(self, batch: Batch) -> torch.Tensor:
        """Class probabilities, shape (batch, n_classes), rows summing to 1."""
        raise NotImplementedError

    @property
    def needs_images(self) -> bool:
        """Whether batches need decoded images (False: they look up cached features)."""
        return True

    @property
    def input_side(self) -> int | None:
        """The side of the square its image processor resizes every image to (None: unknown).

        Images need not be cached or resized any larger than this (data/dataset.py)."""
        return None

    def prepare_cached_inputs(self, datasets: Sequence[Any], data_root: str | Path) -> int:
        """Compute once what batches look up instead of images; returns how many were computed.

        Datasets are ImageDatasets (`records`, `load(i)`); run it on the main process first."""
        return 0

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for activation memory in the trainable part."""

    def configure_run_caches(self, cfg: Any, stain_identity: str | None = None) -> None:
        """Set up what the family caches between runs for a run of the config `cfg` (MedGemma:
        its vision features); `stain_identity`: the run's stain normaliser. Nothing by default."""

    def prepare_final_evaluation(self) -> bool:
        """Ready the model for a run's final evaluation; True where its modules changed (an
        adapter merged), so a wrapper prepared for training no longer holds them."""
        return False

    def save_trained(self, directory: str | Path) -> None:
        """Save what training changed (adapter or head) so `load_trained` restores it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(directory / "trainable.safetensors"))

    def load_trained(self, directory: str | Path) -> None:
        """Restore what `save_trained` wrote."""
        self.load_trainable_state_dict(load_file(str(Path(directory) / "trainable.safetensors")))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train (adapter, head): small checkpoints for a 4B model."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a `trainable_state_dict`; every key must exist in the model."""
        missing = set(state) - set(self.state_dict())
        if missing:
            raise KeyError(f"checkpoint keys not in the model: {sorted(missing)[:5]}")
        self.load_state_dict(state, strict=False)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total

    # ---- export ---------------------------------------------------------------------------------

    @classmethod
    def trains_weights(cls, model_cfg: Any) -> bool:
        """Whether a model of this config has weights to train, load back and export."""
        return True

    @classmethod
    def reads_resized_images(cls, model_cfg: Any, peft_method: str) -> bool:
        """Whether a model of this config reads the resized images (data.image_size) rather than
        the original files (a SigLIP probe's embeddings)."""
        return True

    @classmethod
    def preprocessing_steps(cls, model_cfg: Any, image_size: int | None) -> dict[str, Any]:
        """The family's preprocessing steps as an export states them: by default `model_side`, the
        square of the checkpoint's image processor (the cached longest side is capped so that the
        shorter side keeps it), where images are resized to `image_size`."""
        if image_size is None:
            return {}
        from transformers import AutoImageProcessor  # the processor's files only

        processor = AutoImageProcessor.from_pretrained(str(model_cfg.name_or_path))
        return {"model_side": processor_side(processor)}

    @classmethod
    def answer_details(cls, model_cfg: Any, class_names: Sequence[str]) -> dict[str, Any]:
        """What an export says about the classes' outputs: each class and its index."""
        return {"answers": [{"class": name, "index": i} for i, name in enumerate(class_names)]}

    @classmethod
    def merged_overrides(cls) -> dict[str, Any]:
        """The `model.*` values that load a merged export (`save_merged`) of this family."""
        return {}

    def save_merged(self, out_dir: str | Path, dtype: torch.dtype) -> None:
        """Save the model, any adapter merged in, as a from_pretrained checkpoint in `dtype` with
        what classifying needs beside it (processor, head)."""
        raise NotImplementedError

    def load_merged(self, model_dir: str | Path) -> None:
        """Finish a classifier built from a merged export (`merged_overrides`): for inference."""
        self.requires_grad_(False)


def processor_side(image_processor: Any) -> int | None:
    """The side of an image processor's square output size ({"height": S, "width": S}), or None
    when it has no fixed square size."""
    size = getattr(image_processor, "size", None) or {}
    height, width = size.get("height"), size.get("width")
    return int(height) if height and height == width else None
