"""Group-bootstrap intervals and paired comparison (evaluate.bootstrap, evaluate.compare)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.hand_stats import hand_stratified_draws
from torchmetrics.functional.classification import multiclass_auroc, multiclass_f1_score

from breakhis_ft.evaluate.bootstrap import (
    STANDARD_METRICS,
    Interval,
    accuracy,
    auroc_macro,
    balanced_accuracy,
    bootstrap_intervals,
    f1_macro,
    patient_bootstrap,
)
from breakhis_ft.evaluate.compare import align_predictions, paired_bootstrap, separable

N_CLASSES = 4


def _simulate(n_patients: int, seed: int, images: int = 12, correlated: bool = True):
    """A split: each patient one class, a patient-level skill shared by its images (if correlated).

    Returns probs [N, C], labels [N], patients [N]. With `correlated`, a patient's images are all
    right or all wrong (a hard/easy tumour); otherwise each image is right independently.
    """
    rng = np.random.default_rng(seed)
    probs, labels, patients = [], [], []
    for p in range(n_patients):
        label = p % N_CLASSES
        patient_right = rng.random() < 0.7
        for _ in range(images):
            right = patient_right if correlated else rng.random() < 0.7
            peak = label if right else (label + rng.integers(1, N_CLASSES)) % N_CLASSES
            logits = rng.normal(0, 0.5, N_CLASSES)
            logits[peak] += 2.0
            probs.append(np.exp(logits) / np.exp(logits).sum())
            labels.append(label)
            patients.append(f"P{p:03d}")
    return np.array(probs), np.array(labels), patients


def _width(interval: Interval) -> float:
    return interval.hi - interval.lo


def test_interval_contains_estimate_and_shrinks_with_more_patients():
    few = bootstrap_intervals(STANDARD_METRICS, *_simulate(10, seed=1), n_resamples=400, seed=0)
    many = bootstrap_intervals(STANDARD_METRICS, *_simulate(80, seed=1), n_resamples=400, seed=0)
    for name, interval in many.items():
        assert interval.lo <= interval.estimate <= interval.hi, name
        assert interval.n_valid == 400 and interval.n_dropped == 0
    for name in ("accuracy", "balanced_accuracy", "f1_macro"):
        assert few[name].lo <= few[name].estimate <= few[name].hi, name
        # sqrt(80 / 10) ~ 2.8 expected; 1.5 leaves room for the noise of one draw
        assert _width(few[name]) > 1.5 * _width(many[name]), name


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_correlated_images():
    probs, labels, patients = _simulate(40, seed=2, images=20, correlated=True)
    by_patient = patient_bootstrap(accuracy, probs, labels, patients, n_resamples=500)
    # every image its own "patient" is the image-level bootstrap
    by_image = patient_bootstrap(accuracy, probs, labels, range(len(labels)), n_resamples=500)
    assert _width(by_patient) > 1.5 * _width(by_image)  # ~ sqrt(20) = 4.5 expected

    # control: independent images, so the two bootstraps should roughly agree
    probs, labels, patients = _simulate(40, seed=2, images=20, correlated=False)
    by_patient = patient_bootstrap(accuracy, probs, labels, patients, n_resamples=500)
    by_image = patient_bootstrap(accuracy, probs, labels, range(len(labels)), n_resamples=500)
    assert _width(by_patient) < 1.3 * _width(by_image)


def _plain_balanced_accuracy(labels, preds) -> float:
    recalls = []
    for c in sorted(set(labels)):
        rows = [i for i, y in enumerate(labels) if y == c]
        recalls.append(sum(preds[i] == c for i in rows) / len(rows))
    return sum(recalls) / len(recalls)


def test_interval_matches_a_hand_written_stratified_bootstrap_loop():
    probs, labels, patients = _simulate(15, seed=3)
    got = patient_bootstrap(balanced_accuracy, probs, labels, patients, n_resamples=200, seed=7)

    rng = np.random.default_rng(7)
    ids = sorted(set(patients))
    images_of = {pid: [i for i, p in enumerate(patients) if p == pid] for pid in ids}
    class_of = {pid: int(labels[images_of[pid][0]]) for pid in ids}
    groups_of_class = {c: [p for p in ids if class_of[p] == c] for c in set(class_of.values())}
    preds = probs.argmax(axis=1).tolist()
    values = []
    for _ in range(200):
        drawn = hand_stratified_draws(groups_of_class, rng)
        idx = [i for pid in drawn for i in images_of[pid]]
        values.append(_plain_balanced_accuracy([labels[i] for i in idx], [preds[i] for i in idx]))
    lo, hi = np.quantile(values, [0.025, 0.975])
    assert (got.lo, got.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert got.estimate == pytest.approx(_plain_balanced_accuracy(labels.tolist(), preds))


def test_resamples_depend_on_patient_ids_and_seed_only():
    probs, labels, patients = _simulate(12, seed=4)
    base = bootstrap_intervals(STANDARD_METRICS, probs, labels, patients, n_resamples=100, seed=3)
    order = np.random.default_rng(0).permutation(len(labels))
    shuffled = bootstrap_intervals(
        STANDARD_METRICS, probs[order], labels[order], [patients[i] for i in order], 100, 3
    )
    for name in STANDARD_METRICS:
        assert (shuffled[name].lo, shuffled[name].hi) == pytest.approx(
            (base[name].lo, base[name].hi)
        )
    other_seed = patient_bootstrap(accuracy, probs, labels, patients, n_resamples=100, seed=4)
    assert (other_seed.lo, other_seed.hi) != (base["accuracy"].lo, base["accuracy"].hi)


def test_undefined_resamples_are_dropped_and_counted():
    # two patients of different classes: resampled within its class, each is always drawn
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    labels, patients = np.array([0, 0, 1, 1]), ["a", "a", "b", "b"]
    out = bootstrap_intervals(
        {"auroc_macro": auroc_macro, "nan": lambda p, y: float("nan")},
        probs, labels, patients, n_resamples=200,
    )  # fmt: skip
    auroc = out["auroc_macro"]
    assert auroc.estimate == 1.0
    # unstratified, about half the resamples drew one patient twice and had no AUROC
    assert auroc.n_valid == 200 and auroc.n_dropped == 0
    assert auroc.lo == auroc.hi == 1.0
    assert out["nan"].as_dict() == {
        "estimate": None, "lo": None, "hi": None, "level": 0.95, "n_valid": 0, "n_dropped": 200
    }  # fmt: skip


def test_metric_functions_match_torchmetrics():
    rng = np.random.default_rng(5)
    # rounded probabilities create ties; class 3 is absent from the labels, class 4 never predicted
    probs = np.round(rng.dirichlet(np.ones(5), size=300), 1)
    probs[:, 4] = 0.0
    labels = rng.choice([0, 1, 2, 4], size=300)
    p, y = torch.tensor(probs), torch.tensor(labels)
    assert f1_macro(probs, labels) == pytest.approx(
        float(multiclass_f1_score(p.argmax(1), y, num_classes=5, average="macro"))
    )
    with pytest.warns(UserWarning):  # torchmetrics warns about class 3, absent from the labels
        per_class = multiclass_auroc(p, y, num_classes=5, average="none")
    assert auroc_macro(probs, labels) == pytest.approx(float(per_class[[0, 1, 2, 4]].mean()))
    assert accuracy(probs, labels) == pytest.approx(float((p.argmax(1) == y).double().mean()))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metric_functions_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(4), size=200)
    labels = rng.choice([0, 1, 3], size=200)  # class 2 absent
    preds = probs.argmax(axis=1)
    assert balanced_accuracy(probs, labels) == pytest.approx(
        metrics.balanced_accuracy_score(labels, preds)
    )
    expected = np.mean([metrics.roc_auc_score(labels == c, probs[:, c]) for c in np.unique(labels)])
    assert auroc_macro(probs, labels) == pytest.approx(expected)


def test_paired_bootstrap_of_identical_runs_is_a_tie():
    probs, labels, patients = _simulate(20, seed=8)
    out = paired_bootstrap(balanced_accuracy, probs, probs.copy(), labels, patients, 300)
    assert out["difference"] == 0.0
    assert out["ci95"] == [0.0, 0.0] and out["ci95"][0] <= 0.0 <= out["ci95"][1]
    assert (out["share_a_wins"], out["share_b_wins"], out["share_ties"]) == (0.0, 0.0, 1.0)
    assert out["n_valid"] == 300 and out["n_dropped"] == 0


def test_paired_bootstrap_finds_the_clearly_better_run():
    probs_b, labels, patients = _simulate(30, seed=9)
    probs_a = probs_b.copy()
    wrong = np.flatnonzero(probs_a.argmax(axis=1) != labels)
    fixed = wrong[: int(0.8 * len(wrong))]  # A fixes 80% of B's mistakes
    probs_a[fixed] = np.eye(N_CLASSES)[labels[fixed]] * 0.9 + 0.1 / N_CLASSES
    out = paired_bootstrap(accuracy, probs_a, probs_b, labels, patients, 300, seed=1)
    assert out["difference"] == pytest.approx(out["a"] - out["b"]) and out["difference"] > 0.1
    assert 0.0 < out["ci95"][0] <= out["difference"] <= out["ci95"][1]
    assert out["share_a_wins"] > 0.95
    # the same seed gives bootstrap_intervals' resamples: the two runs' intervals line up
    a = patient_bootstrap(accuracy, probs_a, labels, patients, 300, seed=1)
    assert a.estimate == out["a"]


def _run(paths, probs, labels, patients):
    return {
        "paths": paths,
        "probs": probs,
        "labels": labels,
        "patients": patients,
        "classes": ["x", "y"],
    }


def test_align_predictions_matches_rows_by_path():
    a = _run(["i1", "i2", "i3"], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [0, 1, 1], ["p", "p", "q"])
    b = _run(["i3", "i1", "i2"], [[0.5, 0.5], [0.7, 0.3], [0.1, 0.9]], [1, 0, 1], ["q", "p", "p"])
    out = align_predictions(a, b)
    assert out["paths"] == ["i1", "i2", "i3"] and out["patients"] == ["p", "p", "q"]
    assert out["labels"].tolist() == [0, 1, 1]
    assert out["probs_b"].tolist() == [[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]]
    assert out["probs_a"].tolist() == a["probs"] and out["classes"] == ["x", "y"]

    missing = _run(["i1", "i2", "i4"], b["probs"], [0, 1, 1], ["p", "p", "q"])
    with pytest.raises(ValueError, match=r"1 only in A \(i3\), 1 only in B \(i4\)"):
        align_predictions(a, missing)
    relabelled = _run(["i1", "i2", "i3"], a["probs"], [0, 0, 1], ["p", "p", "q"])
    with pytest.raises(ValueError, match="disagree on 'i2': label 1 vs 0"):
        align_predictions(a, relabelled)
    with pytest.raises(ValueError, match="lists image 'i1' twice"):
        align_predictions(a, _run(["i1", "i1", "i3"], a["probs"], [0, 1, 1], ["p", "p", "q"]))
    with pytest.raises(ValueError, match="classes differ"):
        align_predictions(a, {**b, "classes": ["y", "x"]})


def test_separable_needs_disjoint_intervals():
    assert separable((0.1, 0.3), (0.4, 0.6)) and separable((0.4, 0.6), (0.1, 0.3))
    assert not separable((0.1, 0.4), (0.4, 0.6))  # touching counts as overlap
    assert not separable((0.1, 0.5), (0.4, 0.6))
    assert not separable((None, None), (0.4, 0.6)) and not separable(None, (0.4, 0.6))
    assert separable(Interval(0.2, 0.1, 0.3, 0.95, 10, 10), Interval(0.8, 0.7, 0.9, 0.95, 10, 10))
