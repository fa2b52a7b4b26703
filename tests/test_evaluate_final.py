"""The final evaluation: the wired statistics against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.hand_stats import hand_stratified_draws

from breakhis_ft.config import EvaluateConfig, Fusion
from breakhis_ft.data.records import class_names
from breakhis_ft.evaluate.bootstrap import (
    HEADLINE_METRICS,
    binary_metrics,
    bootstrap_intervals,
    ci_key,
    f1_weighted,
    recognition_rate,
    units_of,
)
from breakhis_ft.evaluate.calibration import calibration_metrics
from breakhis_ft.evaluate.final import final_metrics, fit_split_temperature
from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags
from breakhis_ft.run.tracking import summary_of

CLASSES = class_names("subtype8")
MALIGNANT = malignant_flags(CLASSES)


def _split(n_patients: int, seed: int, images: int = 6, sharpness: float = 1.0):
    """Probs [N, 8], labels [N], patients [N]: one class per patient, noisy but informative."""
    rng = np.random.default_rng(seed)
    probs, labels, patients = [], [], []
    for p in range(n_patients):
        label = int(rng.integers(0, len(CLASSES)))
        for _ in range(images):
            logits = rng.normal(0, 1, len(CLASSES))
            logits[label] += 1.2
            z = sharpness * logits
            probs.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
            labels.append(label)
            patients.append(f"P{p:02d}")
    return np.array(probs), np.array(labels), patients


def test_new_metric_functions_match_compute_metrics():
    # several seeds, so that some splits miss classes and some resample-like subsets are odd
    for seed in range(4):
        probs, labels, patients = _split(9, seed, images=5)
        expected = compute_metrics(
            torch.tensor(probs), torch.tensor(labels), CLASSES, patients, None, MALIGNANT
        )
        p32 = torch.tensor(probs, dtype=torch.float32).double().numpy()  # what compute sees
        assert f1_weighted(p32, labels) == pytest.approx(expected["f1_weighted"], abs=1e-6)
        groups = np.unique(patients, return_inverse=True)[1]
        assert recognition_rate(p32, labels, groups) == pytest.approx(
            expected["patient_recognition_rate"], abs=1e-6
        )
        binary = binary_metrics(MALIGNANT)
        for key in ("accuracy", "balanced_accuracy", "f1", "auroc"):
            got, want = binary[key](p32, labels), expected["binary"][key]
            assert (got is None and want is None) or got == pytest.approx(want, abs=1e-6), key


def test_binary_f1_without_malignant_is_zero_and_auroc_undefined():
    probs = np.eye(8)[[0, 1, 2]] * 0.9 + 0.0125  # all benign, all predicted benign
    labels = np.array([0, 1, 2])
    expected = compute_metrics(
        torch.tensor(probs), torch.tensor(labels), CLASSES, None, None, MALIGNANT
    )
    fns = binary_metrics(MALIGNANT)
    assert fns["f1"](probs, labels) == expected["binary"]["f1"] == 0.0
    assert fns["auroc"](probs, labels) is None and expected["binary"]["auroc"] is None


def test_recognition_rate_interval_counts_a_patient_drawn_twice_twice():
    probs, labels, patients = _split(8, seed=3, images=4)
    correct = probs.argmax(axis=1) == labels
    ids = sorted(set(patients))
    rate = {pid: correct[[i for i, p in enumerate(patients) if p == pid]].mean() for pid in ids}
    class_of = {pid: int(labels[patients.index(pid)]) for pid in ids}
    groups_of_class = {c: [p for p in ids if class_of[p] == c] for c in set(class_of.values())}
    rng = np.random.default_rng(11)
    values = [
        np.mean([rate[pid] for pid in hand_stratified_draws(groups_of_class, rng)])
        for _ in range(300)
    ]
    lo, hi = np.quantile(values, [0.025, 0.975])
    got = bootstrap_intervals(
        {"r": recognition_rate}, probs, labels, patients, n_resamples=300, seed=11
    )["r"]
    assert (got.lo, got.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert got.estimate == pytest.approx(np.mean(list(rate.values())))


def test_recognition_rate_of_stem_units_averages_each_drawn_folder():
    # two sibling folders of one stem, resampled together: the rate still averages the folders
    probs = np.eye(8)[[0, 0, 1, 0]] * 0.9 + 0.0125
    labels = np.array([0, 0, 0, 0])
    patients = ["22549AB", "22549AB", "22549CD", "3411F"]
    units = units_of(patients, "stem")
    got = bootstrap_intervals({"r": recognition_rate}, probs, labels, units, 50)["r"]
    # folders 22549AB (1.0), 22549CD (0.0), 3411F (1.0); stems 22549 and 3411 drawn 0-2 times
    assert got.estimate == pytest.approx(2 / 3)
    assert 0.0 <= got.lo <= got.hi <= 1.0 and got.n_valid == 50


def test_final_metrics_store_intervals_calibration_and_patient_level():
    probs, labels, patients = _split(20, seed=1)
    settings = EvaluateConfig(bootstrap_resamples=300, seed=4)
    m = final_metrics(probs, labels, CLASSES, patients, [40] * len(labels), settings)
    for name in HEADLINE_METRICS:
        lo, hi = m[ci_key(name, 0.95)]
        assert 0.0 <= lo <= hi <= 1.0, name
        assert list(m).index(ci_key(name, 0.95)) == list(m).index(name) + 1  # beside its value
    for name in ("accuracy", "balanced_accuracy", "f1", "auroc"):
        assert len(m["binary"][f"{name}_ci95"]) == 2
    assert m["interval"]["resamples"] == 300 and m["interval"]["n_groups"] == 20
    # the interval is the bootstrap's, with the same seed and resamples
    again = bootstrap_intervals(HEADLINE_METRICS, probs, labels, patients, 300, seed=4)
    assert m["balanced_accuracy_ci95"] == pytest.approx(
        [again["balanced_accuracy"].lo, again["balanced_accuracy"].hi]
    )
    before = calibration_metrics(torch.tensor(probs, dtype=torch.float32).double(), labels, 15)
    assert m["calibration"] == {"n_bins": 15, "before": pytest.approx(before)}
    patient = m["patient_level"]
    assert patient["n_patients"] == 20 and patient["fusion"] == "mean_log_prob"
    assert np.sum(patient["confusion_matrix"]) == 20 and len(patient["diagnoses"]) == 20
    assert np.sum(patient["binary"]["confusion_matrix"]) == 20
    assert len(patient["balanced_accuracy_ci95"]) == 2
    assert "patient_recognition_rate" not in patient
    json.dumps(m, allow_nan=False)

    off = final_metrics(
        probs, labels, CLASSES, patients, None, EvaluateConfig(bootstrap_resamples=0)
    )
    assert not [k for k in off if "_ci" in k] and "interval" not in off


def test_patient_level_of_a_two_patient_hand_case():
    # patient a (adenosis): two images lean to adenosis, one is sure of fibroadenoma;
    # patient b (ductal carcinoma): one image, predicted lobular carcinoma
    probs = np.full((4, 8), 0.01)
    probs[0, [0, 1]] = probs[1, [0, 1]] = [0.75, 0.19]
    probs[2, [0, 1]] = [0.02, 0.92]
    probs[3, [4, 5]] = [0.3, 0.64]
    labels = np.array([0, 0, 0, 4])
    patients = ["a", "a", "a", "b"]
    for fusion, a_pred in [
        # geometric means: adenosis (0.75^2 * 0.02)^(1/3) = 0.22 < fibroadenoma 0.32
        (Fusion.mean_log_prob, 1),
        # arithmetic means: adenosis (0.75 + 0.75 + 0.02) / 3 = 0.51 > fibroadenoma 0.43
        (Fusion.mean_prob, 0),
        (Fusion.majority_vote, 0),  # two votes of three
    ]:
        settings = EvaluateConfig(bootstrap_resamples=50, patient_fusion=fusion)
        pl = final_metrics(probs, labels, CLASSES, patients, None, settings)["patient_level"]
        preds = [d["pred"] for d in pl["diagnoses"]]
        assert preds == [CLASSES[a_pred], CLASSES[5]], fusion
        assert pl["accuracy"] == pytest.approx(1 / 2 if a_pred == 0 else 0.0)
        # benign/malignant: a benign either way, b malignant (LC): both right
        assert pl["binary"]["accuracy"] == 1.0 and pl["binary"]["confusion_matrix"] == [
            [1, 0],
            [0, 1],
        ]
        assert [d["n_images"] for d in pl["diagnoses"]] == [3, 1]


def test_temperature_fitted_on_val_reduces_test_nll_of_an_overconfident_model():
    val = _split(30, seed=5, sharpness=4.0)  # logits x4: far too confident
    test = _split(30, seed=6, sharpness=4.0)
    temperature, after = fit_split_temperature(
        (val[0], val[1]), {"val": (val[0], val[1]), "test": (test[0], test[1])}, 15
    )
    assert temperature > 2.0
    before = calibration_metrics(test[0], test[1], 15)
    assert after["test"]["nll"] < before["nll"] - 0.2
    assert after["test"]["ece"] < before["ece"]


def test_summary_of_keeps_the_headline_and_its_intervals_for_the_runs_table():
    metrics = {
        "test": {
            "accuracy": 0.5,
            "accuracy_ci95": [0.4, 0.6],
            "per_class": {"x": {"f1": 1.0}},
            "calibration": {"before": {"ece": 0.1}},
            "patient_level": {"accuracy": 0.7, "binary": {"accuracy_ci95": [0.5, 0.9]}},
        }
    }
    metrics["test"]["binary"] = {"accuracy": 0.8, "accuracy_ci95": [0.7, 0.9], "f1": 0.6}
    # per class, calibration and patient level stay in metrics.json and the W&B tables
    assert summary_of(metrics) == {
        "test/accuracy": 0.5,
        "test/accuracy_ci95": [0.4, 0.6],
        "test/binary/accuracy": 0.8,
        "test/binary/accuracy_ci95": [0.7, 0.9],
    }
    assert ci_key("f1", 0.9) == "f1_ci90" and ci_key("f1", 0.95) == "f1_ci95"


def test_read_temperature_of_a_run_folder(tmp_path):
    from breakhis_ft.evaluate.calibration import read_temperature

    assert read_temperature(tmp_path) is None  # no calibration.json: the model's probabilities
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    assert read_temperature(tmp_path) == 1.7
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": None}))
    assert read_temperature(tmp_path) is None  # turned off (evaluate.temperature_scaling=false)
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="calibration.json: temperature must be a positive"):
        read_temperature(tmp_path)
