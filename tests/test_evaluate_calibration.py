"""Calibration metrics, temperature scaling and patient-level fusion (breakhis_ft.evaluate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from breakhis_ft.evaluate.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    plot_reliability,
    reliability_bins,
)
from breakhis_ft.evaluate.fusion import fuse_by_patient, patient_labels


def test_ece_of_a_constantly_overconfident_model():
    # confidence 0.9 on every image, right on 60 of 100: one bin, gap 0.3
    probs = np.tile([0.9, 0.05, 0.05], (100, 1))
    labels = np.array([0] * 60 + [1] * 40)
    out = calibration_metrics(probs, labels)
    assert out["ece"] == pytest.approx(0.3, abs=1e-6)
    assert out["mce"] == pytest.approx(0.3, abs=1e-6)
    bins = reliability_bins(probs, labels)
    top = bins["count"].index(100)
    assert bins["confidence"][top] == pytest.approx(0.9) and bins["accuracy"][top] == 0.6
    assert sum(bins["count"]) == 100 and bins["accuracy"][0] is None


def test_brier_and_nll_hand_values():
    probs = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]
    out = calibration_metrics(probs, [0, 2])
    # (0.3^2 + 0.2^2 + 0.1^2) = 0.14 and (0.2^2 + 0.5^2 + 0.7^2) = 0.78
    assert out["brier"] == pytest.approx((0.14 + 0.78) / 2)
    assert out["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    # a zero probability on the true class is floored, not an infinite NLL
    assert calibration_metrics([[1.0, 0.0]], [1])["nll"] == pytest.approx(-math.log(1e-12))


def test_calibration_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=500)
    labels = rng.integers(0, 4, size=500)
    out = calibration_metrics(probs, labels)
    assert out["nll"] == pytest.approx(metrics.log_loss(labels, probs, labels=range(4)))
    # sklearn's brier_score_loss is binary only: sum the one-vs-rest scores of each class
    brier = sum(metrics.brier_score_loss(labels == c, probs[:, c]) for c in range(4))
    assert out["brier"] == pytest.approx(brier)


def test_reliability_bins_reproduce_ece():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3) * 0.5, size=400)
    labels = rng.integers(0, 3, size=400)
    bins = reliability_bins(probs, labels, n_bins=10)
    assert len(bins["edges"]) == 11 and sum(bins["count"]) == 400
    gaps = [
        n * abs(a - c)
        for a, c, n in zip(bins["accuracy"], bins["confidence"], bins["count"], strict=True)
        if n
    ]
    assert sum(gaps) / 400 == pytest.approx(calibration_metrics(probs, labels, 10)["ece"], 1e-5)


def _calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, 5] and labels drawn from softmax(logits): a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(n, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    return logits, labels


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_temperature_undoes_overconfidence():
    val_logits, val_labels = _calibrated(4000, seed=2)
    test_logits, test_labels = _calibrated(4000, seed=3)
    temperature = fit_temperature(3 * val_logits, val_labels)  # over-confident on purpose
    assert temperature == pytest.approx(3.0, rel=0.1)
    # logits and log-probabilities differ by a per-row constant: the same temperature
    log_probs = np.log(_softmax(3 * val_logits))
    assert fit_temperature(log_probs, val_labels) == pytest.approx(temperature, rel=1e-4)

    over = _softmax(3 * test_logits)
    scaled = apply_temperature(over, temperature)
    assert np.allclose(scaled.sum(axis=1), 1.0)
    before, after = calibration_metrics(over, test_labels), calibration_metrics(scaled, test_labels)
    assert after["nll"] < before["nll"] - 0.1 and after["ece"] < before["ece"]
    assert np.allclose(apply_temperature(over, 1.0), over)
    with pytest.raises(ValueError, match="got probabilities"):
        fit_temperature(over, test_labels)


def test_plot_reliability_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    bins = reliability_bins([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]], [0, 0, 1], n_bins=5)
    path = plot_reliability(bins, tmp_path / "plots" / "reliability.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# patient p1: two images vote class 1, but the class-0 image is far more confident;
# patient p2: one image. The rows are interleaved and p2 comes first.
PROBS = np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
PATIENTS = ["p2", "p1", "p1", "p1"]


def test_fusion_by_mean_prob_and_mean_log_prob():
    ids, fused = fuse_by_patient(PROBS, PATIENTS, "mean_prob")
    assert ids == ["p1", "p2"]
    np.testing.assert_allclose(fused, [[1.6 / 3, 1.4 / 3], [0.2, 0.8]])

    ids, fused = fuse_by_patient(PROBS, PATIENTS)  # mean_log_prob is the default
    g0, g1 = (0.9 * 0.4 * 0.3) ** (1 / 3), (0.1 * 0.6 * 0.7) ** (1 / 3)  # geometric means
    np.testing.assert_allclose(fused, [[g0 / (g0 + g1), g1 / (g0 + g1)], [0.2, 0.8]])


def test_fusion_by_majority_vote_breaks_ties_by_mean_probability():
    ids, fused = fuse_by_patient(PROBS, PATIENTS, "majority_vote")
    # p1: votes (1, 2), mean probs (1.6/3, 1.4/3): (votes + 0.5 mean) / 3.5
    assert fused[0].tolist() == pytest.approx([(1 + 0.8 / 3) / 3.5, (2 + 0.7 / 3) / 3.5])
    assert fused[1].tolist() == pytest.approx([0.1 / 1.5, 1.4 / 1.5])
    assert fused.argmax(axis=1).tolist() == [1, 1]  # the mean rules would say class 0 for p1

    # one vote each: the class with the higher mean probability wins, whichever is listed first
    for tie, winner in (([[0.6, 0.4], [0.1, 0.9]], 1), ([[0.9, 0.1], [0.45, 0.55]], 0)):
        _, fused = fuse_by_patient(tie, ["t", "t"], "majority_vote")
        assert fused.argmax() == winner and fused.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown fusion method 'median'"):
        fuse_by_patient(PROBS, PATIENTS, "median")


def test_patient_labels_line_up_with_fusion_and_reject_mixed_patients():
    ids, labels = patient_labels([1, 0, 0, 0], PATIENTS)
    assert ids == fuse_by_patient(PROBS, PATIENTS)[0] and labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="patient 'p1' has several labels: 0, 1"):
        patient_labels([1, 0, 1, 0], PATIENTS)
