"""Comparing two runs on the same images: a paired group bootstrap, and interval separation.

Pairing matters: two runs evaluated on the same test patients share the luck of that draw of
patients, so the interval of their difference, computed on the same resamples for both, is much
narrower than what two separate intervals suggest. The resamples are `bootstrap_intervals'`:
the split's units (stems or patient folders), stratified by class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from breakhis_ft.evaluate.bootstrap import (
    Interval,
    MetricFn,
    as_arrays,
    defined,
    percentile_interval,
    unit_resamples,
)

_SHOWN = 3  # example paths quoted in an alignment error


def _examples(paths: set[str]) -> str:
    """A few of the paths, sorted, for an error message."""
    shown = sorted(paths)[:_SHOWN]
    return ", ".join(shown) + (", ..." if len(paths) > _SHOWN else "")


def _index_by_path(pred: Mapping[str, Any], name: str) -> dict[str, int]:
    """Row index of each path of one run; an error if a path occurs twice."""
    index: dict[str, int] = {}
    for i, path in enumerate(pred["paths"]):
        if path in index:
            raise ValueError(f"run {name} lists image {path!r} twice")
        index[str(path)] = i
    return index


def align_predictions(pred_a: Mapping[str, Any], pred_b: Mapping[str, Any]) -> dict[str, Any]:
    """Two runs' predictions on the same images, matched by path, in run A's row order.

    Each run is a mapping of columns as `read_predictions` returns: `paths`, `patients`,
    `labels`, `probs` and optionally `classes`. Raises ValueError if the image sets differ
    (counting and quoting the images each run lacks), a path is listed twice, the class lists
    differ, or the runs disagree on an image's label or patient. Returns `paths`, `patients`,
    `labels` (int64 [N]), `probs_a`, `probs_b` (float64 [N, C]) and `classes` (A's, or None).
    """
    if "classes" in pred_a and "classes" in pred_b:
        if list(pred_a["classes"]) != list(pred_b["classes"]):
            raise ValueError(
                f"the runs' classes differ: {pred_a['classes']} vs {pred_b['classes']}"
            )
    index_a, index_b = _index_by_path(pred_a, "A"), _index_by_path(pred_b, "B")
    only_a, only_b = index_a.keys() - index_b.keys(), index_b.keys() - index_a.keys()
    if only_a or only_b:
        raise ValueError(
            "the runs are not on the same images: "
            f"{len(only_a)} only in A ({_examples(only_a)}), "
            f"{len(only_b)} only in B ({_examples(only_b)})"
        )
    order_b = np.array([index_b[p] for p in index_a], dtype=np.int64)
    labels_a, labels_b = np.asarray(pred_a["labels"]), np.asarray(pred_b["labels"])[order_b]
    patients_a = [str(p) for p in pred_a["patients"]]
    patients_b = [str(pred_b["patients"][i]) for i in order_b]
    for i, path in enumerate(index_a):
        if labels_a[i] != labels_b[i] or patients_a[i] != patients_b[i]:
            raise ValueError(
                f"the runs disagree on {path!r}: label {labels_a[i]} vs {labels_b[i]}, "
                f"patient {patients_a[i]!r} vs {patients_b[i]!r}"
            )
    return {
        "paths": list(index_a),
        "patients": patients_a,
        "labels": labels_a.astype(np.int64),
        "probs_a": np.asarray(pred_a["probs"], dtype=np.float64),
        "probs_b": np.asarray(pred_b["probs"], dtype=np.float64)[order_b],
        "classes": list(pred_a["classes"]) if "classes" in pred_a else None,
    }


def paired_bootstrap(
    metric_fn: MetricFn,
    probs_a: Any,
    probs_b: Any,
    labels: Any,
    units: Sequence[Any],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Group-bootstrap 95% interval of metric(A) - metric(B), both runs on the same resamples
    (`units`: each image's group, a stem or a patient folder; stratified by class).

    The rows of probs_a and probs_b must be the same images (see `align_predictions`). A
    resample where the metric is undefined for either run is dropped. Returns `a`, `b` and
    `difference` (full-sample values; None if undefined), `ci95` [lo, hi] (percentile; None if
    no resample was valid), `share_a_wins`, `share_b_wins`, `share_ties` (shares of the valid
    resamples where the difference is > 0, < 0, == 0; they sum to 1), `n_valid`, `n_dropped`.
    The resamples are those of `bootstrap_intervals` with the same seed.
    """
    probs_a, labels, units = as_arrays(probs_a, labels, units)
    probs_b = np.asarray(probs_b, dtype=np.float64)
    if probs_b.shape != probs_a.shape:
        raise ValueError(f"probs_a {probs_a.shape} and probs_b {probs_b.shape} differ in shape")
    diffs = []
    for idx in unit_resamples(units, labels, probs_a.shape[1], n_resamples, seed):
        a = defined(metric_fn(probs_a[idx], labels[idx]))
        b = defined(metric_fn(probs_b[idx], labels[idx]))
        if a is not None and b is not None:
            diffs.append(a - b)
    a, b = defined(metric_fn(probs_a, labels)), defined(metric_fn(probs_b, labels))
    d = np.asarray(diffs, dtype=np.float64)
    n_valid = len(d)

    def share(mask: np.ndarray) -> float | None:
        return float(mask.mean()) if n_valid else None

    return {
        "a": a,
        "b": b,
        "difference": a - b if a is not None and b is not None else None,
        "ci95": list(percentile_interval(d, 0.95)) if n_valid else None,
        "share_a_wins": share(d > 0),
        "share_b_wins": share(d < 0),
        "share_ties": share(d == 0),
        "n_valid": n_valid,
        "n_dropped": n_resamples - n_valid,
    }


def separable(
    ci_a: Interval | Sequence[float | None] | None, ci_b: Interval | Sequence[float | None] | None
) -> bool:
    """True when two intervals do not overlap (touching counts as overlap); False if undefined.

    A coarse test for sweep reports where runs are not paired; for two runs on the same test
    images `paired_bootstrap` is the sharper test.
    """
    bounds = []
    for ci in (ci_a, ci_b):
        lo, hi = (ci.lo, ci.hi) if isinstance(ci, Interval) else (ci or (None, None))
        if lo is None or hi is None:
            return False
        bounds.append((lo, hi))
    (lo_a, hi_a), (lo_b, hi_b) = bounds
    return hi_a < lo_b or hi_b < lo_a
