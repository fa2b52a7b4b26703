"""The final evaluation of a split: the metrics with patient-bootstrap intervals, calibration and
the patient-level diagnosis (`metrics.json` after training).

The per-epoch validation of the training loop keeps `compute_metrics` alone (cheap); this runs
once per split at the end. Headline figures are of the model's own probabilities (the predictions
CSV); temperature scaling, fitted afterwards on val (`fit_split_temperature`), adds the `after`
calibration block and changes no headline figure except through the calibration.

metrics.json keys added to a split (level 0.95 shown):
- `<metric>_ci95: [lo, hi]` beside accuracy, balanced_accuracy, f1_macro, f1_weighted,
  auroc_macro, patient_recognition_rate and binary/{accuracy, f1, auroc}; `bootstrap` says how.
- `calibration`: n_bins and `before` {ece, mce, brier, nll}; later `temperature` and `after`.
- `patient_level`: compute_metrics of the fused patient table (one row per patient), its own
  intervals, and each patient's diagnosis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from breakhis_ft.config import EvaluateConfig
from breakhis_ft.evaluate.bootstrap import (
    HEADLINE_METRICS,
    STANDARD_METRICS,
    MetricFn,
    PatientMetric,
    binary_metrics,
    bootstrap_intervals,
    ci_key,
    f1_weighted,
)
from breakhis_ft.evaluate.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_temperature,
)
from breakhis_ft.evaluate.fusion import PROB_FLOOR, fuse_by_patient, patient_labels
from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags, record_metadata

BINARY_INTERVALS = ("accuracy", "balanced_accuracy", "f1", "auroc")
# metrics.json keys of a patient table that say nothing there (one row per patient)
_NOT_PATIENT_LEVEL = ("patient_recognition_rate", "by_magnification", "n")


def _numpy(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probs as compute_metrics sees them (float32, then float64 exactly) and int64 labels."""
    p = torch.as_tensor(probs, dtype=torch.float32).cpu().numpy().astype(np.float64)
    return p, torch.as_tensor(labels, dtype=torch.long).cpu().numpy()


def add_intervals(
    metrics: dict[str, Any],
    fns: Mapping[str, MetricFn | PatientMetric],
    probs: np.ndarray,
    labels: np.ndarray,
    patients: Sequence[Any],
    settings: EvaluateConfig,
) -> None:
    """Store `<name>_ci<level>: [lo, hi]` beside each metric (a `binary/x` name in `binary`).

    One shared set of patient resamples for all the metrics; `bootstrap` records the settings
    and, per metric, the resamples dropped because it was undefined there (e.g. no AUROC for a
    resample that lost a class entirely).
    """
    level, n = float(settings.ci_level), int(settings.bootstrap_resamples)
    intervals = bootstrap_intervals(fns, probs, labels, patients, n, int(settings.seed), level)
    by_block: dict[str, dict[str, list | None]] = {}
    for name, interval in intervals.items():
        block_name, _, key = name.rpartition("/")
        bounds = [interval.lo, interval.hi] if interval.lo is not None else None
        by_block.setdefault(block_name, {})[key] = bounds
    for block_name, bounds in by_block.items():
        block = metrics.get(block_name) if block_name else metrics
        if isinstance(block, dict):
            _insert_beside(block, bounds, level)
    metrics["bootstrap"] = {
        "unit": "patient",
        "resamples": n,
        "level": level,
        "seed": int(settings.seed),
        "n_patients": len(set(map(str, patients))),
        "undefined_resamples": {k: v.n_dropped for k, v in intervals.items() if v.n_dropped},
    }


def _insert_beside(block: dict[str, Any], bounds: Mapping[str, Any], level: float) -> None:
    """Put each `<key>_ci<level>` right after `<key>` in the block (a reader sees them together)."""
    items = list(block.items())
    block.clear()
    for key, value in items:
        block[key] = value
        if key in bounds:
            block[ci_key(key, level)] = bounds[key]


