"""Intervals on a small split: the split's own unit resampled within each class (issue 26).

The split is the demo's test split as `make demo` draws it: 274 images of 16 patient folders in
15 stems (18842 and 18842D are sibling slides), 7 classes, 5 of them in one stem.
"""

from __future__ import annotations

import numpy as np
import pytest

from breakhis_ft.config import EvaluateConfig
from breakhis_ft.data.records import class_names
from breakhis_ft.evaluate.bootstrap import (
    balanced_accuracy,
    bootstrap_intervals,
    class_recall,
    unit_resamples,
    units_of,
)
from breakhis_ft.evaluate.final import final_metrics

CLASSES = class_names("subtype8")
# class -> (patient folder, images, images classified right); recalls 1, 0, 0, 0.963, 0, 0.489, 0
DEMO_TEST = {
    1: [("23222AB", 16, 16)],
    2: [("29315EF", 15, 0)],
    3: [("3411F", 16, 0)],
    4: [
        ("10926", 9, 9),
        ("11031", 16, 16),
        ("15792", 15, 15),
        ("16601", 10, 10),
        ("16716", 34, 29),
        ("17915", 19, 19),
        ("4364", 11, 11),
        ("5287", 22, 22),
    ],
    5: [("12204", 26, 0)],
    6: [("13418DE", 15, 0), ("18842", 16, 12), ("18842D", 16, 11)],
    7: [("12465", 18, 0)],
}
ONE_STEM = ["fibroadenoma", "phyllodes_tumor", "tubular_adenoma", "lobular_carcinoma"]
ONE_STEM += ["papillary_carcinoma"]


def demo_test_split() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probs [274, 8], labels, patient folders: right images peak on their class, wrong ones on
    the next class."""
    probs, labels, patients = [], [], []
    for label, folders in DEMO_TEST.items():
        for patient, n, right in folders:
            for i in range(n):
                peak = label if i < right else (label + 1) % len(CLASSES)
                probs.append(np.where(np.arange(len(CLASSES)) == peak, 0.65, 0.05))
                labels.append(label)
                patients.append(patient)
    return np.array(probs), np.array(labels), patients


def _plain_balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean recall over the classes present, by hand."""
    return float(np.mean([np.mean(preds[labels == c] == c) for c in np.unique(labels)]))


def test_patient_resamples_lose_a_class_and_stratified_stem_resamples_never_do():
    probs, labels, patients = demo_test_split()
    preds = probs.argmax(axis=1)
    estimate = _plain_balanced_accuracy(labels, preds)
    assert estimate == pytest.approx(0.350, abs=1e-3)  # the demo's test balanced accuracy
    n_present = len(np.unique(labels))

    # the scheme before: patient folders drawn with replacement, classes ignored (by hand)
    rng = np.random.default_rng(0)
    ids = sorted(set(patients))
    images_of = {p: np.flatnonzero(np.asarray(patients) == p) for p in ids}
    lost, old_values = 0, []
    for _ in range(1000):
        idx = np.concatenate([images_of[ids[d]] for d in rng.integers(0, len(ids), len(ids))])
        lost += len(np.unique(labels[idx])) < n_present
        old_values.append(_plain_balanced_accuracy(labels[idx], preds[idx]))
    assert 0.85 < lost / 1000 < 0.97  # the issue measured 92%
    assert np.mean(old_values) > estimate + 0.04  # averages over the classes left: biased up

    # stratified by class, stems as units: every resample keeps the 7 classes
    stems = units_of(patients, "stem").groups
    new_values = []
    for idx in unit_resamples(stems, labels, len(CLASSES), 1000, seed=0):
        assert len(np.unique(labels[idx])) == n_present
        # the sibling folders of stem 18842 come together, as often as each other
        assert np.sum(np.isin(np.asarray(patients)[idx], ["18842"])) == np.sum(
            np.isin(np.asarray(patients)[idx], ["18842D"])
        )
        new_values.append(_plain_balanced_accuracy(labels[idx], preds[idx]))
    # close: what is left is the ratio bias of mucinous, whose 2 stems differ in size and recall
    assert abs(np.mean(new_values) - estimate) < 0.015
    interval = bootstrap_intervals(
        {"balanced_accuracy": balanced_accuracy}, probs, labels, units_of(patients, "stem")
    )["balanced_accuracy"]
    assert interval.lo <= estimate <= interval.hi and interval.n_valid == 1000
    assert (interval.lo, interval.hi) == pytest.approx(np.quantile(new_values, [0.025, 0.975]))


