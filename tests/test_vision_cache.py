"""Cached MedGemma vision features: exactness, reuse without the tower, invalidation, config."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from helpers.medgemma_toy import class_image, classifier, tiny_path
from omegaconf import OmegaConf
from test_entrypoint import compose_train

from breakhis_ft.config import MedGemmaConfig, TrainRunConfig
from breakhis_ft.data.dataset import ImageDataset
from breakhis_ft.data.records import ImageRecord
from breakhis_ft.errors import ConfigError, FeatureCacheError
from breakhis_ft.models.vision_cache import configure_feature_cache
from breakhis_ft.validate import validate_config

N_IMAGES = 6
NO_AUGMENT = {"flips": False, "rot90": False, "stain_jitter": 0.0}
CLEAN = [f"data.augment.{k}={v}" for k, v in NO_AUGMENT.items()]  # as overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_path(tmp_path_factory)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """N_IMAGES PNG files, class i % 4, as a data root."""
    import numpy as np

    root = tmp_path_factory.mktemp("vision_cache_images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        class_image(i % 4, rng, size=40).save(root / f"img{i}.png")
    return root


def dataset(root, with_images: bool, image_size: int | None = 32) -> ImageDataset:
    """An ImageDataset decoding the PNGs under `root` (resized to `image_size`)."""
    records = [
        ImageRecord(f"img{i}.png", "benign", "adenosis", "p1", "1", 40, i) for i in range(N_IMAGES)
    ]
    labels = [i % 4 for i in range(N_IMAGES)]
    return ImageDataset(records, labels, root, with_images=with_images, image_size=image_size)


def run_cfg(cache_dir, tiny, **overrides):
    """A composed-like run config (the schema's defaults) for the tiny model."""
    cfg = OmegaConf.structured(TrainRunConfig)
    cfg.model = OmegaConf.structured(MedGemmaConfig(name_or_path=str(tiny)))
    cfg.paths.vision_features, cfg.data.image_size = str(cache_dir), 32
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def count_vision_calls(clf) -> list[int]:
    """A counter incremented by every forward of the vision tower."""
    calls = [0]
    tower = clf.core.model.vision_tower
    tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def lora_grads(clf) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in clf.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("style", ["numbered", "letters"])  # first-token and sequence scoring
def test_cached_features_reproduce_loss_probabilities_and_lora_gradients(
    tiny, image_root, tmp_path, style
):
    plain, cached = classifier(tiny, style=style), classifier(tiny, style=style)
    cfg = run_cfg(tmp_path, tiny, **{f"data.augment.{k}": v for k, v in NO_AUGMENT.items()})
    assert configure_feature_cache(cached, cfg)
    images, no_images = dataset(image_root, True), dataset(image_root, False)
    assert cached.prepare_cached_inputs([no_images], image_root) == N_IMAGES
    with_img = [images[i] for i in range(N_IMAGES)]
    without = [no_images[i] for i in range(N_IMAGES)]
    assert "image" not in without[0]

    a, b = plain.collate(with_img, train=True), cached.collate(without, train=True)
    assert "pixel_values" not in b and b["image_features"].shape == (N_IMAGES, 16, 64)
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(a[key], b[key]), key
    loss_a, loss_b = plain.loss(a), cached.loss(b)
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    grads_a, grads_b = lora_grads(plain), lora_grads(cached)
    assert grads_a.keys() == grads_b.keys() and any(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name

    probs_a = plain.predict_proba(plain.collate(with_img, train=False))
    probs_b = cached.predict_proba(cached.collate(without, train=False))
    assert torch.allclose(probs_a, probs_b, atol=1e-6)


def test_a_second_run_never_calls_the_vision_tower(tiny, image_root, tmp_path):
    cfg = run_cfg(tmp_path, tiny, **{f"data.augment.{k}": v for k, v in NO_AUGMENT.items()})
    first = classifier(tiny)
    first_calls = count_vision_calls(first)
    configure_feature_cache(first, cfg)
    assert first.prepare_cached_inputs([dataset(image_root, False)], image_root) == N_IMAGES
    assert first_calls[0] > 0

    second = classifier(tiny)  # a new run: a fresh model, the same cache folder
    calls = count_vision_calls(second)
    configure_feature_cache(second, cfg)
    ds = dataset(image_root, False)
    assert second.prepare_cached_inputs([ds], image_root) == 0
    items = [ds[i] for i in range(N_IMAGES)]
    second.loss(second.collate(items, train=True)).backward()
    second.predict_proba(second.collate(items, train=False))
    assert calls[0] == 0
    assert second.feature_store.directory == first.feature_store.directory


def test_preprocessing_or_file_changes_invalidate(tiny, image_root, tmp_path):
    cfg = run_cfg(tmp_path, tiny, **{f"data.augment.{k}": v for k, v in NO_AUGMENT.items()})
    clf = classifier(tiny)
    configure_feature_cache(clf, cfg)
    base = clf.feature_store.directory
    assert clf.prepare_cached_inputs([dataset(image_root, False)], image_root) == N_IMAGES

    cfg.data.image_size = 24  # dataset resizing changed: another folder, all recomputed
    configure_feature_cache(clf, cfg)
    assert clf.feature_store.directory != base
    ds = dataset(image_root, False, image_size=24)
    assert clf.prepare_cached_inputs([ds], image_root) == N_IMAGES

    cfg.data.image_size = 32
    clf.processor.image_processor.image_mean = [0.4, 0.5, 0.5]  # processor setting changed
    configure_feature_cache(clf, cfg)
    assert clf.feature_store.directory not in (base,)
    clf.processor.image_processor.image_mean = [0.5, 0.5, 0.5]
    configure_feature_cache(clf, cfg)
    assert clf.feature_store.directory == base

    # an edited image file: only it is recomputed, and the new features are the ones served
    target = image_root / "img0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert clf.prepare_cached_inputs([dataset(image_root, False)], image_root) == 1
    finally:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ([], r"flips, rot90.*data.augment.flips=false"),  # the schema's default augmentation
        (
            [
                "data.augment.flips=false",
                "data.augment.rot90=false",
                "data.augment.stain_jitter=0.1",
            ],
            r"stain_jitter=0.1.*model.cache_vision_features=false",
        ),
        ([*CLEAN, "peft.target_modules=all-linear"], r"all-linear.*vision tower.*=language"),
        ([*CLEAN, "peft=none", "model.freeze_vision=false"], "freeze_vision=false"),
    ],
)
def test_true_where_the_config_shows_it_invalid_fails_at_compose_time(overrides, why):
    cfg = compose_train(["model.cache_vision_features=true", *overrides])
    with pytest.raises(ConfigError, match=rf"config error: model.cache_vision_features: .*{why}"):
        validate_config(cfg)  # before any data or model loads


