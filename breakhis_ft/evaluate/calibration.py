"""Calibration: ECE/MCE, Brier score, NLL, reliability bins and temperature scaling.

Everything works from class probabilities (what predictions_<split>.csv stores); temperature
scaling rescales log-probabilities, which equals rescaling logits because softmax ignores a
per-row constant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

PROB_FLOOR = 1e-12  # log(0) would make one confident mistake an infinite NLL
CALIBRATION_FILE = "calibration.json"  # in a run folder, its best/ and an export: the temperature
T_BOUNDS = (1e-2, 1e2)  # the temperature search interval
GAP_COLOUR = "#f4a3a3"  # a reliability diagram's confidence - accuracy gap (light red)
GAP_HATCH = "#c0392b"  # its hatching (dark red)
_GOLDEN = (math.sqrt(5) - 1) / 2


def _checked(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probs [N, C] float64 and labels [N] int64, checked for shape and range."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or labels.shape != (len(probs),) or len(probs) == 0:
        raise ValueError(
            f"need probs [N, C] and labels [N], N > 0; got {probs.shape}, {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {probs.shape[1]})")
    return probs, labels


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, shifted by the row max so exp cannot overflow."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def calibration_metrics(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, float]:
    """ECE, MCE (top-label, `n_bins` equal-width bins), multiclass Brier score and NLL.

    - `ece`: torchmetrics multiclass_calibration_error, norm "l1": sum over bins of
      |accuracy - mean confidence| weighted by the bin's share of images.
    - `mce`: the same with norm "max": the largest |accuracy - confidence| gap over the bins.
    - `brier`: mean over images of sum over classes of (p_c - onehot_c)^2, in [0, 2].
    - `nll`: mean over images of -log p_true, p_true floored at PROB_FLOOR (1e-12).
    """
    probs, labels = _checked(probs, labels)
    n_classes = probs.shape[1]
    preds, target = torch.from_numpy(probs), torch.from_numpy(labels)
    ce = {
        norm: float(multiclass_calibration_error(preds, target, n_classes, n_bins, norm))
        for norm in ("l1", "max")
    }
    onehot = np.eye(n_classes)[labels]
    p_true = probs[np.arange(len(labels)), labels]
    return {
        "ece": ce["l1"],
        "mce": ce["max"],
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "nll": float(np.mean(-np.log(np.maximum(p_true, PROB_FLOOR)))),
    }


def _nll_at(log_t: float, z: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL of softmax(z / T) at T = exp(log_t)."""
    logp = _log_softmax(z / math.exp(log_t))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def fit_temperature(logits: Any, labels: Any, tol: float = 1e-6) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (validation) labels.

    `logits` are logits or log-probabilities ([N, C]; for probabilities pass `np.log(probs)`).
    The NLL is convex in 1/T, hence unimodal in log T, so a golden-section search on log T over
    T_BOUNDS finds the minimum deterministically (to `tol` in log T). If the optimum lies at a
    bound (e.g. a set where every image is right, whose NLL keeps falling as T -> 0) the bound is
    returned.
    """
    z = np.asarray(logits, dtype=np.float64)
    z, labels = _checked(np.where(np.isfinite(z), z, math.log(PROB_FLOOR)), labels)
    if np.all(z >= 0) and np.allclose(z.sum(axis=1), 1.0):
        raise ValueError("fit_temperature got probabilities; pass logits or np.log(probs)")
    a, b = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _nll_at(c, z, labels), _nll_at(d, z, labels)
    while b - a > tol:
        if fc <= fd:  # the minimum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _nll_at(c, z, labels)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _nll_at(d, z, labels)
    return math.exp((a + b) / 2)


def apply_temperature(probs: Any, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities softmax(log p / T) (p floored at PROB_FLOOR), [N, C]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), PROB_FLOOR))
    return np.exp(_log_softmax(logp / temperature))


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, list]:
    """Per-bin mean top-label confidence, accuracy and count, for a reliability diagram.

    Bins are [k/n, (k+1)/n), the last one closed at 1, the binning of torchmetrics' calibration
    error, so sum(count * |accuracy - confidence|) / N is `ece`; torchmetrics alone gives a
    confidence of exactly 1.0 a bin of its own, so the two differ slightly when such
    confidences occur. Empty bins have confidence and accuracy None and count 0.
    Returns `edges` (n_bins + 1), `confidence`, `accuracy`, `count` (n_bins each).
    """
    probs, labels = _checked(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(right) - 1 is torch.bucketize(right=True) - 1; 1.0 is folded into the top bin
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    hit_sum = np.bincount(index, weights=correct, minlength=n_bins)
    return {
        "edges": edges.tolist(),
        "confidence": [float(s / n) if n else None for s, n in zip(conf_sum, count, strict=True)],
        "accuracy": [float(s / n) if n else None for s, n in zip(hit_sum, count, strict=True)],
        "count": count.tolist(),
    }


def plot_reliability(bins: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Write a reliability diagram PNG (accuracy bars per confidence bin, the diagonal, counts)."""
    try:  # plots are the optional `plots` extra: import only when a figure is asked for
        import matplotlib
    except ImportError as err:
        raise ImportError("plot_reliability needs matplotlib: pip install -e '.[plots]'") from err
    matplotlib.use("Agg")  # no display on a server or in a container
    import matplotlib.pyplot as plt

    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    accuracy = [a if a is not None else 0.0 for a in bins["accuracy"]]
    confidence = [c if c is not None else 0.0 for c in bins["confidence"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(edges[:-1], accuracy, width, align="edge", edgecolor="black", label="accuracy")
    gap = np.subtract(confidence, accuracy)  # drawn from accuracy up (or down) to confidence
    # opaque and hatched: a gap below accuracy lies over its bar, where a translucent one would
    # blend into another colour than the legend's; the accuracy bars' outlines drawn over it
    ax.bar(
        edges[:-1],
        gap,
        width,
        bottom=accuracy,
        align="edge",
        facecolor=GAP_COLOUR,
        edgecolor=GAP_HATCH,
        hatch="//",
        linewidth=0,
        label="gap",
    )
    ax.bar(edges[:-1], accuracy, width, align="edge", fill=False, edgecolor="black")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    for left, w, n in zip(edges[:-1], width, bins["count"], strict=True):
        if n:
            ax.text(left + w / 2, 0.02, str(n), ha="center", fontsize=6, rotation=90)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def read_temperature(folder: str | Path) -> float | None:
    """The fitted temperature in `folder/calibration.json`; None if absent or turned off."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("temperature")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a calibration file ({err}); delete it or rerun") from err
    if value is not None and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{path}: temperature must be a positive number, got {value!r}")
    return None if value is None else float(value)
