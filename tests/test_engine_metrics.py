"""Metrics against hand-computed small cases, and predictions files that recompute metrics.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from breakhis_ft.evaluate.metrics import (
    compute_metrics,
    malignant_flags,
    read_predictions,
    write_predictions,
)

CLASSES = ["tubular_adenoma", "mucinous_carcinoma", "fibroadenoma", "ductal_carcinoma"]
# rows -> argmax 0, 1, 1, 3, 3, 3 against labels 0, 0, 1, 2, 3, 3: four right, two wrong
PROBS = torch.tensor(
    [
        [0.70, 0.10, 0.10, 0.10],
        [0.20, 0.50, 0.20, 0.10],
        [0.10, 0.60, 0.20, 0.10],
        [0.10, 0.05, 0.30, 0.55],
        [0.10, 0.10, 0.10, 0.70],
        [0.45, 0.05, 0.00, 0.50],
    ]
)
LABELS = torch.tensor([0, 0, 1, 2, 3, 3])
PATIENTS = ["a", "a", "a", "b", "c", "c"]
MAGS = [40, 40, 100, 100, 40, 100]


def close(a, b):
    return a is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def test_hand_computed_case():
    m = compute_metrics(PROBS, LABELS, CLASSES, PATIENTS, MAGS, malignant_flags(CLASSES))
    assert close(m["accuracy"], 4 / 6)
    # recalls 1/2, 1, 0, 1
    assert close(m["balanced_accuracy"], 0.625)
    # f1 per class 2/3, 2/3, 0, 0.8; supports 2, 1, 1, 2
    assert close(m["f1_macro"], (2 / 3 + 2 / 3 + 0 + 0.8) / 4)
    assert close(m["f1_weighted"], (2 * 2 / 3 + 2 / 3 + 0 + 2 * 0.8) / 6)
    # one-vs-rest AUROC: 7/8, 1, 1, 7/8
    assert close(m["auroc_macro"], 0.9375)
    # patients: a 2/3, b 0, c 1 -> 5/9, not the image-level 4/6
    assert close(m["patient_recognition_rate"], 5 / 9)
    pc = m["per_class"]
    assert close(pc["tubular_adenoma"]["precision"], 1.0)
    assert close(pc["mucinous_carcinoma"]["precision"], 0.5)
    assert close(pc["fibroadenoma"]["precision"], 0.0)  # never predicted
    assert close(pc["ductal_carcinoma"]["precision"], 2 / 3)
    assert close(pc["ductal_carcinoma"]["f1"], 0.8)
    assert [pc[c]["support"] for c in CLASSES] == [2, 1, 1, 2]
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    assert m["classes"] == CLASSES
    # benign/malignant: MC and DC malignant; predicted types 0,1,1,1,1,1 vs truth 0,0,1,0,1,1
    b = m["binary"]
    assert close(b["accuracy"], 4 / 6)
    assert close(b["f1"], 0.75)  # tp 3, fp 2, fn 0
    # prob_malignant 0.2, 0.6, 0.7, 0.6, 0.8, 0.55: pairs won 3 + 3 + 1 of 9
    assert close(b["auroc"], 7 / 9)
    # recalls: benign 1/3 (rows 0, 1, 3), malignant 1 (rows 2, 4, 5)
    assert close(b["balanced_accuracy"], 2 / 3)
    assert b["confusion_matrix"] == [[1, 2], [0, 3]] and b["classes"] == ["benign", "malignant"]
    by = m["by_magnification"]
    assert set(by) == {"40", "100"}
    assert close(by["40"]["accuracy"], 2 / 3) and close(by["100"]["accuracy"], 2 / 3)
    assert by["40"]["by_magnification"] == {}
    json.dumps(m, allow_nan=False)  # JSON-serialisable, no NaN


def test_absent_class_does_not_crash_and_is_reported():
    keep = LABELS != 2
    m = compute_metrics(PROBS[keep], LABELS[keep], CLASSES, None, None, malignant_flags(CLASSES))
    assert m["auroc_undefined_classes"] == ["fibroadenoma"]
    assert m["auroc_macro"] is not None and 0.0 <= m["auroc_macro"] <= 1.0
    # balanced accuracy averages the classes present: recalls 1/2, 1, 1
    assert close(m["balanced_accuracy"], 2.5 / 3)
    assert m["patient_recognition_rate"] is None and m["by_magnification"] == {}
    json.dumps(m, allow_nan=False)


def test_single_class_split_has_no_auroc():
    probs, labels = PROBS[:2], LABELS[:2]  # only tubular_adenoma
    m = compute_metrics(probs, labels, CLASSES, malignant=malignant_flags(CLASSES))
    assert m["auroc_macro"] is None and m["binary"]["auroc"] is None
    json.dumps(m, allow_nan=False)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"probs must be \[N, 4\]"):
        compute_metrics(PROBS[:, :3], LABELS, CLASSES)
    assert malignant_flags(["cat", "dog"]) is None


def test_predictions_file_recomputes_metrics(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 60
    probs = torch.randn(n, 4, generator=g).mul(2).softmax(-1)
    labels = torch.randint(0, 4, (n,), generator=g)
    rows = [
        {
            "path": f"img/{i}.png",
            "patient": f"p{i % 7}",
            "magnification": (40, 100, 200, 400)[i % 4],
            "label": int(labels[i]),
        }
        for i in range(n)
    ]
    patients = [r["patient"] for r in rows]
    mags = [r["magnification"] for r in rows]
    metrics = compute_metrics(probs, labels, CLASSES, patients, mags, malignant_flags(CLASSES))
    (tmp_path / "metrics.json").write_text(json.dumps({"test": metrics}))
    write_predictions(tmp_path / "predictions_test.csv", rows, probs, probs.argmax(1), CLASSES)

    header = (tmp_path / "predictions_test.csv").read_text().splitlines()[0].split(",")
    assert header == ["path", "patient", "magnification", "label", "pred"] + [
        f"prob_{c}" for c in CLASSES
    ]
    back = read_predictions(tmp_path / "predictions_test.csv")
    assert torch.equal(back["probs"], probs) and torch.equal(back["labels"], labels)
    assert torch.equal(back["preds"], back["probs"].argmax(1))
    again = compute_metrics(
        back["probs"],
        back["labels"],
        back["classes"],
        back["patients"],
        back["magnifications"],
        malignant_flags(back["classes"]),
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert json.loads(json.dumps(again)) == saved
    assert len(saved["by_magnification"]) == 4
