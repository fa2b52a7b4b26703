"""breakhis-ft's side of the peer benchmark: the project's own setup and engine, as a user runs it.

A config is composed from `conf/` (Hydra, validated) with overrides, then `run/setup.py` builds the
classifier and datasets, `TrainingRecipe` trains and `engine.predict` scores every class's answer.
`STEPS` walks from the blog notebook's settings to the project's defaults one change at a time, so
the speedup splits into the part each change accounts for.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState, GradientState
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from breakhis_ft.config import register_configs
from breakhis_ft.data.breakhis import BreakhisScan
from breakhis_ft.data.dataset import ImageDataset, labels_for
from breakhis_ft.data.records import ImageRecord
from breakhis_ft.engine.predict import predict
from breakhis_ft.engine.recipe import TrainingRecipe
from breakhis_ft.run.setup import (
    make_accelerator,
    make_classifier,
    make_datasets,
    recipe_settings,
    run_precision,
)
from breakhis_ft.validate import validate_config

# The notebook's choices where the project's defaults differ (blog_medgemma_100x has most of them)
NOTEBOOK_SETTINGS = {
    "peft.target_modules": "all-linear",
    "model.loss_on": "all_text",
    "model.cache_vision_features": "false",
    "trainer.batch_size": "1",
    "trainer.grad_accum": "8",
    "trainer.gradient_checkpointing": "true",
    "trainer/optimizer": "paged_adamw_8bit",
}
DEFAULTS = {  # the project's defaults, spelled out
    "peft.target_modules": "language_model",
    "model.loss_on": "answer",
    "model.cache_vision_features": "auto",
    "trainer.batch_size": "8",
    "trainer.grad_accum": "1",
    "trainer.gradient_checkpointing": "false",
    "trainer/optimizer": "adamw",
}
# (name, what changes on top of the step before, image cache): from the notebook's settings on the
# project's engine to its default path, one change at a time
STEPS: list[tuple[str, dict[str, str], bool]] = [
    ("engine, notebook settings", {}, False),
    ("+ image cache", {}, True),
    ("+ LoRA on the language model only", {"peft.target_modules": "language_model"}, True),
    ("+ vision feature cache", {"model.cache_vision_features": "auto"}, True),
    ("+ answer-only loss", {"model.loss_on": "answer"}, True),
    (
        "+ batch 8 x 1 (checkpointing kept)",
        {"trainer.batch_size": "8", "trainer.grad_accum": "1"},
        True,
    ),
    (
        "+ no checkpointing, AdamW (= default)",
        {k: DEFAULTS[k] for k in ("trainer.gradient_checkpointing", "trainer/optimizer")},
        True,
    ),
]


def step_settings() -> list[tuple[str, dict[str, str], bool]]:
    """The cumulative settings of every step of STEPS."""
    settings, out = dict(NOTEBOOK_SETTINGS), []
    for name, change, image_cache in STEPS:
        settings = {**settings, **change}
        out.append((name, dict(settings), image_cache))
    if settings != DEFAULTS:
        raise RuntimeError(f"STEPS do not end at the defaults: {settings} != {DEFAULTS}")
    return out


def base_settings(checkpoint: Path, cache_dir: Path, epochs: int, image_size: int) -> dict:
    """What both paths share: model, LoRA r/alpha/dropout, lr schedule, epochs, no augmentation."""
    return {
        "model.name_or_path": str(checkpoint),
        "model.build_tiny": "false",
        "precision": "fp32" if not torch.cuda.is_available() else "bf16",
        "logger": "none",
        "peft.r": "8",
        "peft.alpha": "16",
        "peft.dropout": "0.1",
        "trainer.lr": "5e-4",
        "trainer.scheduler": "cosine",
        "trainer.warmup_ratio": "0.03",
        "trainer.max_grad_norm": "0.3",
        "trainer.epochs": str(epochs),
        "trainer.eval_batch_size": "16",
        "trainer.checkpoint_every_steps": "1000000",  # only the final checkpoint
        "data.augment.flips": "false",  # the notebook does not augment: the same work
        "data.augment.rot90": "false",
        "data.image_size": str(image_size),
        "paths.cache_dir": str(cache_dir),
    }


# MedGemma 4B (bf16, no augmentation): the three recipes' settings for the VRAM estimator
MEDGEMMA = {
    "model": "medgemma_4b_it",
    "data.augment.flips": "false",
    "data.augment.rot90": "false",
    "peft.r": "8",
    "peft.alpha": "16",
    "peft.dropout": "0.1",
}
GOOGLE_SETTINGS = {
    "peft": "qlora",
    "peft.r": "16",
    "peft.dropout": "0.05",
    "peft.target_modules": "all-linear",
    "peft.modules_to_save": "[lm_head,embed_tokens]",
    "model.loss_on": "all_text",
    "model.prompt.style": "letters",
    "model.attn_implementation": "eager",
    "model.cache_vision_features": "false",
    "trainer.batch_size": "4",
    "trainer.grad_accum": "4",
    "trainer.gradient_checkpointing": "true",
}


def medgemma_vram() -> dict[str, float]:
    """GiB estimated by breakhis_ft.vram for MedGemma 4B under each recipe's settings."""
    from breakhis_ft.vram import estimate_vram  # noqa: PLC0415

    cases = {
        "notebook": (NOTEBOOK_SETTINGS, "adamw_8bit"),
        "breakhis-ft": (DEFAULTS, "adamw"),
        "breakhis-ft + gradient checkpointing": (
            {**DEFAULTS, "trainer.gradient_checkpointing": "true"},
            "adamw",
        ),
        "google": (GOOGLE_SETTINGS, "adamw"),
    }
    out = {}
    for name, (settings, optimizer) in cases.items():
        overrides = {**MEDGEMMA, **settings}
        overrides.pop("trainer/optimizer", None)  # the estimator takes the optimizer itself
        estimate = estimate_vram(compose_config(overrides), device="cuda", optimizer=optimizer)
        out[name] = estimate.as_dict()["total_bytes"] / 2**30
    return out


