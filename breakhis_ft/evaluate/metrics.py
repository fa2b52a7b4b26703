"""Evaluation metrics from class probabilities (torchmetrics does the arithmetic); predictions.

Every figure in `metrics.json` can be recomputed from `predictions_<split>.csv`: `read_predictions`
gives back the probabilities, labels, patients and magnifications that `compute_metrics` needs.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_f1_score,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from breakhis_ft.data.records import SUBTYPES
from breakhis_ft.evaluate.errors import confused_pairs

PREDICTION_COLUMNS = ("path", "patient", "magnification", "label", "pred")


def malignant_flags(class_names: Sequence[str]) -> list[bool] | None:
    """Per-class malignant flags of BreakHis class names; None if a name is not a BreakHis class."""
    flags = []
    for name in class_names:
        if name in SUBTYPES:
            flags.append(SUBTYPES[name][1] == "malignant")
        elif name in ("benign", "malignant"):
            flags.append(name == "malignant")
        else:
            return None
    return flags


def _num(value: torch.Tensor | float) -> float | None:
    """A JSON-safe float: NaN and inf become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def _auroc(probs: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[float | None, list]:
    """Macro one-vs-rest AUROC over the classes that have both positives and negatives here."""
    counts = torch.bincount(labels, minlength=n_classes)
    defined = (counts > 0) & (counts < len(labels))
    undefined = [i for i in range(n_classes) if not defined[i]]
    if not bool(defined.any()):
        return None, undefined
    with warnings.catch_warnings():  # torchmetrics warns about the absent classes we leave out
        warnings.simplefilter("ignore", UserWarning)
        per_class = multiclass_auroc(probs, labels, num_classes=n_classes, average="none")
    # AUROC is undefined for a class absent from (or the whole of) a small split: average the rest
    return _num(per_class[defined].mean()), undefined


def _binary(
    probs: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, malignant: Sequence[bool]
) -> dict[str, Any] | None:
    """Benign/malignant collapse: the predicted class's type; AUROC from summed malignant probs."""
    flags = torch.tensor(list(malignant), dtype=torch.bool)
    if len(flags) != probs.shape[1]:
        raise ValueError(f"malignant has {len(flags)} flags for {probs.shape[1]} classes")
    if bool(flags.all()) or not bool(flags.any()):
        return None
    target = flags[labels].long()
    pred = flags[preds].long()
    prob_malignant = probs[:, flags].sum(dim=1).clamp(0.0, 1.0)
    both = 0 < int(target.sum()) < len(target)
    recall = multiclass_recall(pred, target, num_classes=2, average="none")
    present = torch.bincount(target, minlength=2) > 0
    return {
        "accuracy": _num((pred == target).float().mean()),
        # mean of the benign and malignant recalls (of the types present, as balanced_accuracy)
        "balanced_accuracy": _num(recall[present].mean()),
        "f1": _num(binary_f1_score(pred, target)),
        "auroc": _num(binary_auroc(prob_malignant, target)) if both else None,
        "confusion_matrix": multiclass_confusion_matrix(pred, target, num_classes=2).tolist(),
        "classes": ["benign", "malignant"],
    }


def _recognition_rate(correct: torch.Tensor, patients: Sequence[str]) -> float:
    """Spanhol et al.'s patient-level recognition rate: mean over patients of their accuracy."""
    groups: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        groups.setdefault(str(patient), []).append(i)
    rates = torch.stack([correct[idx].float().mean() for idx in groups.values()])
    return float(rates.mean())


def compute_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    patients: Sequence[str] | None = None,
    magnifications: Sequence[int] | None = None,
    malignant: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """All metrics of one split from probabilities [N, C] and labels [N]; JSON-serialisable.

    Undefined values (AUROC of a class absent from the split, figures that need missing metadata)
    are None, and `auroc_undefined_classes` lists the classes left out of `auroc_macro`.
    """
    probs = torch.as_tensor(probs, dtype=torch.float32).cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != n_classes or len(labels) != len(probs):
        raise ValueError(
            f"probs must be [N, {n_classes}] with one label per row; "
            f"got probs {tuple(probs.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("compute_metrics needs at least one example (the split is empty)")
    preds = probs.argmax(dim=1)
    support = torch.bincount(labels, minlength=n_classes)
    kw = {"num_classes": n_classes}
    recall = multiclass_recall(preds, labels, average="none", **kw)
    precision = multiclass_precision(preds, labels, average="none", **kw)
    f1 = multiclass_f1_score(preds, labels, average="none", **kw)
    auroc, undefined = _auroc(probs, labels, n_classes)
    confusion = multiclass_confusion_matrix(preds, labels, **kw).tolist()
    metrics: dict[str, Any] = {
        "n": len(labels),
        "accuracy": _num(multiclass_accuracy(preds, labels, average="micro", **kw)),
        # macro recall over the classes present in the split (sklearn's balanced_accuracy_score)
        "balanced_accuracy": _num(recall[support > 0].mean()),
        "f1_macro": _num(multiclass_f1_score(preds, labels, average="macro", **kw)),
        "f1_weighted": _num(multiclass_f1_score(preds, labels, average="weighted", **kw)),
        "auroc_macro": auroc,
        "auroc_undefined_classes": [class_names[i] for i in undefined],
        "patient_recognition_rate": (
            _recognition_rate(preds == labels, patients) if patients is not None else None
        ),
        "per_class": {
            name: {
                "precision": _num(precision[i]),
                "recall": _num(recall[i]),
                "f1": _num(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion,  # rows: true class, columns: predicted
        # the class pairs most often mistaken, by count: [{"true", "pred", "count", "share"}]
        "most_confused": confused_pairs(confusion, class_names),
        "classes": list(class_names),
        "binary": _binary(probs, labels, preds, malignant) if malignant is not None else None,
        "by_magnification": {},
    }
    if magnifications is not None:
        mags = torch.as_tensor([int(m) for m in magnifications])
        if len(mags) != len(labels):
            raise ValueError(f"{len(mags)} magnifications for {len(labels)} examples")
        distinct = sorted(set(mags.tolist()))
        if len(distinct) > 1:
            for mag in distinct:
                keep = (mags == mag).nonzero().flatten()
                sub_patients = (
                    [patients[i] for i in keep.tolist()] if patients is not None else None
                )
                # JSON object keys are strings: use "40", not 40, so in-memory and file agree
                metrics["by_magnification"][str(mag)] = compute_metrics(
                    probs[keep], labels[keep], class_names, sub_patients, None, malignant
                )
    return metrics


def dataset_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    dataset: Any,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Metrics of a predicted split; patients and magnifications from `dataset.records`."""
    patients, magnifications = record_metadata(indices, dataset)
    return compute_metrics(
        probs, labels, class_names, patients, magnifications, malignant_flags(class_names)
    )


def record_metadata(indices: torch.Tensor, dataset: Any) -> tuple[list[str], list[int]]:
    """The patient and magnification of each predicted example, from `dataset.records`."""
    records = [dataset.records[i] for i in indices.tolist()]
    return [r.patient for r in records], [int(r.magnification) for r in records]


def _field(row: Any, key: str) -> Any:
    return row[key] if isinstance(row, Mapping) else getattr(row, key)


def write_predictions(
    path: str | Path,
    rows: Sequence[Any],
    probs: torch.Tensor,
    preds: torch.Tensor,
    class_names: Sequence[str],
    extra: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Write one CSV row per image: path, patient, magnification, label, pred, prob_<class>...

    `rows` are mappings (or objects) with `path`, `patient`, `magnification` and `label` (a class
    index or name), in the order of `probs`; `preds` are class indices. Probabilities are written
    with round-trip precision so the metrics recompute exactly. `extra`: more columns, one value
    per row (e.g. the generated `raw_answer`), after the probabilities.
    """
    probs = torch.as_tensor(probs, dtype=torch.float32).cpu()
    preds = torch.as_tensor(preds).cpu()
    extra = dict(extra or {})
    if not len(rows) == len(probs) == len(preds) or any(
        len(v) != len(rows) for v in extra.values()
    ):
        raise ValueError(
            f"{len(rows)} rows, {len(probs)} prob rows, {len(preds)} preds, extra columns of "
            f"{[len(v) for v in extra.values()]}: must match"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*PREDICTION_COLUMNS, *(f"prob_{c}" for c in class_names), *extra])
        columns = list(zip(*extra.values(), strict=True)) if extra else [()] * len(rows)
        for row, p, pred, more in zip(rows, probs.tolist(), preds.tolist(), columns, strict=True):
            label = _field(row, "label")
            label = class_names[label] if isinstance(label, int) else str(label)
            writer.writerow(
                [
                    _field(row, "path"),
                    _field(row, "patient"),
                    int(_field(row, "magnification")),
                    label,
                    class_names[int(pred)],
                    *(repr(x) for x in p),
                    *more,
                ]
            )


def read_predictions(path: str | Path) -> dict[str, Any]:
    """Read a predictions file back: probs, labels, preds, patients, magnifications, paths."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        classes = [c[len("prob_") :] for c in fields if c.startswith("prob_")]
        rows = list(reader)
    index = {c: i for i, c in enumerate(classes)}
    return {
        "classes": classes,
        "paths": [r["path"] for r in rows],
        "patients": [r["patient"] for r in rows],
        "magnifications": [int(r["magnification"]) for r in rows],
        "labels": torch.tensor([index[r["label"]] for r in rows], dtype=torch.long),
        "preds": torch.tensor([index[r["pred"]] for r in rows], dtype=torch.long),
        "probs": torch.tensor([[float(r[f"prob_{c}"]) for c in classes] for r in rows]),
    }
