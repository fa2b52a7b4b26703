"""Seeded data order for training: the order of an epoch depends only on (seed, epoch).

Resuming mid-epoch is bit-exact only when the sampler can replay an epoch's order and the
DataLoader does not draw from the global RNG (it does when it has no generator of its own), so the
consumed batches can be skipped with accelerate's `skip_first_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffles (or draws class-balanced, with replacement) with a generator seeded seed + epoch."""

    def __init__(self, labels: Sequence[int], seed: int, balanced: bool = False) -> None:
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.seed = seed
        self.balanced = balanced
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration replays."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.labels)
        if not self.balanced:
            return iter(torch.randperm(n, generator=generator).tolist())
        # each class equally likely per draw: weight 1/count for every example of a class
        counts = torch.bincount(self.labels).float()
        weights = 1.0 / counts[self.labels]
        return iter(torch.multinomial(weights, n, replacement=True, generator=generator).tolist())


def dataset_labels(dataset: Any) -> list[int]:
    """Class index of every example: `dataset.labels`, a `label` column, or by iterating."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return [int(x) for x in labels]
    column_names = getattr(dataset, "column_names", None)
    if column_names and "label" in column_names:
        return [int(x) for x in dataset["label"]]
    # slow path (decodes every example): datasets should expose `labels`
    return [int(dataset[i]["label"]) for i in range(len(dataset))]


def inverse_frequency_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Class weights N / (C * count_c) (sklearn's "balanced"); 0 for classes absent in training."""
    counts = torch.bincount(torch.as_tensor(list(labels)), minlength=n_classes).float()
    weights = torch.zeros(n_classes)
    present = counts > 0
    weights[present] = counts.sum() / (n_classes * counts[present])
    return weights
