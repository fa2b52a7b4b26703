"""Stain normalisation in the pipeline: the image cache (key, pixels, pass-through list), the
reference fitted for a run (training images only, an image file, resume), prediction's check.

The run-level checks (stain_normalizer.json, predict = the run, exports) are in
test_run_stain_explain.py.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from breakhis_ft.config import MedGemmaConfig, TrainRunConfig
from breakhis_ft.data.breakhis import load_image
from breakhis_ft.data.dataset import (
    ImageDataset,
    build_image_cache,
    cache_key,
    preprocess_image,
    resize_longest,
)
from breakhis_ft.data.stain import (
    NORMALIZER_FILE,
    fit_stain_normalizer,
    load_normalizer,
    save_normalizer,
)
from breakhis_ft.deploy.predict import PredictError, run_stain
from breakhis_ft.errors import ConfigError, StainFitError
from breakhis_ft.run.setup import make_stain_normalizer, stain_reference_records

SIZE = 24


@pytest.fixture
def small(tmp_path, replica_scan):
    """A private copy of 12 replica images, the 6th turned into a blank white tile."""
    records = replica_scan.records[::40][:12]
    root = tmp_path / "data"
    for r in records:
        (root / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(replica_scan.root / r.path, root / r.path)
    Image.new("RGB", (48, 32), (255, 255, 255)).save(root / records[5].path)
    return records, root, tmp_path / "cache"


@pytest.fixture(scope="module")
def normalizers(replica_scan):
    """macenko and reinhard fitted to one replica image, and macenko fitted to another."""
    first, other = (load_image(replica_scan.root / r.path) for r in replica_scan.records[1:3])
    return {
        "macenko": fit_stain_normalizer("macenko", [first]),
        "reinhard": fit_stain_normalizer("reinhard", [first]),
        "macenko_other": fit_stain_normalizer("macenko", [other]),
    }


def config(**data) -> DictConfig:
    """The schema's defaults with `data.<key>` values (and resume=None)."""
    cfg = OmegaConf.structured(TrainRunConfig)
    for key, value in data.items():
        cfg.data[key] = value
    return cfg


def test_the_cache_key_changes_with_the_normaliser(normalizers) -> None:
    plain = cache_key(SIZE)
    keys = {name: cache_key(SIZE, n) for name, n in normalizers.items()}
    assert len({plain, *keys.values()}) == 4  # none, two methods, two references: four caches
    again = type(normalizers["macenko"]).from_dict(normalizers["macenko"].to_dict())
    assert cache_key(SIZE, again) == keys["macenko"]  # the same fit: reused
    assert cache_key(SIZE, None) == plain


def test_cache_holds_normalised_images_and_lists_the_blank_one(small, normalizers) -> None:
    records, root, cache_dir = small
    stain = normalizers["macenko"]
    cache = build_image_cache(records, root, SIZE, cache_dir, progress=False, stain=stain)
    passed = dict(cache.passed_through)
    assert records[5].path in passed and "one flat colour" in passed[records[5].path]
    from_root = ImageDataset(records, [0] * len(records), root, image_size=SIZE, stain=stain)
    for i, record in enumerate(records):
        pixels = np.asarray(cache.image(record.path)).ravel()
        original = load_image(root / record.path)
        expected, reason = preprocess_image(original, SIZE, stain)
        assert np.array_equal(pixels, np.asarray(expected).ravel()), record.path
        assert np.array_equal(np.asarray(from_root.load(i)).ravel(), pixels)
        plain = np.asarray(resize_longest(original, SIZE)).ravel()
        # normalised before resizing, or (listed with its reason) passed through unchanged
        assert (reason is not None) == (record.path in passed)
        assert np.array_equal(pixels, plain) == (record.path in passed), record.path
    plain_cache = build_image_cache(records, root, SIZE, cache_dir, progress=False)
    assert plain_cache.passed_through == [] and plain_cache.built == len(records)
    assert len([d for d in (cache_dir / "images").iterdir() if d.suffix != ".lock"]) == 2


def test_train_reference_uses_training_images_round_robin_over_patients(replica_scan, tmp_path):
    by_patient: dict[str, list] = {}
    for r in replica_scan.records:
        by_patient.setdefault(r.patient, []).append(r)
    patients = sorted(by_patient)
    splits = {
        "train": [r for p in patients[:20] for r in by_patient[p]],
        "val": [r for p in patients[20:30] for r in by_patient[p]],
        "test": [r for p in patients[30:] for r in by_patient[p]],
    }
    chosen = stain_reference_records(splits["train"], 30)
    assert len(chosen) == 30 and len({r.patient for r in chosen}) == 20  # every patient, then more
    assert chosen == stain_reference_records(list(reversed(splits["train"])), 30)  # fixed order
    cfg = config(stain_norm="macenko", stain_reference_images=8)
    stain = make_stain_normalizer(cfg, splits, replica_scan.root, tmp_path)
    train = {r.path for r in splits["train"]}
    assert stain.reference and set(stain.reference) <= train  # never a val or test image
    assert len({r.split("/")[-3] for r in stain.reference}) == len(stain.reference)  # 8 patients
    assert load_normalizer(tmp_path) == stain  # stain_normalizer.json in the run folder
    assert make_stain_normalizer(config(), splits, replica_scan.root, tmp_path / "x") is None
    assert not (tmp_path / "x").exists()