def compose_config(settings: dict[str, str]) -> DictConfig:
    """conf/train.yaml composed with `key=value` overrides and validated, as the entrypoint does."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("breakhis_ft.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"{k}={v}" for k, v in settings.items()])
    validate_config(cfg)
    return cfg


def reset_accelerate() -> None:
    """Forget the previous run's Accelerator (its state is a process-wide singleton)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class TimedRecipe(TrainingRecipe):
    """The project's TrainingRecipe, timing each epoch; `after_epoch(epoch)`, when set, runs
    after each epoch's clock stops (the benchmark's own evaluation, not counted as training)."""

    epoch_seconds: list[float]
    after_epoch: Callable[[int], None] | None = None

    def train_epoch(self) -> None:
        """One epoch of the recipe, timed."""
        start = time.perf_counter()
        super().train_epoch()
        self.epoch_seconds = [*getattr(self, "epoch_seconds", []), time.perf_counter() - start]
        if self.after_epoch is not None:
            self.after_epoch(len(self.epoch_seconds))


def _datasets(cfg, scan: BreakhisScan, splits: dict, needs_images: bool, image_cache: bool):
    if image_cache:
        return make_datasets(cfg, scan, splits, needs_images)
    return {  # PNG decoded (and resized) on every access, as the notebook does
        name: ImageDataset(
            recs,
            labels_for(recs, "subtype8"),
            scan.root,
            with_images=needs_images,
            image_size=cfg.data.image_size,
        )
        for name, recs in splits.items()
    }


def train_project(
    settings: dict[str, str],
    scan: BreakhisScan,
    splits: dict[str, list[ImageRecord]],
    run_dir: Path,
    image_cache: bool,
    after_epoch: Callable[[dict[str, Any], int], None] | None = None,
) -> dict[str, Any]:
    """Build, cache and train as `breakhis-ft` does (fresh feature cache); returns the pieces
    and the seconds of each stage. `after_epoch(run, epoch)`: called after each epoch with the
    pieces built so far, outside the epoch's clock."""
    reset_accelerate()
    cfg = compose_config(settings)
    shutil.rmtree(Path(cfg.paths.vision_features), ignore_errors=True)  # one-off cost measured
    shutil.rmtree(run_dir, ignore_errors=True)
    times: dict[str, float] = {}
    start = time.perf_counter()
    precision = run_precision(cfg)
    accelerator = make_accelerator(cfg, precision)
    classifier = make_classifier(cfg, precision)
    times["model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    data = _datasets(cfg, scan, splits, classifier.needs_images, image_cache)
    times["image_cache_s"] = time.perf_counter() - start
    start = time.perf_counter()
    classifier.prepare_cached_inputs([data["train"]], scan.root)
    times["train_features_s"] = time.perf_counter() - start
    recipe = TimedRecipe(
        classifier, data["train"], None, accelerator, recipe_settings(cfg, run_dir)
    )
    run = {
        "classifier": classifier,
        "data": data,
        "accelerator": accelerator,
        "cfg": cfg,
        "times": times,
    }
    run["recipe"] = recipe
    if after_epoch is not None:
        recipe.after_epoch = lambda epoch: after_epoch(run, epoch)
    start = time.perf_counter()
    recipe.fit()
    times["fit_s"] = time.perf_counter() - start
    times["epoch_s"] = recipe.epoch_seconds
    return run


def test_features_seconds(run: dict[str, Any], root: Path) -> float:
    """Compute the test images' soft tokens (the one-off part of evaluation); 0 without cache."""
    start = time.perf_counter()
    run["classifier"].prepare_cached_inputs([run["data"]["test"]], root)
    return time.perf_counter() - start


def evaluate_project(run: dict[str, Any]) -> tuple[list[int], float]:
    """Label scoring of the test split through the engine: (predicted classes, seconds)."""
    start = time.perf_counter()
    probs, _, _ = predict(
        run["classifier"],
        run["data"]["test"],
        run["accelerator"],
        run["cfg"].trainer.eval_batch_size,
    )
    return probs.argmax(dim=1).tolist(), time.perf_counter() - start
