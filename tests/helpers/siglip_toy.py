"""Shared helpers of the SigLIP tests: the tiny checkpoint, the replica's records, configs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from breakhis_ft.config import PeftConfig, SiglipConfig
from breakhis_ft.data.breakhis import scan_breakhis
from breakhis_ft.data.records import ImageRecord, label_of
from breakhis_ft.models.tiny_siglip import ensure_tiny_siglip


def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SigLIP, built once per test session (every SigLIP test module shares it)."""
    return ensure_tiny_siglip(
        tmp_path_factory.getbasetemp() / "tiny_siglip", tmp_path_factory.getbasetemp()
    )


def replica(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A scan of the shared `replica_root` fixture, or of a small replica built here without it."""
    try:
        root = request.getfixturevalue("replica_root")
    except pytest.FixtureLookupError:
        from breakhis_ft.data.synthetic import build_replica

        root = tmp_path_factory.getbasetemp() / "siglip_replica"
        if not root.exists():
            build_replica(root, fraction=0.05, size=(48, 32), seed=0)
    return scan_breakhis(root)


def model_cfg(path: Path, **overrides: Any) -> SiglipConfig:
    """A SigLIP model config pointing at `path`."""
    return SiglipConfig(name_or_path=str(path), **overrides)


PROBE = PeftConfig(method="none")
LORA = PeftConfig(method="lora", r=8, alpha=16, dropout=0.0)
FP32 = "fp32"


def examples(records: list[ImageRecord], task: str, images: list | None = None) -> list[dict]:
    """Dataset-style examples {image, label, index, path}; image None as with_images=False."""
    return [
        {
            "image": None if images is None else images[i],
            "label": label_of(r, task),
            "index": i,
            "path": r.path,
        }
        for i, r in enumerate(records)
    ]


def split_by_patient(
    records: list[ImageRecord], test_share: float = 1 / 3, seed: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Train / held-out records with no patient in both."""
    patients = sorted({r.patient for r in records})
    random.Random(seed).shuffle(patients)
    held_out = set(patients[: max(1, int(len(patients) * test_share))])
    train = [r for r in records if r.patient not in held_out]
    test = [r for r in records if r.patient in held_out]
    return train, test


class CallCounter:
    """Counts forward calls of a module (the encoder) through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1