def _interval_fns(
    base: Mapping[str, MetricFn | PatientMetric], malignant: Sequence[bool] | None
) -> dict[str, MetricFn | PatientMetric]:
    """The metrics to bootstrap: `base` plus the binary collapse where it is defined."""
    fns = dict(base)
    if malignant is not None and any(malignant) and not all(malignant):
        binary = binary_metrics(malignant)
        fns.update({f"binary/{k}": binary[k] for k in BINARY_INTERVALS})
    return fns


def patient_level(
    probs: np.ndarray,
    labels: np.ndarray,
    patients: Sequence[Any],
    class_names: Sequence[str],
    settings: EvaluateConfig,
) -> dict[str, Any]:
    """One diagnosis per patient (its images fused), scored as compute_metrics scores images."""
    method = str(settings.patient_fusion)
    ids, fused = fuse_by_patient(probs, patients, method)  # type: ignore[arg-type]
    _, truth = patient_labels(labels, patients)
    malignant = malignant_flags(class_names)
    metrics = compute_metrics(fused, truth, class_names, malignant=malignant)
    for key in _NOT_PATIENT_LEVEL:
        metrics.pop(key, None)
    counts = dict(zip(*np.unique([str(p) for p in patients], return_counts=True), strict=True))
    out = {"fusion": method, "n_patients": len(ids), **metrics}
    if settings.bootstrap_resamples > 0:
        fns = _interval_fns({**STANDARD_METRICS, "f1_weighted": f1_weighted}, malignant)
        add_intervals(out, fns, fused, truth, ids, settings)
    out["diagnoses"] = [
        {
            "patient": pid,
            "label": class_names[int(y)],
            "pred": class_names[int(row.argmax())],
            "n_images": int(counts[pid]),
        }
        for pid, y, row in zip(ids, truth, fused, strict=True)
    ]
    return out


def final_metrics(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    patients: Sequence[str],
    magnifications: Sequence[int] | None,
    settings: EvaluateConfig,
) -> dict[str, Any]:
    """compute_metrics of a split plus intervals, calibration (before) and patient_level."""
    malignant = malignant_flags(class_names)
    metrics = compute_metrics(probs, labels, class_names, patients, magnifications, malignant)
    p, y = _numpy(probs, labels)
    if settings.bootstrap_resamples > 0:
        add_intervals(metrics, _interval_fns(HEADLINE_METRICS, malignant), p, y, patients, settings)
    bins = int(settings.calibration_bins)
    metrics["calibration"] = {"n_bins": bins, "before": calibration_metrics(p, y, bins)}
    metrics["patient_level"] = patient_level(p, y, patients, class_names, settings)
    return metrics


def dataset_final_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    dataset: Any,
    class_names: Sequence[str],
    settings: EvaluateConfig,
) -> dict[str, Any]:
    """`final_metrics` of a predicted split; patients and magnifications from its records."""
    patients, magnifications = record_metadata(indices, dataset)
    return final_metrics(probs, labels, class_names, patients, magnifications, settings)


def fit_split_temperature(
    val: tuple[Any, Any], splits: Mapping[str, tuple[Any, Any]], n_bins: int
) -> tuple[float, dict[str, dict[str, float]]]:
    """The temperature minimising val's NLL, and each split's calibration after applying it.

    `val` and each of `splits` are (probs [N, C], labels [N]). The val figures after scaling are
    in-sample (T was fitted there); test's are the honest ones.
    """
    val_probs, val_labels = _numpy(*val)
    temperature = fit_temperature(np.log(np.maximum(val_probs, PROB_FLOOR)), val_labels)
    after = {}
    for split, (probs, labels) in splits.items():
        p, y = _numpy(probs, labels)
        after[split] = calibration_metrics(apply_temperature(p, temperature), y, n_bins)
    return temperature, after
