"""Confidence intervals by patient group: a percentile bootstrap that resamples the split's own
unit, stratified by class, not images.

The images of one patient come from the same tumour and slides, so they are strongly correlated;
resampling images would count ~100 images of a patient as ~100 independent observations and give
intervals that are too narrow. The resampled unit is the one the split keeps together: the slide
stem for `split=patient` (sibling slides 22549AB/CD of one patient are one unit), the patient
folder for `split=official_fold` and `split=eva`.

Stratified by class: each group is put in one class's stratum, and each resample draws, within
every stratum, as many groups as it holds, with replacement, taking all the images of every drawn
group (a group drawn twice counts twice). So every class keeps its place in every resample, and a
balanced accuracy always averages the same classes; unstratified, a small split (5 of 7 classes
with one patient) loses a class in most resamples and mixes averages over 2 to 7 classes. A group
holding images of several classes (a stem filed under two subtypes) goes to the stratum of its
rarest class (the one held by the fewest groups; ties: the class with most of its images, then
the first class): a class held by one group then always keeps that group. A class whose groups
are each alone in their stratum (all its images in one group, most often) has the same recall in
every resample: it has no interval of its own (`fixed_classes`), and the other intervals do not
cover its sampling.

A metric function takes `(probs [n, C] float64, labels [n] int64)` numpy arrays and returns a
float, or None/NaN where the metric is undefined on that sample. A metric that needs to know which
images belong to one patient (the patient recognition rate) is wrapped in `PatientMetric` and also
gets `groups [n]`, one number per drawn (unit, patient folder) pair (a unit drawn twice gives two).
Undefined resample values are dropped (not counted as 0) and the number of valid resamples is
reported with each interval.
The metric functions here follow the definitions of the torchmetrics-based `compute_metrics`, so
their values on the full split equal the figures in metrics.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from breakhis_ft.data.records import stem_of

MetricFn = Callable[[np.ndarray, np.ndarray], float | None]
METHOD = "percentile bootstrap"


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


@dataclass(frozen=True)
class Units:
    """What the intervals resample: each image's group and its name in metrics.json.

    `groups` [N]: the unit of each image (a stem, or a patient folder id); `patients` [N]: its
    patient folder, which the patient recognition rate averages over (default: the groups).
    """

    groups: Sequence[Any]
    name: str = "patient"  # stem | patient | image: what one group is
    patients: Sequence[Any] | None = None


def units_of(patients: Sequence[Any], group_by: str) -> Units:
    """The resampled units of images known by their patient folders: the folders themselves
    (`split.group_by=patient`) or their slide stems (`stem`, read from the BreakHis ids)."""
    patients = [str(p) for p in patients]
    if group_by == "patient":
        return Units(patients, "patient", patients)
    if group_by == "stem":
        return Units([stem_of(p) for p in patients], "stem", patients)
    raise ValueError(f"split.group_by={group_by!r}: allowed values are stem, patient")


def as_units(units: Units | Sequence[Any]) -> Units:
    """Units as given, or a plain sequence of patient ids as patient units."""
    return units if isinstance(units, Units) else Units(list(units))


def as_arrays(
    probs: Any, labels: Any, patients: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probs [N, C] float64, labels [N] int64 and group ids [N] str, checked for shape."""
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


@dataclass(frozen=True)
class PatientMetric:
    """A metric computed per patient: called `fn(probs, labels, groups)`, groups [n] int."""

    fn: Callable[[np.ndarray, np.ndarray, np.ndarray], float | None]

    def __call__(self, probs: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float | None:
        """The metric of the images, `groups` numbering their (drawn) patients."""
        return self.fn(probs, labels, groups)


def patient_codes(patients: Sequence[Any]) -> np.ndarray:
    """Each image's patient number, patients numbered in sorted id order."""
    return np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)[1]


