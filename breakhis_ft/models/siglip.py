"""A SigLIP image encoder (MedSigLIP) + a linear head: linear probe, LoRA or full fine-tuning.

Modes, from the config:
- `model.freeze_encoder=true`, `peft.method=none`: a linear probe. Only the head trains, on
  pooled embeddings computed once per image and cached on disk (`embedding_cache.py`): call
  `prepare_embeddings(paths, data_root)` before training; `collate` then looks them up by path.
- `peft.method=lora`: LoRA adapters (peft) on the encoder's attention and MLP layers + the head.
- `peft.method=none`, `freeze_encoder=false`: every weight trains.
A full `SiglipModel` checkpoint (as MedSigLIP ships) contributes its vision tower; a vision-only one
(`SiglipVisionModel`) loads as is. Zero-shot classification lives in `siglip_zero_shot.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from breakhis_ft.models.base import Batch, Classifier, processor_side
from breakhis_ft.models.embedding_cache import EmbeddingCache, EmbeddingTable
from breakhis_ft.models.lora import merged_weights
from breakhis_ft.models.precision import Precision
from breakhis_ft.models.siglip_loading import (
    SiglipPreprocessor,
    checkpoint_identity,
    labels_and_indices,
    load_config,
    load_preprocessor,
    load_vision_encoder,
    pooled_embedding,
)

log = logging.getLogger(__name__)

# LoRA targets on a SigLIP encoder: attention and MLP projections of the transformer layers. The
# pooling head's nn.MultiheadAttention reads its out_proj weight directly: LoRA there is inert.
ENCODER_LORA_REGEX = (
    r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc\d)"
)


def lora_targets(target_modules: Any, encoder: nn.Module) -> Any:
    """peft `target_modules` for a SigLIP encoder from `peft.target_modules`."""
    if target_modules in ("language_model", "encoder"):
        # "language_model" is the LoRA preset's default (MedGemma's LM); on an encoder it means the
        # encoder layers' attention and MLP, so `model=medsiglip_448 peft=lora` works unchanged.
        return ENCODER_LORA_REGEX
    if target_modules == "all-linear":
        # Every nn.Linear except those inside nn.MultiheadAttention (the pooling head), whose
        # weights it reads directly: peft's own "all-linear" would put an inert adapter there.
        inside_mha = {
            f"{name}.{child}" if name else child
            for name, module in encoder.named_modules()
            if isinstance(module, nn.MultiheadAttention)
            for child, _ in module.named_children()
        }
        return [
            name
            for name, module in encoder.named_modules()
            if isinstance(module, nn.Linear) and name not in inside_mha
        ]
    return list(target_modules)


class SiglipClassifier(Classifier):
    """SigLIP vision encoder -> pooled embedding -> linear head; softmax over the classes."""

    def __init__(
        self,
        encoder: nn.Module,
        preprocessor: SiglipPreprocessor,
        class_names: Sequence[str],
        mode: str,
        identity: dict[str, Any],
        embedding_cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("probe", "lora", "full"):
            raise ValueError(f"mode must be probe, lora or full, got {mode!r}")
        self.class_names = tuple(class_names)
        self.encoder = encoder
        self.preprocessor = preprocessor
        self.mode = mode
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, len(self.class_names))  # fp32 whatever the encoder's dtype
        self.embedding_cache = EmbeddingCache(
            embedding_cache_dir,
            {
                "checkpoint": identity,
                "preprocessing": preprocessor.identity(),
                "dtype": str(next(encoder.parameters()).dtype),
                "pooling": "pooler_output",
            },
        )
        self.embeddings = EmbeddingTable.empty(hidden)
        if mode == "probe":
            encoder.requires_grad_(False)
            encoder.eval()

    def train(self, mode: bool = True) -> SiglipClassifier:
        """Set training mode; a probe's frozen encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if self.mode == "probe":
            self.encoder.eval()
        return self

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pooled embeddings (N, D) of PIL images, float32 on the CPU, without autograd."""
        device = next(self.encoder.parameters()).device
        pixel_values = self.preprocessor(images).to(device)
        return pooled_embedding(self.encoder, pixel_values).cpu()

    def prepare_embeddings(
        self, paths: Sequence[str], data_root: str | Path, batch_size: int = 32
    ) -> int:
        """Probe: load cached embeddings of `paths` (relative to `data_root`), computing the missing
        ones with the encoder on its current device. Returns how many were computed."""
        table, computed = self.embedding_cache.get_or_compute(
            paths, data_root, self.embed_images, batch_size=batch_size
        )
        self.embeddings = self.embeddings.merged(table)
        return computed

    @property
    def input_side(self) -> int | None:
        """The square the SigLIP image processor resizes to (448 for MedSigLIP)."""
        return processor_side(self.preprocessor.image_processor)

    @property
    def needs_images(self) -> bool:
        """A probe's batches hold cached embeddings; LoRA and full fine-tuning need images."""
        return self.mode != "probe"

    def prepare_cached_inputs(self, datasets: Sequence[Any], data_root: str | Path) -> int:
        """Probe: embed every image of `datasets` once (disk-cached); others compute nothing."""
        if self.mode != "probe":
            return 0
        return self.prepare_embeddings([r.path for d in datasets for r in d.records], data_root)

    def collate(self, examples: list[dict[str, Any]], train: bool) -> Batch:
        """Probe: cached embeddings looked up by `path`; otherwise pixel values from `image`."""
        batch = labels_and_indices(examples)
        if self.mode == "probe":
            batch["embeddings"] = self.embeddings.lookup([e["path"] for e in examples])
        else:
            if any(e.get("image") is None for e in examples):
                raise ValueError(
                    f"SigLIP {self.mode} fine-tuning needs the images: build the dataset with "
                    "with_images=True (only the linear probe trains from cached embeddings)"
                )
            batch["pixel_values"] = self.preprocessor([e["image"] for e in examples])
        return batch

    def logits(self, batch: Batch) -> torch.Tensor:
        """Class logits (B, C), float32."""
        if "embeddings" in batch:
            features = batch["embeddings"].float()
        else:
            features = pooled_embedding(self.encoder, batch["pixel_values"])
        return self.head(features.to(self.head.weight)).float()

    def loss(self, batch: Batch, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the head's logits (optionally class-weighted)."""
        logits = self.logits(batch)
        weight = None if class_weights is None else class_weights.to(logits)
        return F.cross_entropy(logits, batch["class_label"].to(logits.device), weight=weight)

    @torch.no_grad()
    def predict_proba(self, batch: Batch) -> torch.Tensor:
        """Softmax over the classes, (B, C)."""
        return self.logits(batch).softmax(-1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute encoder activations in the backward pass (LoRA and full fine-tuning)."""
        if self.mode != "probe":
            self.encoder.activation_checkpointing_enable({"use_reentrant": False})

    def save_trained(self, directory: str | Path) -> None:
        """head.safetensors, + adapter/ (peft save_pretrained) or encoder.safetensors (full)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()},
            str(directory / "head.safetensors"),
        )
        if self.mode == "lora":
            self.encoder.save_pretrained(str(directory / "adapter"))
        elif self.mode == "full":
            state = {k: v.contiguous() for k, v in self.encoder.state_dict().items()}
            save_file(state, str(directory / "encoder.safetensors"))
        meta = {"mode": self.mode, "class_names": list(self.class_names)}
        (directory / "siglip_classifier.json").write_text(json.dumps(meta, indent=1))

    def load_trained(self, directory: str | Path) -> None:
        """Restore what `save_trained` wrote; refuses a checkpoint of another mode or class list."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        directory = Path(directory)
        meta = json.loads((directory / "siglip_classifier.json").read_text())
        if meta["mode"] != self.mode or tuple(meta["class_names"]) != self.class_names:
            raise ValueError(
                f"{directory} holds a {meta['mode']} checkpoint for classes {meta['class_names']}; "
                f"this classifier is {self.mode} for {list(self.class_names)}"
            )
        self.head.load_state_dict(load_file(str(directory / "head.safetensors")))
        if self.mode == "lora":
            weights = load_peft_weights(str(directory / "adapter"))
            result = set_peft_model_state_dict(self.encoder, weights)
            if result.unexpected_keys:
                raise KeyError(f"adapter keys not in the model: {result.unexpected_keys[:5]}")
        elif self.mode == "full":
            self.encoder.load_state_dict(load_file(str(directory / "encoder.safetensors")))

    # ---- export ---------------------------------------------------------------------------------

    @classmethod
    def trains_weights(cls, model_cfg: Any) -> bool:
        """A zero-shot classifier (`model.zero_shot`) has none."""
        return not model_cfg.zero_shot

    @classmethod
    def reads_resized_images(cls, model_cfg: Any, peft_method: str) -> bool:
        """A linear probe embeds the original image files (embedding cache); the others read the
        resized images."""
        return classifier_mode(peft_method, bool(model_cfg.freeze_encoder)) != "probe"

    @classmethod
    def preprocessing_steps(cls, model_cfg: Any, image_size: int | None) -> dict[str, Any]:
        """How the image is made square (`model.resize`), the fill colour of padding, and the
        processor's square where images are resized (from the checkpoint's processor files)."""
        pre = load_preprocessor(str(model_cfg.name_or_path), str(model_cfg.resize))
        # pad: centred on a canvas of the processor's mean colour
        steps: dict[str, Any] = {"square": pre.resize, "fill": list(pre.fill)}
        if image_size is not None:
            steps["model_side"] = processor_side(pre.image_processor)
        return steps

    @classmethod
    def merged_overrides(cls) -> dict[str, Any]:
        """A merged export is an encoder and a head: loaded as a probe (frozen encoder)."""
        return {"freeze_encoder": True}

    def save_merged(self, out_dir: str | Path, dtype: torch.dtype) -> None:
        """The encoder with any adapter merged in, its image processor, and the head as a probe's
        best/ holds it, so the folder loads like a trained probe."""
        merged_weights(self.encoder).to(dtype).save_pretrained(str(out_dir))  # safetensors
        self.preprocessor.image_processor.save_pretrained(str(out_dir))
        head = {k: v.contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, str(Path(out_dir) / "head.safetensors"))
        meta = {"mode": "probe", "class_names": list(self.class_names)}
        (Path(out_dir) / "siglip_classifier.json").write_text(json.dumps(meta, indent=1))

    def load_merged(self, model_dir: str | Path) -> None:
        """The head saved beside the merged encoder."""
        self.load_trained(model_dir)


def classifier_mode(peft_method: str, freeze_encoder: bool) -> str:
    """probe, lora or full from `peft.method` and `model.freeze_encoder` (validated at compose)."""
    if peft_method == "lora":
        return "lora"
    return "probe" if freeze_encoder else "full"


def build_siglip_classifier(
    model_cfg: Any,
    checkpoint: str,
    peft_method: str,
    lora: LoraConfig | None,
    target_modules: Any,
    precision: Precision,
    class_names: Sequence[str],
    cache_dirs: Any = None,
) -> Classifier:
    """A SigLIP classifier at `checkpoint`: linear probe, LoRA or full fine-tune (or zero-shot).

    `model.zero_shot=true` returns the zero-shot classifier instead. The encoder's weights are in
    the precision's dtype when frozen (probe) or adapted (LoRA); a full fine-tune keeps float32
    master weights (accelerate's autocast computes in bf16/fp16). The head is float32. A probe's
    embeddings persist under `cache_dirs.embeddings` (None: memory only).
    """
    if model_cfg.zero_shot:
        from breakhis_ft.models.siglip_zero_shot import build_zero_shot_classifier

        return build_zero_shot_classifier(model_cfg, checkpoint, precision.dtype, class_names)
    mode = classifier_mode(peft_method, bool(model_cfg.freeze_encoder))
    config = load_config(checkpoint)
    dtype = torch.float32 if mode == "full" else precision.dtype
    encoder: nn.Module = load_vision_encoder(checkpoint, dtype)
    preprocessor = load_preprocessor(checkpoint, model_cfg.resize)
    identity = checkpoint_identity(checkpoint, config)
    if mode == "lora":
        from peft import get_peft_model

        lora = replace(lora, target_modules=lora_targets(target_modules, encoder))
        encoder = get_peft_model(encoder, lora)  # adapters in float32 (autocast_adapter_dtype)
    embeddings = None if cache_dirs is None else cache_dirs.embeddings
    classifier = SiglipClassifier(encoder, preprocessor, class_names, mode, identity, embeddings)
    # what trains is logged by the training run: an inference model (predict, export) trains nothing
    log.info("loaded siglip %s from %s", mode, checkpoint)
    return classifier
