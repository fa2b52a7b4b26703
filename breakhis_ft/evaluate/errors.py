"""What a run gets wrong: its most confident errors and its most confused class pairs.

Read from the files a run writes (`predictions_<split>.csv`, the confusion matrix of
`metrics.json`), without torch, so the report, the W&B table at the end of a run and
`breakhis-ft-explain --errors` pick the same images.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from breakhis_ft.data.breakhis import BadDataError, load_image

TOP_CONFUSED = 5  # class pairs kept in metrics.json's most_confused


@dataclass(frozen=True)
class PredictionError:
    """One wrongly classified image of a predictions file."""

    path: str  # relative to the data root, as in the predictions file
    patient: str
    magnification: int
    true: str
    pred: str
    prob: float  # the probability of the (wrong) predicted class
    prob_true: float  # the probability the true class got


def most_confident_errors(predictions: str | Path, n: int | None = None) -> list[PredictionError]:
    """The wrongly classified rows of a predictions CSV, most confident first (then by path)."""
    with Path(predictions).open(newline="") as f:
        rows = list(csv.DictReader(f))
    errors = [
        PredictionError(
            path=row["path"],
            patient=row["patient"],
            magnification=int(row["magnification"]),
            true=row["label"],
            pred=row["pred"],
            prob=float(row[f"prob_{row['pred']}"]),
            prob_true=float(row[f"prob_{row['label']}"]),
        )
        for row in rows
        if row["label"] != row["pred"]
    ]
    errors.sort(key=lambda e: (-e.prob, e.path))
    return errors if n is None else errors[:n]


def confused_pairs(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], top: int | None = TOP_CONFUSED
) -> list[dict[str, Any]]:
    """The off-diagonal cells of a confusion matrix (rows: true, columns: predicted) with a
    count, largest first: [{"true", "pred", "count", "share"}]; share: of the true class."""
    pairs = []
    for i, row in enumerate(confusion):
        total = sum(int(x) for x in row)
        for j, count in enumerate(row):
            if i != j and int(count) > 0:
                pairs.append(
                    {
                        "true": classes[i],
                        "pred": classes[j],
                        "count": int(count),
                        "share": round(int(count) / total, 4),
                    }
                )
    pairs.sort(key=lambda p: (-p["count"], p["true"], p["pred"]))
    return pairs if top is None else pairs[:top]


def thumbnail(path: str | Path, size: int = 160) -> Image.Image | None:
    """The image at `path` shrunk so its longest side is at most `size`; None if unreadable."""
    try:
        image = load_image(path)
    except (BadDataError, FileNotFoundError):
        return None
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    return image