@dataclass(frozen=True)
class Strata:
    """The groups of a sample (sorted ids) and the class stratum each is resampled in."""

    ids: list[str]  # the distinct groups, sorted
    codes: np.ndarray  # [N] each image's group number (an index into ids)
    stratum: np.ndarray  # [G] each group's class stratum
    held: np.ndarray  # [G, C] whether each group holds images of each class

    @classmethod
    def of(cls, groups: Sequence[Any], labels: np.ndarray, n_classes: int) -> Strata:
        """Each group in the stratum of its rarest class (see the module doc)."""
        ids, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        counts = np.zeros((len(ids), n_classes), dtype=np.int64)
        np.add.at(counts, (codes, labels), 1)
        holders = (counts > 0).sum(axis=0)
        stratum = np.empty(len(ids), dtype=np.int64)
        for g, row in enumerate(counts):
            # fewest holders first, then most images, then the first class
            stratum[g] = min(np.flatnonzero(row), key=lambda c: (holders[c], -row[c], c))
        return cls(ids.tolist(), codes, stratum, counts > 0)

    def fixed_classes(self) -> list[int]:
        """The classes present whose every group is alone in its stratum: each resample draws
        exactly those groups once, so their recall is the same in every resample (a class in one
        group; or in two groups each with a rarer class of its own)."""
        alone = np.bincount(self.stratum)[self.stratum] == 1  # [G]
        varies = self.held[~alone].any(axis=0)
        return [int(c) for c in np.flatnonzero(self.held.any(axis=0) & ~varies)]


def grouped_resamples(
    strata: Strata, n_resamples: int = 1000, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image indices, draw of each index) of each stratified resample.

    Groups are laid out stratum by stratum (class order), each stratum's in sorted id order; each
    resample takes one uniform number u per slot and fills slot k of a stratum of n groups with
    its group floor(u * n). The draw of an image copy numbers the slot it came with: a group
    drawn twice gives two draws, each holding every image of the group once. The resamples depend
    on the group ids, their classes and the seed only, not on the order of the images.
    """
    n_groups = len(strata.ids)
    order = np.argsort(strata.stratum, kind="stable")  # stratum by stratum, ids sorted within
    slot_stratum = strata.stratum[order]
    sizes = np.bincount(slot_stratum)[slot_stratum]
    starts = np.searchsorted(slot_stratum, slot_stratum)  # first slot of each slot's stratum
    rng = np.random.default_rng(seed)
    images = np.arange(len(strata.codes))
    by_group = np.argsort(strata.codes, kind="stable")  # image indices grouped by group
    bounds = np.concatenate([[0], np.cumsum(np.bincount(strata.codes, minlength=n_groups))])
    for _ in range(n_resamples):
        u = rng.random(n_groups)
        drawn = order[starts + np.floor(u * sizes).astype(np.int64)]
        parts = [by_group[bounds[g] : bounds[g + 1]] for g in drawn]
        idx = np.concatenate(parts) if parts else images[:0]
        draw = np.repeat(np.arange(n_groups), [len(p) for p in parts])
        yield idx, draw


def unit_resamples(
    groups: Sequence[Any], labels: Any, n_classes: int, n_resamples: int = 1000, seed: int = 0
) -> Iterator[np.ndarray]:
    """Image indices of each stratified resample of the groups (see `grouped_resamples`)."""
    strata = Strata.of(groups, np.asarray(labels, dtype=np.int64), n_classes)
    for idx, _ in grouped_resamples(strata, n_resamples, seed):
        yield idx


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


def _value(fn: MetricFn | PatientMetric, probs, labels, groups) -> float | None:
    """The metric's value, None where undefined; a PatientMetric also gets the groups."""
    if isinstance(fn, PatientMetric):
        return defined(fn(probs, labels, groups))
    return defined(fn(probs, labels))


