"""Evaluation by generation (MedGemma, `model.eval_mode=generate|both`): answers, parsing, metrics.

Each image's prompt is answered greedily (`generate_answers`), the answer mapped to a class by the
prompt's parser (`model.prompt.parse`); an answer that names no class is *unparseable* and counts as
wrong, as the blog notebook counted it. Metrics are computed by `compute_metrics` over the classes
plus one `unparseable` column, so every unparseable answer is a miss of its true class: accuracy,
balanced accuracy, weighted F1 and the patient rate are what sklearn gives with the notebook's -1
predictions. Figures that need probabilities (AUROC) are undefined. Binary figures count an
unparseable answer as the wrong type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from torchmetrics.functional.classification import binary_f1_score

from breakhis_ft.engine.predict import eval_loader, on_device
from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags

UNPARSEABLE = "unparseable"  # the extra class of an answer that names none


@dataclass
class GeneratedAnswers:
    """The generated answers of a split, in dataset index order."""

    answers: list[str]  # raw text of each answer
    preds: torch.Tensor  # parsed class index, -1 when unparseable
    labels: torch.Tensor
    indices: torch.Tensor

    @property
    def parse_failures(self) -> int:
        """How many answers named no class."""
        return int((self.preds < 0).sum())

    def hard(self, n_classes: int) -> torch.Tensor:
        """Predicted class indices with unparseable answers as class `n_classes`."""
        return torch.where(self.preds < 0, torch.full_like(self.preds, n_classes), self.preds)

    def one_hot(self, n_classes: int) -> torch.Tensor:
        """(N, n_classes + 1) one-hot rows of the parsed answer (last column: unparseable)."""
        return F.one_hot(self.hard(n_classes), n_classes + 1).float()


def image_view(dataset: Any) -> Any:
    """The dataset decoding its images (an ImageDataset built for cached features has none)."""
    if dataset.with_images:
        return dataset
    view = type(dataset).__new__(type(dataset))
    view.__dict__.update(dataset.__dict__)
    view.with_images, view.augmenter = True, None
    return view


@torch.no_grad()
def generate_split(
    classifier: nn.Module, dataset: Any, accelerator: Accelerator, batch_size: int
) -> GeneratedAnswers:
    """Greedy answers to every image of `dataset`, parsed; each process answers its shard and
    every process gets all of them, sorted by index. Cached vision features are bypassed."""
    store, classifier.feature_store = classifier.feature_store, None  # generation needs pixels
    on_device(classifier, accelerator)
    loader = eval_loader(classifier, image_view(dataset), accelerator, batch_size)
    was_training = classifier.training
    classifier.eval()
    rows: dict[int, tuple[int, str]] = {}
    try:
        for batch in loader:
            with accelerator.autocast():
                answers = classifier.generate_answers(batch)
            ids, labels = batch["index"].tolist(), batch["class_label"].tolist()
            mine = list(zip(ids, labels, answers, strict=True))
            for index, label, answer in accelerator.gather_for_metrics(
                mine, use_gather_object=True
            ):
                rows[int(index)] = (int(label), answer)
    finally:
        classifier.feature_store = store
        classifier.train(was_training)
    if sorted(rows) != list(range(len(dataset))):
        raise RuntimeError(f"generation answered {len(rows)} of {len(dataset)} images")
    answers = [rows[i][1] for i in range(len(dataset))]
    return GeneratedAnswers(
        answers=answers,
        preds=classifier.parse_answers(answers),
        labels=torch.tensor([rows[i][0] for i in range(len(dataset))], dtype=torch.long),
        indices=torch.arange(len(dataset)),
    )


def merge_adapter(classifier: nn.Module) -> bool:
    """Merge a LoRA adapter into the weights (peft merge_and_unload), as the blog evaluated;
    True when there was one. The saved adapter is not touched."""
    if not isinstance(getattr(classifier, "model", None), PeftModel):
        return False
    classifier.model = classifier.model.merge_and_unload()
    return True


def _binary(hard: torch.Tensor, labels: torch.Tensor, malignant: Sequence[bool]) -> dict | None:
    """Benign/malignant figures of parsed answers; an unparseable one is the wrong type."""
    flags = torch.tensor(list(malignant), dtype=torch.bool)
    if bool(flags.all()) or not bool(flags.any()):
        return None
    target = flags[labels].long()
    parsed = hard < len(flags)
    pred = torch.where(parsed, flags[hard.clamp(max=len(flags) - 1)].long(), 1 - target)
    return {
        "accuracy": float((pred == target).float().mean()),
        "f1": float(binary_f1_score(pred, target)),
        "auroc": None,  # generation gives no probabilities
    }


def _answer_metrics(
    hard: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    patients: Sequence[str],
) -> dict[str, Any]:
    """compute_metrics over the classes + `unparseable`, then the figures that need fixing."""
    n = len(class_names)
    names = [*class_names, UNPARSEABLE]
    metrics = compute_metrics(F.one_hot(hard, n + 1).float(), labels, names, patients)
    metrics["per_class"].pop(UNPARSEABLE)  # no image is labelled so: its row says nothing
    predicted = torch.bincount(hard, minlength=n + 1)[:n]
    # macro F1 over the real classes present in labels or answers (torchmetrics' rule for absent
    # classes); the unparseable column would otherwise count as a class with F1 0
    f1 = [
        pc["f1"] or 0.0
        for (name, pc), made in zip(metrics["per_class"].items(), predicted.tolist(), strict=True)
        if pc["support"] > 0 or made > 0
    ]
    metrics["f1_macro"] = sum(f1) / len(f1) if f1 else None
    metrics["auroc_macro"] = None  # generation gives no probabilities
    metrics["auroc_undefined_classes"] = list(class_names)
    flags = malignant_flags(class_names)
    metrics["binary"] = _binary(hard, labels, flags) if flags is not None else None
    failures = int((hard == n).sum())
    metrics["parse_failures"] = failures
    metrics["parse_failure_rate"] = failures / len(labels)
    return metrics


def generation_metrics(
    generated: GeneratedAnswers, dataset: Any, class_names: Sequence[str]
) -> dict[str, Any]:
    """Metrics of parsed answers (unparseable = wrong) with `parse_failures` and their rate, by
    magnification as well when the split has several."""
    records = [dataset.records[i] for i in generated.indices.tolist()]
    hard, labels = generated.hard(len(class_names)), generated.labels
    patients = [r.patient for r in records]
    metrics = _answer_metrics(hard, labels, class_names, patients)
    mags = torch.tensor([int(r.magnification) for r in records])
    distinct = sorted(set(mags.tolist()))
    if len(distinct) > 1:
        for mag in distinct:
            keep = (mags == mag).nonzero().flatten()
            sub = [patients[i] for i in keep.tolist()]
            metrics["by_magnification"][str(mag)] = _answer_metrics(
                hard[keep], labels[keep], class_names, sub
            )
    return metrics


def agreement(scored_preds: torch.Tensor, generated: GeneratedAnswers) -> float:
    """Share of images whose generated answer names the class that scoring ranks first."""
    return float((scored_preds.cpu() == generated.preds).float().mean())
