"""The final evaluation of a split: the metrics with group-bootstrap intervals, calibration and
the patient-level diagnosis (`metrics.json` after training).

The per-epoch validation of the training loop keeps `compute_metrics` alone (cheap); this runs
once per split at the end. Headline figures are of the model's own probabilities (the predictions
CSV); temperature scaling, fitted afterwards on val (`fit_split_temperature`), adds the `after`
calibration block and changes no headline figure except through the calibration.

metrics.json keys added to a split (level 0.95 shown):
- `<metric>_ci95: [lo, hi]` beside accuracy, balanced_accuracy, f1_macro, f1_weighted,
  auroc_macro, patient_recognition_rate, binary/{accuracy, f1, auroc} and each class's recall
  (`per_class.<class>.recall_ci95`; null with `recall_ci95_reason` where the class is absent or
  its recall the same in every resample, `interval.fixed_classes`).
- `interval`: the scheme (method, unit, strata, resamples, level, seed, groups, fixed classes).
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
from breakhis_ft.data.splits import group_key
from breakhis_ft.evaluate.bootstrap import (
    HEADLINE_METRICS,
    STANDARD_METRICS,
    MetricFn,
    PatientMetric,
    Strata,
    Units,
    as_arrays,
    binary_metrics,
    bootstrap_intervals,
    ci_key,
    class_recall,
    f1_weighted,
    scheme,
)
from breakhis_ft.evaluate.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_temperature,
)
from breakhis_ft.evaluate.fusion import PROB_FLOOR, fuse_by_patient, patient_labels
from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags

BINARY_INTERVALS = ("accuracy", "balanced_accuracy", "f1", "auroc")
# metrics.json keys of a patient table that say nothing there (one row per patient)
_NOT_PATIENT_LEVEL = ("patient_recognition_rate", "by_magnification", "n")


def _numpy(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probs as compute_metrics sees them (float32, then float64 exactly) and int64 labels."""
    p = torch.as_tensor(probs, dtype=torch.float32).cpu().numpy().astype(np.float64)
    return p, torch.as_tensor(labels, dtype=torch.long).cpu().numpy()


def _no_interval_reason(support: int, unit: str) -> str:
    """Why a class's recall has no interval: absent, or drawn the same in every resample."""
    if support == 0:
        return "no image of this class in this split"
    return (
        f"every resample draws the same {unit} group(s) of this class once (each is the only "
        "group of its class stratum), so its recall does not vary"
    )


def _block(metrics: dict[str, Any], path: str) -> Any:
    """The nested block at a `/`-separated path (`per_class/adenosis`; "" is metrics itself)."""
    block: Any = metrics
    for part in path.split("/") if path else []:
        block = block.get(part) if isinstance(block, dict) else None
    return block