def bootstrap_intervals(
    metric_fns: Mapping[str, MetricFn | PatientMetric],
    probs: Any,
    labels: Any,
    units: Units | Sequence[Any],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Stratified group-bootstrap percentile intervals of several metrics over one shared set
    of resamples (`units`: each image's group, or a `Units`).

    Every metric sees the same resamples (one pass). A resample where a metric returns None/NaN
    is dropped for that metric only; `Interval.n_valid` says how many remained.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    units = as_units(units)
    probs, labels, groups = as_arrays(probs, labels, units.groups)
    strata = Strata.of(groups, labels, probs.shape[1])
    patients = patient_codes(units.patients if units.patients is not None else groups)
    n_patients = int(patients.max()) + 1
    values: dict[str, list[float]] = {name: [] for name in metric_fns}
    for idx, draw in grouped_resamples(strata, n_resamples, seed):
        sample_probs, sample_labels = probs[idx], labels[idx]
        drawn_patients = draw * n_patients + patients[idx]  # a patient per draw of its group
        for name, fn in metric_fns.items():
            value = _value(fn, sample_probs, sample_labels, drawn_patients)
            if value is not None:
                values[name].append(value)
    intervals = {}
    for name, fn in metric_fns.items():
        lo, hi = percentile_interval(values[name], level) if values[name] else (None, None)
        estimate = _value(fn, probs, labels, patients)
        intervals[name] = Interval(estimate, lo, hi, level, len(values[name]), n_resamples)
    return intervals


def patient_bootstrap(
    metric_fn: MetricFn,
    probs: Any,
    labels: Any,
    units: Units | Sequence[Any],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The stratified group-bootstrap interval of one metric (see `bootstrap_intervals`)."""
    intervals = bootstrap_intervals(
        {"metric": metric_fn}, probs, labels, units, n_resamples, seed, level
    )
    return intervals["metric"]


def scheme(units: Units, strata: Strata, n_resamples: int, seed: int, level: float) -> dict:
    """How an interval was made, for metrics.json: method, unit, strata, resamples, level."""
    return {
        "method": METHOD,
        "unit": units.name,
        "stratified_by": "class",
        "resamples": int(n_resamples),
        "level": float(level),
        "seed": int(seed),
        "n_groups": len(strata.ids),
    }


# Metric functions, numpy re-implementations of compute_metrics' definitions (fast enough to run
# a thousand times; tests check them against torchmetrics / scikit-learn).


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose argmax class is the label."""
    return float(np.mean(probs.argmax(axis=1) == labels))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (sklearn's balanced_accuracy_score).

    A class absent from the sample has no recall and is left out of the mean, so the value is
    always defined; the stratified resamples keep every class of the split present.
    """
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    support = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[preds == labels], minlength=n_classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def class_recall(c: int) -> MetricFn:
    """The recall of class `c`: its share of images predicted as it; None without its images."""

    def recall(probs: np.ndarray, labels: np.ndarray) -> float | None:
        mine = labels == c
        return float(np.mean(probs[mine].argmax(axis=1) == c)) if mine.any() else None

    return recall


def f1_macro(probs: np.ndarray, labels: np.ndarray) -> float:
    """Macro F1 over the classes in labels or predictions (torchmetrics' macro average)."""
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    tp = np.bincount(labels[preds == labels], minlength=n_classes)
    fp = np.bincount(preds, minlength=n_classes) - tp
    fn = np.bincount(labels, minlength=n_classes) - tp
    seen = (tp + fp + fn) > 0  # a class neither present nor predicted has no F1: left out
    return float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])))


def f1_weighted(probs: np.ndarray, labels: np.ndarray) -> float:
    """Per-class F1 weighted by the class's support (torchmetrics' weighted average).

    A class with support but no hit has F1 0; a class absent from the labels weighs 0.
    """
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    tp = np.bincount(labels[preds == labels], minlength=n_classes)
    support = np.bincount(labels, minlength=n_classes)
    denominator = np.bincount(preds, minlength=n_classes) + support  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return float(np.sum(f1 * support) / support.sum())


def _recognition_rate(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Mean over (drawn) patients of each patient's share of correctly classified images."""
    _, group = np.unique(groups, return_inverse=True)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    return float(np.mean(np.bincount(group, weights=correct) / np.bincount(group)))


# Spanhol et al.'s patient-level recognition rate; a patient drawn twice counts twice, as any
# resampled unit does
recognition_rate = PatientMetric(_recognition_rate)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given their average rank (the Mann-Whitney convention)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def _column_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks within each column of x [n, C], ties given their average rank (as
    `_average_ranks`, every column at once)."""
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    ordered = np.take_along_axis(x, order, axis=0)
    position = np.broadcast_to(np.arange(n)[:, None], x.shape)
    first = np.ones(x.shape, dtype=bool)  # a run of ties starts here
    first[1:] = ordered[1:] != ordered[:-1]
    last = np.ones(x.shape, dtype=bool)  # ... and ends here
    last[:-1] = first[1:]
    start = np.maximum.accumulate(np.where(first, position, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, position, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=0)
    return ranks


def auroc_macro(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean one-vs-rest AUROC over classes with both positives and negatives; None if none.

    A class absent from the sample (or present alone) has no AUROC and is left out of the mean,
    as `compute_metrics` does for a small split; None only if no class is left. Mann-Whitney:
    the positives' rank sum among each class's scores, all classes ranked at once.
    """
    n_classes = probs.shape[1]
    n_pos = np.bincount(labels, minlength=n_classes)[:n_classes].astype(np.float64)
    n_neg = len(labels) - n_pos
    defined = (n_pos > 0) & (n_neg > 0)
    if not defined.any():
        return None
    ranks = _column_ranks(probs)
    own = ranks[np.arange(len(labels)), labels]  # each image's rank among its class's scores
    rank_sum = np.bincount(labels, weights=own, minlength=n_classes)[:n_classes]
    auc = (rank_sum[defined] - n_pos[defined] * (n_pos[defined] + 1) / 2) / (
        n_pos[defined] * n_neg[defined]
    )
    return float(np.mean(auc))


STANDARD_METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "f1_macro": f1_macro,
    "auroc_macro": auroc_macro,
}


def _binary_auroc(scores: np.ndarray, target: np.ndarray) -> float | None:
    """Mann-Whitney AUROC of scores for target 1 vs 0; None without both classes."""
    n_pos = int(target.sum())
    n_neg = len(target) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = _average_ranks(scores)[target == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(malignant: Sequence[bool]) -> dict[str, MetricFn]:
    """Benign/malignant collapse of subtype probabilities, as compute_metrics' `binary` block.

    The predicted type is the type of the argmax class; the AUROC scores the summed malignant
    probability. `f1` (malignant positive) is 0 when there is no malignant image and none is
    predicted (torchmetrics' zero_division); `auroc` is undefined (None) without both types.
    """
    flags = np.asarray(list(malignant), dtype=bool)

    def types(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return flags[labels].astype(np.int64), flags[probs.argmax(axis=1)].astype(np.int64)

    def acc(probs: np.ndarray, labels: np.ndarray) -> float:
        target, pred = types(probs, labels)
        return float(np.mean(pred == target))

    def bal_acc(probs: np.ndarray, labels: np.ndarray) -> float:
        target, pred = types(probs, labels)
        return balanced_accuracy(np.eye(2)[pred], target)

    def f1(probs: np.ndarray, labels: np.ndarray) -> float:
        target, pred = types(probs, labels)
        tp = int(np.sum((pred == 1) & (target == 1)))
        denominator = int(pred.sum() + target.sum())  # 2tp + fp + fn
        return 2 * tp / denominator if denominator else 0.0

    def auroc(probs: np.ndarray, labels: np.ndarray) -> float | None:
        score = np.clip(probs[:, flags].sum(axis=1), 0.0, 1.0)
        return _binary_auroc(score, flags[labels].astype(np.int64))

    return {"accuracy": acc, "balanced_accuracy": bal_acc, "f1": f1, "auroc": auroc}


HEADLINE_METRICS: dict[str, MetricFn | PatientMetric] = {
    **STANDARD_METRICS,
    "f1_weighted": f1_weighted,
    "patient_recognition_rate": recognition_rate,
}
"""The headline metrics of a split in metrics.json, by their keys there."""


def ci_key(name: str, level: float) -> str:
    """The key of a metric's interval in metrics.json: accuracy -> accuracy_ci95 (level 0.95)."""
    return f"{name}_ci{level * 100:g}"