def test_metrics_json_names_the_scheme_and_gives_no_interval_to_a_one_stem_class():
    probs, labels, patients = demo_test_split()
    settings = EvaluateConfig(bootstrap_resamples=300, seed=2)
    units = units_of(patients, "stem")
    m = final_metrics(probs, labels, CLASSES, patients, None, settings, units)
    assert m["interval"] == {
        "method": "percentile bootstrap",
        "unit": "stem",
        "stratified_by": "class",
        "resamples": 300,
        "level": 0.95,
        "seed": 2,
        "n_groups": 15,
        "fixed_classes": ONE_STEM,
        "undefined_resamples": {},
    }
    for name in ONE_STEM:
        row = m["per_class"][name]
        assert row["recall_ci95"] is None
        assert row["recall_ci95_reason"].startswith("every resample draws the same stem group(s)")
    absent = m["per_class"]["adenosis"]
    assert absent["recall_ci95"] is None and absent["recall_ci95_reason"].startswith("no image")
    # the ductal recall's interval, recomputed with scikit-learn on the same resamples
    metrics = pytest.importorskip("sklearn.metrics")
    values = [
        metrics.recall_score(labels[idx] == 4, probs[idx].argmax(axis=1) == 4)
        for idx in unit_resamples(units.groups, labels, len(CLASSES), 300, seed=2)
    ]
    ductal = m["per_class"]["ductal_carcinoma"]
    assert ductal["recall_ci95"] == pytest.approx(list(np.quantile(values, [0.025, 0.975])))
    assert ductal["recall_ci95"][0] <= ductal["recall"] <= ductal["recall_ci95"][1]
    assert list(ductal).index("recall_ci95") == list(ductal).index("recall") + 1
    # the patient-level table resamples the same stems (16 folders, 15 stems)
    patient = m["patient_level"]
    assert patient["n_patients"] == 16 and patient["interval"]["n_groups"] == 15
    assert patient["interval"]["unit"] == "stem"


def test_class_recall_matches_sklearn_and_is_undefined_without_the_class():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=120)
    labels = rng.choice([0, 1, 3], size=120)
    preds = probs.argmax(axis=1)
    for c in (0, 1, 3):
        assert class_recall(c)(probs, labels) == pytest.approx(
            metrics.recall_score(labels == c, preds == c)
        )
    assert class_recall(2)(probs, labels) is None


def test_stems_come_from_the_breakhis_slide_ids():
    units = units_of(["22549AB", "22549CD", "3411F", "0123"], "stem")
    assert units.groups == ["22549", "22549", "3411", "123"] and units.name == "stem"
    assert units_of(["22549AB"], "patient").groups == ["22549AB"]
    with pytest.raises(ValueError, match="'P01' is not a BreakHis slide id"):
        units_of(["P01"], "stem")


def test_a_stem_of_two_classes_is_resampled_with_its_rarer_class():
    # stem 29960 holds 6 fibroadenoma and 2 adenosis images; adenosis has no other stem,
    # fibroadenoma two more: 29960 goes with adenosis, so adenosis is in every resample
    labels = np.array([1] * 6 + [0] * 2 + [1] * 4 + [1] * 4)
    stems = ["29960"] * 8 + ["14134"] * 4 + ["23060"] * 4
    probs = np.eye(8)[labels]
    for idx in unit_resamples(stems, labels, 8, 200, seed=1):
        assert np.sum(np.asarray(stems)[idx] == "29960") == 8  # drawn exactly once
        assert set(labels[idx]) == {0, 1}
    got = bootstrap_intervals({"ba": balanced_accuracy}, probs, labels, stems, 50)["ba"]
    assert got.lo == got.hi == 1.0 and got.n_valid == 50


def test_a_class_whose_stems_are_each_alone_in_their_stratum_has_no_recall_interval():
    # the demo's fibroadenoma: stems 23222 (fibroadenoma) and 29960 (folders 29960AB,
    # fibroadenoma, and 29960CD, adenosis: the stem goes with adenosis, its rarer class), so
    # every resample draws both once
    labels = np.array([1] * 4 + [1] * 3 + [0] * 2 + [4] * 3 + [4] * 3)
    patients = ["23222AB"] * 4 + ["29960AB"] * 3 + ["29960CD"] * 2 + ["10926"] * 3 + ["11031"] * 3
    probs = np.eye(8)[(labels + np.arange(len(labels)) % 2) % 8]  # every other image wrong
    settings = EvaluateConfig(bootstrap_resamples=50)
    units = units_of(patients, "stem")
    m = final_metrics(probs, labels, CLASSES, patients, None, settings, units)
    assert m["interval"]["fixed_classes"] == ["adenosis", "fibroadenoma"]
    assert m["per_class"]["fibroadenoma"]["recall_ci95"] is None
    assert m["per_class"]["ductal_carcinoma"]["recall_ci95"] is not None
