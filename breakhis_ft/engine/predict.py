"""Predictions of a split: every example once, in index order, gathered across processes."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm


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


def on_device(classifier: nn.Module, accelerator: Accelerator) -> None:
    """Move a classifier that is not on the accelerator's device there."""
    first = next(classifier.parameters(), None)
    if first is not None and first.device != accelerator.device:
        classifier.to(accelerator.device)


def eval_loader(
    classifier: nn.Module, dataset: Dataset, accelerator: Accelerator, batch_size: int
) -> DataLoader:
    """Prompt-only (train=False) batches of `dataset`, sharded over the processes, on device."""
    return prepare_data_loader(
        make_loader(dataset, functools.partial(classifier.collate, train=False), batch_size),
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
    )


@torch.no_grad()
def predict(
    classifier: nn.Module,
    dataset: Dataset,
    accelerator: Accelerator,
    batch_size: int,
    forward: nn.Module | None = None,
    max_batches: int | None = None,
    before_batch: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities [N, C] (float32), labels [N] and dataset indices [N], sorted by index.

    Each process predicts its shard; `gather_for_metrics` per batch drops the padding that evens the
    shards, so every example appears exactly once. Every process gets the full result. `forward`:
    the wrapper a training recipe prepared (DDP/FSDP); without it the classifier runs as it is.
    `max_batches` (per process; debug presets): only the first examples, in index order.
    `before_batch`: called before each batch (a training recipe's stop check raises there).
    """
    if max_batches is not None:  # a prefix of the dataset: the loader still runs to its end
        n = min(len(dataset), max_batches * batch_size * accelerator.num_processes)
        dataset = Subset(dataset, range(n))
    if forward is None:
        forward = ClassifierForward(classifier)
        on_device(classifier, accelerator)
    loader = eval_loader(classifier, dataset, accelerator, batch_size)
    was_training = classifier.training
    classifier.eval()
    chunks: list[tuple[torch.Tensor, ...]] = []
    main = accelerator.is_main_process
    try:
        for batch in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=not main):
            if before_batch is not None:
                before_batch()
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
