"""Patient-level diagnosis: fuse the class probabilities of a patient's images into one.

Patients come out in sorted id order (`np.unique`), the same order in `fuse_by_patient` and
`patient_labels`, so their outputs line up row for row. The fused table has one row per patient;
a patient-level metric's interval is the bootstrap of that table, each row in its patient's unit
(`final.patient_level`: a stem's sibling folders together), as the image-level bootstrap does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

PROB_FLOOR = 1e-12  # log(0) of one image would veto a class for the whole patient
FusionMethod = Literal["mean_log_prob", "mean_prob", "majority_vote"]
METHODS: tuple[str, ...] = ("mean_log_prob", "mean_prob", "majority_vote")


def _group(patients: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    """Sorted distinct patient ids (as str) and each image's index into them."""
    ids, codes = np.unique(np.asarray([str(p) for p in patients]), return_inverse=True)
    return ids.tolist(), codes


def _sum_by(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group column sums of values [N, C] (groups given by codes [N])."""
    sums = np.zeros((n_groups, values.shape[1]))
    np.add.at(sums, codes, values)
    return sums


def fuse_by_patient(
    probs: Any, patients: Sequence[Any], method: FusionMethod = "mean_log_prob"
) -> tuple[list[str], np.ndarray]:
    """One probability row per patient from its images' rows: (sorted patient ids, [P, C]).

    - "mean_log_prob" (default): softmax of the mean log-probability (p floored at 1e-12), i.e.
      the renormalised geometric mean; the product-of-evidence rule, as if images were
      independent views of one diagnosis.
    - "mean_prob": the arithmetic mean of the probabilities (already sums to 1).
    - "majority_vote": each image votes for its argmax class. The row is the vote shares with
      half a vote spread by the patient's mean probability, (votes_c + 0.5 mean_p_c) / (n + 0.5):
      it sums to 1, its argmax is the class with most votes, and a tie in votes goes to the tied
      class with the higher mean probability (the half vote is too small to overturn one vote).
      An exact tie in both goes to the lower class index, as argmax does.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(patients) or len(probs) == 0:
        raise ValueError(f"need probs [N, C] with one patient per row; got {probs.shape}")
    ids, codes = _group(patients)
    n_images = np.bincount(codes, minlength=len(ids))[:, None]
    if method == "mean_log_prob":
        mean_log = _sum_by(np.log(np.maximum(probs, PROB_FLOOR)), codes, len(ids)) / n_images
        fused = np.exp(mean_log - mean_log.max(axis=1, keepdims=True))  # shift: no underflow
        return ids, fused / fused.sum(axis=1, keepdims=True)
    if method == "mean_prob":
        return ids, _sum_by(probs, codes, len(ids)) / n_images
    if method == "majority_vote":
        votes = np.zeros_like(probs)
        votes[np.arange(len(probs)), probs.argmax(axis=1)] = 1.0
        vote_counts = _sum_by(votes, codes, len(ids))  # exact integers, so vote ties stay exact
        mean_prob = _sum_by(probs, codes, len(ids)) / n_images
        return ids, (vote_counts + 0.5 * mean_prob) / (n_images + 0.5)
    raise ValueError(f"unknown fusion method {method!r}; choose one of {METHODS}")


def patient_labels(labels: Any, patients: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    """Each patient's label (sorted patient ids, labels [P]); an error names a mixed patient."""
    labels = np.asarray(labels)
    if labels.shape != (len(patients),):
        raise ValueError(f"{labels.shape} labels for {len(patients)} patients entries")
    ids, codes = _group(patients)
    out = np.empty(len(ids), dtype=labels.dtype)
    seen = np.zeros(len(ids), dtype=bool)
    for code, label in zip(codes, labels, strict=True):
        if not seen[code]:
            out[code], seen[code] = label, True
        elif label != out[code]:
            mixed = sorted({str(x) for x in labels[codes == code]})
            raise ValueError(f"patient {ids[code]!r} has several labels: {', '.join(mixed)}")
    return ids, out