def test_true_where_only_the_built_adapter_shows_it_fails_at_setup(tiny, tmp_path):
    targets = ["fc1", "q_proj"]  # fc1 is only in the vision tower: its features would change
    composed = compose_train(
        ["model.cache_vision_features=true", *CLEAN, f"peft.target_modules=[{','.join(targets)}]"]
    )
    validate_config(composed)  # the config alone cannot tell
    clf = classifier(tiny, target_modules=targets)
    assert clf.vision_trainable
    cfg = run_cfg(tmp_path, tiny, **{f"data.augment.{k}": v for k, v in NO_AUGMENT.items()})
    cfg.model.cache_vision_features, cfg.peft.target_modules = True, targets
    with pytest.raises(FeatureCacheError, match=r"\['fc1', 'q_proj'\].*vision tower"):
        configure_feature_cache(clf, cfg)
    assert clf.feature_store is None


def test_auto_falls_back_and_says_why(tiny, tmp_path, caplog):
    clf = classifier(tiny)
    cfg = run_cfg(tmp_path, tiny)  # default augmentation: flips and 90-degree rotations
    with caplog.at_level(logging.INFO, logger="breakhis_ft.models.vision_cache"):
        assert not configure_feature_cache(clf, cfg)
    assert clf.feature_store is None
    assert "not cached" in caplog.text and "flips, rot90" in caplog.text
    cfg = run_cfg(tmp_path, tiny, **{f"data.augment.{k}": v for k, v in NO_AUGMENT.items()})
    cfg.model.cache_vision_features = "false"
    assert not configure_feature_cache(clf, cfg) and clf.feature_store is None
    all_linear = classifier(tiny, target_modules="all-linear")
    cfg.model.cache_vision_features = "auto"
    assert not configure_feature_cache(all_linear, cfg)
    with pytest.raises(ValueError, match="with_images=True"):
        clf.collate([{"label": 0, "index": 0, "path": "img0.png"}], train=True)