def add_intervals(
    metrics: dict[str, Any],
    fns: Mapping[str, MetricFn | PatientMetric],
    probs: np.ndarray,
    labels: np.ndarray,
    units: Units,
    settings: EvaluateConfig,
) -> None:
    """Store `<name>_ci<level>: [lo, hi]` beside each metric (a `binary/x` name in `binary`)
    and beside each class's recall in `per_class`, where it can vary between resamples.

    One shared set of stratified resamples for all the metrics; `interval` records the scheme
    and, per metric, the resamples dropped because it was undefined there (e.g. the binary AUROC
    of a resample with no benign image).
    """
    level, n, seed = float(settings.ci_level), int(settings.bootstrap_resamples), int(settings.seed)
    probs, labels, groups = as_arrays(probs, labels, units.groups)
    strata = Strata.of(groups, labels, probs.shape[1])
    classes = list(metrics.get("classes") or [])
    fixed = strata.fixed_classes()
    varying = [c for c in range(len(classes)) if strata.held[:, c].any() and c not in fixed]
    recalls = {f"per_class/{classes[c]}/recall": class_recall(c) for c in varying}
    intervals = bootstrap_intervals({**fns, **recalls}, probs, labels, units, n, seed, level)
    by_block: dict[str, dict[str, list | None]] = {}
    for name, interval in intervals.items():
        block_name, _, key = name.rpartition("/")
        bounds = [interval.lo, interval.hi] if interval.lo is not None else None
        by_block.setdefault(block_name, {})[key] = bounds
    for c, name in enumerate(classes):
        if c not in varying:
            by_block[f"per_class/{name}"] = {"recall": None}
    for block_name, bounds in by_block.items():
        block = _block(metrics, block_name)
        if isinstance(block, dict):
            _insert_beside(block, bounds, level)
    key = ci_key("recall", level)
    for c, name in enumerate(classes):
        row = _block(metrics, f"per_class/{name}")
        if c not in varying and isinstance(row, dict):
            reason = _no_interval_reason(int(row.get("support", 0)), units.name)
            _put_after(row, key, f"{key}_reason", reason)
    metrics["interval"] = {
        **scheme(units, strata, n, seed, level),
        # their recall is the same in every resample: no interval covers their sampling
        "fixed_classes": [classes[c] for c in fixed if c < len(classes)],
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


def _put_after(block: dict[str, Any], anchor: str, key: str, value: Any) -> None:
    """Put `key: value` right after `anchor` in the block."""
    items = list(block.items())
    block.clear()
    for k, v in items:
        block[k] = v
        if k == anchor:
            block[key] = value


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
    units: Units,
    class_names: Sequence[str],
    settings: EvaluateConfig,
) -> dict[str, Any]:
    """One diagnosis per patient (its images fused), scored as compute_metrics scores images;
    the intervals resample the patients' units (a stem's sibling folders together)."""
    patients = [str(p) for p in (units.patients if units.patients is not None else units.groups)]
    method = str(settings.patient_fusion)
    ids, fused = fuse_by_patient(probs, patients, method)  # type: ignore[arg-type]
    _, truth = patient_labels(labels, patients)
    malignant = malignant_flags(class_names)
    metrics = compute_metrics(fused, truth, class_names, malignant=malignant)
    for key in _NOT_PATIENT_LEVEL:
        metrics.pop(key, None)
    counts = dict(zip(*np.unique(patients, return_counts=True), strict=True))
    out = {"fusion": method, "n_patients": len(ids), **metrics}
    if settings.bootstrap_resamples > 0:
        unit_of = dict(zip(patients, map(str, units.groups), strict=True))
        rows = Units([unit_of[pid] for pid in ids], units.name, ids)
        fns = _interval_fns({**STANDARD_METRICS, "f1_weighted": f1_weighted}, malignant)
        add_intervals(out, fns, fused, truth, rows, settings)
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
    units: Units | None = None,
) -> dict[str, Any]:
    """compute_metrics of a split plus intervals, calibration (before) and patient_level.

    `units`: what the intervals resample (`units_of`); default: each patient folder its own.
    """
    units = units if units is not None else Units([str(p) for p in patients])
    malignant = malignant_flags(class_names)
    metrics = compute_metrics(probs, labels, class_names, patients, magnifications, malignant)
    p, y = _numpy(probs, labels)
    if settings.bootstrap_resamples > 0:
        add_intervals(metrics, _interval_fns(HEADLINE_METRICS, malignant), p, y, units, settings)
    bins = int(settings.calibration_bins)
    metrics["calibration"] = {"n_bins": bins, "before": calibration_metrics(p, y, bins)}
    metrics["patient_level"] = patient_level(p, y, units, class_names, settings)
    return metrics


def dataset_final_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    dataset: Any,
    class_names: Sequence[str],
    settings: EvaluateConfig,
    group_by: str = "patient",
) -> dict[str, Any]:
    """`final_metrics` of a predicted split; patients, magnifications and the resampled units
    (the split's groups, `split.group_by`) from its records."""
    records = [dataset.records[i] for i in indices.tolist()]
    patients = [r.patient for r in records]
    units = Units([group_key(r, group_by) for r in records], group_by, patients)
    magnifications = [int(r.magnification) for r in records]
    return final_metrics(probs, labels, class_names, patients, magnifications, settings, units)


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