def test_reference_image_file_blank_reference_and_resume(replica_scan, tmp_path):
    image = replica_scan.root / replica_scan.records[0].path
    cfg = config(stain_norm="reinhard", stain_reference=str(image))
    stain = make_stain_normalizer(cfg, {}, replica_scan.root, tmp_path)
    assert stain.reference == (str(image.resolve()),)
    blank = tmp_path / "white.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(blank)
    blank_cfg = config(stain_norm="reinhard", stain_reference=str(blank))
    with pytest.raises(StainFitError, match="data.stain_reference=.*white.png.*one flat colour"):
        make_stain_normalizer(blank_cfg, {}, replica_scan.root, tmp_path)
    empty = config(stain_norm="macenko")
    with pytest.raises(StainFitError, match="training split is empty"):
        make_stain_normalizer(empty, {"train": []}, replica_scan.root, tmp_path)
    # resume: the saved normaliser, not a new fit (here it could not even be fitted)
    saved = fit_stain_normalizer("macenko", [load_image(image)])
    save_normalizer(saved, tmp_path)
    empty.resume = str(tmp_path)
    assert make_stain_normalizer(empty, {"train": []}, replica_scan.root, tmp_path) == saved


def test_predict_refuses_a_folder_without_the_runs_normaliser(tmp_path, normalizers):
    assert run_stain(tmp_path, config()) is None  # stain_norm=none needs no file
    with pytest.raises(PredictError, match=f"stain_norm=macenko, but its {NORMALIZER_FILE}"):
        run_stain(tmp_path, config(stain_norm="macenko"))
    save_normalizer(normalizers["reinhard"], tmp_path)
    with pytest.raises(PredictError, match="holds reinhard"):
        run_stain(tmp_path, config(stain_norm="macenko"))
    assert run_stain(tmp_path, config(stain_norm="reinhard")) == normalizers["reinhard"]
    (tmp_path / NORMALIZER_FILE).write_text("{not json")
    with pytest.raises(PredictError, match="not a stain normaliser"):
        run_stain(tmp_path, config(stain_norm="reinhard"))


def test_stain_effect_summary_pairs_seeds() -> None:
    from benchmarks import stain_effect as effect

    def result(value):
        return {"status": "completed", "test": {"balanced_accuracy": value}}

    runs = {
        "none": {1: result(0.40), 2: result(0.50), 3: result(0.45)},
        "macenko": {1: result(0.50), 2: result(0.55), 3: {"status": "failed"}},
    }
    summary = effect.summarise(runs, ["none", "macenko"], [1, 2, 3])
    assert summary["none"]["mean"] == pytest.approx(0.45)
    assert summary["none"]["std"] == pytest.approx(0.05)  # sample std (n - 1)
    assert summary["macenko"]["n"] == 2 and summary["macenko"]["mean"] == pytest.approx(0.525)
    paired = summary["macenko"]["paired_difference_vs_none"]  # seeds 1 and 2 only
    assert paired["mean"] == pytest.approx(0.075) and paired["std"] == pytest.approx(0.0354, 1e-2)
    table = effect.table(summary, [1, 2, 3])
    assert "| macenko | 0.525 +- 0.035 (n=2) | +0.075 +- 0.035 | 0.500 | 0.550 | - |" in table


def test_medgemma_feature_cache_is_kept_apart_per_normaliser(normalizers) -> None:
    from breakhis_ft.models.vision_cache import configure_feature_cache

    cfg = config()
    cfg.model = OmegaConf.structured(MedGemmaConfig(name_or_path="tiny"))
    cfg.data.augment.flips = cfg.data.augment.rot90 = False  # nothing changes pixels: cached
    folders: list[str] = []

    def use_feature_cache(folder, name_or_path, image_size):
        folders.append(folder)
        return SimpleNamespace(directory=folder)

    medgemma = SimpleNamespace(vision_trainable=False, use_feature_cache=use_feature_cache)
    assert configure_feature_cache(medgemma, cfg)
    for normalizer in normalizers.values():
        assert configure_feature_cache(medgemma, cfg, normalizer.identity())
    plain, *stained = folders
    assert plain == cfg.paths.vision_features
    assert len(set(stained)) == 3 and all(f.startswith(plain + "/") for f in stained)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.stain_norm=macenko", "data.stain_reference=/no/such.png"], "stain_reference"),
        (["data.stain_norm=reinhard", "data.stain_reference_images=0"], "stain_reference_images"),
        # a probe embeds the original files
        (["model=tiny_siglip", "peft=none", "model.freeze_encoder=true"], "stain_norm"),
    ],
)
def test_stain_settings_that_cannot_work_name_the_key(overrides, key) -> None:
    from test_entrypoint import compose_train

    from breakhis_ft.validate import validate_config

    stained = any(o.startswith("data.") for o in overrides)
    cfg = compose_train([*overrides] if stained else [*overrides, "data.stain_norm=macenko"])
    with pytest.raises(ConfigError, match=rf"config error: data\.{key}:"):
        validate_config(cfg)
    cfg.data.stain_norm = "none"  # nothing to check without normalisation
    validate_config(cfg)
