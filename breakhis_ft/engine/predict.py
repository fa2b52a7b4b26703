"""Predictions of a split: every example once, in index order, gathered across processes."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.utils.data import DataLoader, Dataset

from breakhis_ft.engine.evaluate import compute_metrics, malignant_flags

# id(classifier) -> its prepared ClassifierForward, so `predict` goes through DDP/FSDP when `fit`
# prepared it; weak values: an entry lives as long as the accelerator keeps the wrapper (which
# keeps the classifier, so the id cannot be reused meanwhile)
_PREPARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_prepared(classifier: nn.Module, forward: nn.Module) -> None:
    """Remember the prepared wrapper of `classifier`, for `predict` to go through it."""
    _PREPARED[id(classifier)] = forward


class ClassifierForward(nn.Module):
    """Routes forward() to the classifier's loss or probabilities (what accelerate wraps)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, batch: dict, mode: str = "loss", class_weights: torch.Tensor | None = None):
        """The loss (mode="loss", class-weighted when weights are given) or probabilities."""
        if mode == "proba":
            return self.classifier.predict_proba(batch)
        if class_weights is not None:
            return self.classifier.loss(batch, class_weights=class_weights)
        return self.classifier.loss(batch)


def make_loader(
    dataset, collate, batch_size: int, sampler=None, num_workers: int = 0, seed: int = 0
):
    """A DataLoader with its own generator: it never draws from the global RNG (exact resume)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def _metadata(dataset: Any, indices: torch.Tensor) -> tuple[list | None, list | None]:
    """Patients and magnifications of the examples at `indices`, from `dataset.records`."""
    records = getattr(dataset, "records", None)
    if records is None:
        return None, None

    def get(record, key):
        return record[key] if isinstance(record, dict) else getattr(record, key)

    rows = [records[i] for i in indices.tolist()]
    return [get(r, "patient") for r in rows], [int(get(r, "magnification")) for r in rows]


def evaluate_dataset(classifier, dataset, accelerator: Accelerator, batch_size: int) -> dict:
    """Predict a split and compute its metrics (patients/magnifications from `dataset.records`)."""
    probs, labels, indices = predict(classifier, dataset, accelerator, batch_size)
    patients, mags = _metadata(dataset, indices)
    names = list(classifier.class_names)
    return compute_metrics(probs, labels, names, patients, mags, malignant_flags(names))


@torch.no_grad()
def predict(
    classifier: nn.Module, dataset: Dataset, accelerator: Accelerator, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities [N, C] (float32), labels [N] and dataset indices [N], sorted by index.

    Each process predicts its shard; `gather_for_metrics` per batch drops the padding that evens the
    shards, so every example appears exactly once. Every process gets the full result.
    """
    forward = _PREPARED.get(id(classifier))
    if forward is None:
        forward = ClassifierForward(classifier)
        first = next(classifier.parameters(), None)
        if first is not None and first.device != accelerator.device:
            classifier.to(accelerator.device)
    loader = prepare_data_loader(
        make_loader(dataset, functools.partial(classifier.collate, train=False), batch_size),
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
    )
    was_training = classifier.training
    classifier.eval()
    chunks: list[tuple[torch.Tensor, ...]] = []
    try:
        for batch in loader:
            with accelerator.autocast():
                probs = forward(batch, mode="proba")
            gathered = accelerator.gather_for_metrics(
                (probs.float(), batch["class_label"], batch["index"])
            )
            chunks.append(tuple(t.cpu() for t in gathered))
    finally:
        classifier.train(was_training)
    probs, labels, indices = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    order = indices.argsort()
    probs, labels, indices = probs[order], labels[order], indices[order]
    if len(indices.unique()) != len(indices) or len(indices) != len(dataset):
        raise RuntimeError(
            f"predict gathered {len(indices)} rows ({len(indices.unique())} distinct) for "
            f"{len(dataset)} examples: duplicated or missing predictions"
        )
    return probs, labels, indices
