"""A toy Classifier and toy datasets for the engine tests (tiny CNN on 16x16 synthetic images).

Fault injection by loss-call count: `inf_loss_at`, `nan_grad_at`, `interrupt_at`
(KeyboardInterrupt), `kill_at` (SIGKILL of this process), `sigterm_at` (SIGTERM to this process,
as a scheduler sends it, during that micro-batch); and by predict_proba-call count,
`sigterm_in_eval_at`: failures at a chosen, reproducible point.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from breakhis_ft.config import TrainerConfig
from breakhis_ft.engine.optim import adamw
from breakhis_ft.engine.predict import predict
from breakhis_ft.engine.recipe import FitResult, RecipeSettings, TrainingRecipe
from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags
from breakhis_ft.models.base import Classifier
from breakhis_ft.models.precision import Precision

CLASSES = ("tubular_adenoma", "mucinous_carcinoma", "fibroadenoma", "ductal_carcinoma")


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class ToyClassifier(Classifier):
    """conv -> relu -> mean pool -> dropout -> linear; dropout makes resume depend on the RNG."""

    def __init__(self, class_names=CLASSES, dropout: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.norm = nn.LayerNorm(8)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8, len(self.class_names))
        self.calls = self.proba_calls = 0
        self.inf_loss_at = self.nan_grad_at = self.interrupt_at = self.kill_at = None
        self.sigterm_at = self.sigterm_in_eval_at = None

    def collate(self, examples: list[dict[str, Any]], train: bool) -> dict[str, Any]:
        images = np.stack([np.asarray(e["image"], dtype=np.float32) / 255.0 for e in examples])
        return {
            "pixel_values": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            "class_label": torch.tensor([e["label"] for e in examples], dtype=torch.long),
            "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        }

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        x = F.relu(self.conv(batch["pixel_values"])).mean(dim=(2, 3))
        return self.head(self.dropout(self.norm(x)))

    def loss(
        self, batch: dict[str, Any], class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.calls += 1
        if self.kill_at == self.calls:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.interrupt_at == self.calls:
            raise KeyboardInterrupt
        if self.sigterm_at == self.calls:  # the micro-batch goes on: the handler only records it
            os.kill(os.getpid(), signal.SIGTERM)
        logits = self.logits(batch)
        if self.nan_grad_at == self.calls:
            logits = _NanGrad.apply(logits)
        loss = F.cross_entropy(logits.float(), batch["class_label"], weight=class_weights)
        if self.inf_loss_at == self.calls:
            loss = loss * float("inf")
        return loss

    def predict_proba(self, batch: dict[str, Any]) -> torch.Tensor:
        self.proba_calls += 1
        if self.sigterm_in_eval_at == self.proba_calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.logits(batch).float().softmax(dim=-1)


class ToyDataset(Dataset):
    """Images whose mean colour depends on the class (learnable), plus per-image noise."""

    def __init__(self, n: int = 32, n_classes: int = 4, seed: int = 0, size: int = 16) -> None:
        # class colours shared by every dataset (train and val agree); noise differs by seed
        palette = torch.rand(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % n_classes for i in range(n)]
        noise = torch.rand(n, 3, size, size, generator=g)
        pixels = (0.6 * palette[self.labels] + 0.4 * noise).clamp(0, 1)
        self.images = [
            Image.fromarray((p.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for p in pixels
        ]
        self.records = [
            {
                "path": f"toy/{i:04d}.png",
                "patient": f"p{i % 5}",
                "magnification": (40, 100)[i % 2],
                "label": self.labels[i],
            }
            for i in range(n)
        ]
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def trainer_config(**overrides: Any) -> TrainerConfig:
    """A fast CPU trainer config for the toy model."""
    base = TrainerConfig(
        epochs=2,
        batch_size=4,
        eval_batch_size=8,
        lr=0.05,
        warmup_ratio=0.0,
        scheduler="constant",
        log_every_steps=1,
        cpu=True,
        keep_checkpoints=2,
    )
    return replace(base, **overrides)


def fresh_accelerator(cfg: TrainerConfig, precision: str = "fp32") -> Accelerator:
    """A new Accelerator; accelerate keeps process-wide singletons that must be reset in between."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return make_accelerator(cfg, precision)


def make_accelerator(cfg: TrainerConfig, precision: str = "fp32") -> Accelerator:
    """The Accelerator a run's setup builds for this trainer config and precision."""
    mixed = Precision.of(precision).mixed_precision
    return Accelerator(
        mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum, cpu=cfg.cpu
    )


def toy_metrics(probs, labels, indices, dataset) -> dict[str, Any]:
    """The metrics of a toy split (records are dicts with patient and magnification)."""
    rows = [dataset.records[i] for i in indices.tolist()]
    names = list(CLASSES)
    return compute_metrics(
        probs,
        labels,
        names,
        [r["patient"] for r in rows],
        [r["magnification"] for r in rows],
        malignant_flags(names),
    )


def fit(
    classifier, train_ds, val_ds, cfg, run_dir, acc, log_fn=None, resume=False, seed=42
) -> FitResult:
    """Train with the recipe as a run does (AdamW, the toy metrics)."""
    settings = RecipeSettings(cfg, Path(run_dir), adamw, toy_metrics, log_fn, seed)
    recipe = TrainingRecipe(classifier, train_ds, val_ds, acc, settings)
    return recipe.fit(resume=resume)


def evaluate_dataset(classifier, dataset, acc, batch_size: int) -> dict[str, Any]:
    """Predict a toy split and compute its metrics."""
    return toy_metrics(*predict(classifier, dataset, acc, batch_size), dataset)
