"""The Arrow image cache (reuse, invalidation), the torch Dataset and the augmentation."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from breakhis_ft.config import AugmentConfig
from breakhis_ft.data import dataset as ds_mod
from breakhis_ft.data.augment import Augmenter, is_identity, stain_jitter
from breakhis_ft.data.breakhis import BadDataError, load_image
from breakhis_ft.data.dataset import (
    ImageDataset,
    build_image_cache,
    labels_for,
    resize_longest,
)


@pytest.fixture
def small(tmp_path, replica_scan):
    """A private copy of 12 replica images (so that tests may touch the files)."""
    records = replica_scan.records[::40][:12]
    for r in records:
        (tmp_path / "data" / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(replica_scan.root / r.path, tmp_path / "data" / r.path)
    return records, tmp_path / "data", tmp_path / "cache"


def test_cache_holds_the_resized_images(small):
    records, root, cache_dir = small
    cache = build_image_cache(records, root, 24, cache_dir, progress=False)
    assert len(cache) == len(records) and set(cache.rows) == {r.path for r in records}
    data = ImageDataset(records, labels_for(records, "subtype8"), cache)
    direct = ImageDataset(records, labels_for(records, "subtype8"), root, image_size=24)
    for i in range(len(records)):
        item, ref = data[i], direct[i]
        assert item["image"].size == (24, 16)  # 48x32 -> longest side 24, aspect kept
        assert np.array_equal(np.asarray(item["image"]), np.asarray(ref["image"]))
        assert item["path"] == records[i].path and item["index"] == i
        assert item["label"] == ref["label"] == labels_for(records, "subtype8")[i]


def test_cache_is_reused_and_invalidated(small, monkeypatch):
    records, root, cache_dir = small
    first = build_image_cache(records, root, 24, cache_dir, progress=False)
    assert first.built == len(records)
    calls = []
    real = ds_mod._decode
    monkeypatch.setattr(ds_mod, "_decode", lambda *a: calls.append(a) or real(*a))
    again = build_image_cache(records, root, 24, cache_dir, progress=False)
    assert calls == [] and again.built == 0 and again.rows.keys() == first.rows.keys()
    build_image_cache(records, root, 32, cache_dir, progress=False)  # preprocessing changed
    assert len(calls) == len(records)
    subset = build_image_cache(records[:5], root, 24, cache_dir, progress=False)
    assert len(calls) == len(records) and subset.built == 0  # a subset: every image is cached
    path = root / records[0].path
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # file changed
    changed = build_image_cache(records, root, 24, cache_dir, progress=False)
    assert len(calls) == len(records) + 1 and changed.built == 1  # only the changed file
    dirs = [d for d in (cache_dir / "images").iterdir() if d.suffix != ".lock"]
    assert len(dirs) == 2  # one folder per preprocessing
    assert not [d for d in dirs if d.name.startswith(".tmp")]


def test_cache_build_names_a_truncated_image(small):
    records, root, cache_dir = small
    path = root / records[3].path
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(path)
    path.write_bytes(path.read_bytes()[:70])
    with pytest.raises(BadDataError, match=f"{path.name}: unreadable or truncated"):
        build_image_cache(records, root, 24, cache_dir, progress=False)
    left = [p for p in (cache_dir / "images").rglob("*") if p.suffix != ".lock"]
    assert not left  # nothing half-built is left to reuse


def test_dataset_checks_its_inputs(small):
    records, root, cache_dir = small
    cache = build_image_cache(records[:4], root, 24, cache_dir, progress=False)
    with pytest.raises(ValueError, match="not in the image cache"):
        ImageDataset(records, [0] * len(records), cache)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(records, [0], root)
    adenosis = next(r for r in records if r.subtype == "adenosis")
    with pytest.raises(ValueError, match="subtype adenosis is not a class of task=eva4"):
        labels_for([adenosis], "eva4")
    no_images = ImageDataset(records, [0] * len(records), root, with_images=False)
    assert "image" not in no_images[0] and no_images[0]["path"] == records[0].path


def test_resize_longest_keeps_aspect():
    img = Image.new("RGB", (700, 456))
    assert resize_longest(img, 448).size == (448, 292)
    assert resize_longest(img, None) is img
    assert resize_longest(Image.new("RGB", (30, 60)), 90).size == (45, 90)


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 230, (12, 20, 3), dtype=np.uint8))


def test_augmentation_is_deterministic_per_epoch_and_index():
    aug = Augmenter(AugmentConfig(flips=True, rot90=True, stain_jitter=0.1, seed=7))
    img = _image()
    a = np.asarray(aug(img, epoch=2, index=5))
    assert np.array_equal(a, np.asarray(aug(img, epoch=2, index=5)))
    draws = {np.asarray(aug(img, epoch=e, index=5)).tobytes() for e in range(8)}
    assert len(draws) == 8  # the jitter differs every epoch
    other_seed = Augmenter(AugmentConfig(flips=True, rot90=True, stain_jitter=0.1, seed=8))
    assert not np.array_equal(a, np.asarray(other_seed(img, epoch=2, index=5)))


def test_flips_and_rotations_only_move_pixels():
    img = _image()
    arr = np.asarray(img)
    allowed = {
        np.rot90(np.flip(arr, axis) if axis is not None else arr, k).tobytes()
        for axis in (None, 0, 1)
        for k in range(4)
    }
    aug = Augmenter(AugmentConfig(flips=True, rot90=True, stain_jitter=0.0))
    outs = [np.asarray(aug(img, 0, i)) for i in range(40)]
    assert all(o.tobytes() in allowed for o in outs)
    assert {o.shape for o in outs} == {(12, 20, 3), (20, 12, 3)}  # rot90 swaps the sides
    flips_only = Augmenter(AugmentConfig(flips=True, rot90=False))
    assert {np.asarray(flips_only(img, 0, i)).shape for i in range(20)} == {(12, 20, 3)}
    assert is_identity(AugmentConfig(flips=False, rot90=False)) and is_identity(None)
    assert not is_identity(AugmentConfig(flips=False, rot90=False, stain_jitter=0.05))


def test_stain_jitter_changes_colour_not_structure():
    arr = np.asarray(_image(1))
    assert np.array_equal(stain_jitter(arr, 0.0, np.random.default_rng(0)), arr)
    tiny = stain_jitter(arr, 1e-6, np.random.default_rng(0))
    assert np.abs(tiny.astype(int) - arr).max() <= 1  # the deconvolution round trip is exact
    strong = stain_jitter(arr, 0.2, np.random.default_rng(0))
    assert np.abs(strong.astype(int) - arr).mean() > 3
    grey, grey2 = arr.mean(-1).ravel(), strong.astype(float).mean(-1).ravel()
    assert np.corrcoef(grey, grey2)[0, 1] > 0.8
    with pytest.raises(ValueError, match="stain_jitter"):
        Augmenter(AugmentConfig(stain_jitter=1.5))


def test_dataset_augments_only_when_asked_and_per_epoch(small):
    records, root, cache_dir = small
    cache = build_image_cache(records, root, 24, cache_dir, progress=False)
    labels = [0] * len(records)
    plain = ImageDataset(records, labels, cache, None)
    aug = ImageDataset(records, labels, cache, AugmentConfig(stain_jitter=0.1, seed=1))
    ref = np.asarray(plain[0]["image"])
    assert np.array_equal(
        ref, np.asarray(load_image(root / records[0].path).resize((24, 16), Image.BICUBIC))
    )
    e0 = np.asarray(aug[0]["image"])
    assert np.array_equal(e0, np.asarray(aug[0]["image"]))
    aug.set_epoch(1)
    assert not np.array_equal(e0, np.asarray(aug[0]["image"]))
