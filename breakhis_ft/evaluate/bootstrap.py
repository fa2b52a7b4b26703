"""Confidence intervals by patient: a percentile bootstrap that resamples patients, not images.

The images of one patient come from the same tumour and slides, so they are strongly correlated;
resampling images would count ~100 images of a patient as ~100 independent observations and give
intervals that are too narrow. Each resample draws as many patients as there are, with
replacement, and takes all the images of every drawn patient (a patient drawn twice counts twice).

A metric function takes `(probs [n, C] float64, labels [n] int64)` numpy arrays and returns a
float, or None/NaN where the metric is undefined on that sample. Undefined resample values are
dropped (not counted as 0) and the number of valid resamples is reported with each interval.
The metric functions here follow the definitions of the torchmetrics-based `compute_metrics`, so
their values on the full split equal the figures in metrics.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], float | None]


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval, its point estimate and the resamples it rests on."""

    estimate: float | None  # the metric on the full sample
    lo: float | None  # None when no resample gave a defined value
    hi: float | None
    level: float
    n_valid: int  # resamples where the metric was defined
    n_resamples: int

    @property
    def n_dropped(self) -> int:
        """Resamples where the metric was undefined (left out of the percentiles)."""
        return self.n_resamples - self.n_valid

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: estimate, lo, hi, level, n_valid, n_dropped."""
        return {
            "estimate": self.estimate,
            "lo": self.lo,
            "hi": self.hi,
            "level": self.level,
            "n_valid": self.n_valid,
            "n_dropped": self.n_dropped,
        }


def as_arrays(
    probs: Any, labels: Any, patients: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probs [N, C] float64, labels [N] int64 and patient ids [N] str, checked for shape."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    patients = np.asarray([str(p) for p in patients])
    if probs.ndim != 2 or labels.shape != (len(probs),) or patients.shape != (len(probs),):
        raise ValueError(
            f"need probs [N, C], labels [N], patients [N]; got probs {probs.shape}, "
            f"labels {labels.shape}, patients {patients.shape}"
        )
    if len(probs) == 0:
        raise ValueError("cannot bootstrap an empty split")
    return probs, labels, patients


def patient_resamples(
    patients: Sequence[Any], n_resamples: int = 1000, seed: int = 0
) -> Iterator[np.ndarray]:
    """Image indices of each resample: patients drawn with replacement, each with all its images.

    Patients are numbered in sorted id order, so the resamples depend on the ids and the seed
    only, not on the order of the images; two runs on the same images get the same resamples.
    """
    _, codes = np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)
    n_patients = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    images = np.arange(len(codes))
    for _ in range(n_resamples):
        draws = rng.integers(0, n_patients, size=n_patients)
        copies = np.bincount(draws, minlength=n_patients)
        # each image appears as often as its patient was drawn; order is irrelevant to metrics
        yield np.repeat(images, copies[codes])


def defined(value: float | None) -> float | None:
    """The value as a float, or None where it is None, NaN or infinite (undefined)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def percentile_interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """The (1-level)/2 and (1+level)/2 quantiles of the values (numpy's linear interpolation)."""
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_intervals(
    metric_fns: Mapping[str, MetricFn],
    probs: Any,
    labels: Any,
    patients: Sequence[Any],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Patient-bootstrap percentile intervals of several metrics over one shared set of resamples.

    Every metric sees the same resamples (one pass). A resample where a metric returns None/NaN
    is dropped for that metric only; `Interval.n_valid` says how many remained.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    probs, labels, patients = as_arrays(probs, labels, patients)
    values: dict[str, list[float]] = {name: [] for name in metric_fns}
    for idx in patient_resamples(patients, n_resamples, seed):
        sample_probs, sample_labels = probs[idx], labels[idx]
        for name, fn in metric_fns.items():
            value = defined(fn(sample_probs, sample_labels))
            if value is not None:
                values[name].append(value)
    intervals = {}
    for name, fn in metric_fns.items():
        lo, hi = percentile_interval(values[name], level) if values[name] else (None, None)
        intervals[name] = Interval(
            defined(fn(probs, labels)), lo, hi, level, len(values[name]), n_resamples
        )
    return intervals


def patient_bootstrap(
    metric_fn: MetricFn,
    probs: Any,
    labels: Any,
    patients: Sequence[Any],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The patient-bootstrap percentile interval of one metric (see `bootstrap_intervals`)."""
    intervals = bootstrap_intervals(
        {"metric": metric_fn}, probs, labels, patients, n_resamples, seed, level
    )
    return intervals["metric"]


# Metric functions, numpy re-implementations of compute_metrics' definitions (fast enough to run
# a thousand times; tests check them against torchmetrics / scikit-learn).


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose argmax class is the label."""
    return float(np.mean(probs.argmax(axis=1) == labels))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (sklearn's balanced_accuracy_score).

    A class absent from a resample has no recall and is left out of the mean, so the value is
    always defined; with classes lost it averages fewer classes, as on a small split.
    """
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    support = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[preds == labels], minlength=n_classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def f1_macro(probs: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 over the classes in labels or predictions (torchmetrics' macro average)."""
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    tp = np.bincount(labels[preds == labels], minlength=n_classes)
    fp = np.bincount(preds, minlength=n_classes) - tp
    fn = np.bincount(labels, minlength=n_classes) - tp
    seen = (tp + fp + fn) > 0  # a class neither present nor predicted has no F1: left out
    return float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given their average rank (the Mann-Whitney convention)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def auroc_macro(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean one-vs-rest AUROC over classes with both positives and negatives; None if none.

    A class lost from a resample (or present alone) has no AUROC and is left out of the mean, as
    `compute_metrics` does for a small split; the resample is dropped only if no class is left.
    """
    values = []
    for c in np.unique(labels):
        positive = labels == c
        n_pos = int(positive.sum())
        n_neg = len(labels) - n_pos
        if n_neg == 0:
            continue
        rank_sum = _average_ranks(probs[:, c])[positive].sum()
        values.append((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(values)) if values else None


STANDARD_METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "f1_macro": f1_macro,
    "auroc_macro": auroc_macro,
}
