"""One image cache per dataset and preprocessing: shared by every split, fold and seed, holding
images at the size the model reads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from breakhis_ft.config import TrainRunConfig
from breakhis_ft.data import dataset as ds_mod
from breakhis_ft.data.records import Task
from breakhis_ft.data.splits import assign_splits
from breakhis_ft.run.setup import make_datasets

REPO = Path(__file__).resolve().parent.parent


def run_config(cache_dir: Path, **data):
    """The schema with the subtype8 task, no augmentation and `data.<key>` values."""
    return OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig),
        {
            "task": OmegaConf.load(REPO / "conf" / "task" / "subtype8.yaml"),
            "data": {"augment": {"flips": False, "rot90": False}, **data},
            "paths": {"images": str(cache_dir)},
        },
    )


def splits_of(cfg, scan, seed: int):
    cfg.split.seed = seed
    task = Task.from_config(cfg.task)
    return assign_splits(scan.records, cfg.split, task, [40, 100, 200, 400], folds=scan.folds)


def test_another_split_seed_builds_nothing(
    replica_scan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = run_config(tmp_path, image_size=16)
    decoded = []
    real = ds_mod._decode
    monkeypatch.setattr(ds_mod, "_decode", lambda *a: decoded.append(a) or real(*a))
    first_splits = splits_of(cfg, replica_scan, 0)
    first = make_datasets(cfg, replica_scan, first_splits, True)
    n_images = len({r.path for records in first_splits.values() for r in records})
    assert len(decoded) == n_images
    other_splits = splits_of(cfg, replica_scan, 1)
    assert [r.path for r in other_splits["test"]] != [r.path for r in first_splits["test"]]
    with caplog.at_level(logging.INFO):
        other = make_datasets(cfg, replica_scan, other_splits, True)
    assert len(decoded) == n_images  # the second seed decoded nothing: the same cache
    assert (
        f"{n_images} images" in caplog.text
        and " MB " in caplog.text
        and "0 built now" in caplog.text
    )
    # an image the two seeds place in different splits reads the same pixels from the one cache
    first_split = {r.path: (name, i) for name in first for i, r in enumerate(first[name].records)}
    k, name, index = next(
        (k, *first_split[r.path])
        for k, r in enumerate(other["test"].records)
        if first_split[r.path][0] != "test"
    )
    same = np.asarray(other["test"].load(k)), np.asarray(first[name].load(index))
    assert np.array_equal(*same)


def test_the_cache_holds_images_at_the_models_input_size(replica_scan, tmp_path: Path) -> None:
    record = replica_scan.records[0]
    path = tmp_path / "data" / record.path
    path.parent.mkdir(parents=True)
    Image.new("RGB", (700, 460), (180, 90, 160)).save(path)  # BreakHis's size
    scan = type(replica_scan)(tmp_path / "data", [record])
    cfg = run_config(tmp_path / "cache", image_size=896)  # data=breakhis's default
    for side, expected in [(112, (170, 112)), (64, (97, 64)), (None, (896, 589))]:
        data = make_datasets(cfg, scan, {"train": [record]}, True, model_side=side)
        assert data["train"].load(0).size == expected, side
