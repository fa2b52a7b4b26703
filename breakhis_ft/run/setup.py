"""Run setup: each part of a run built from the composed config, once, by `TrainingRun`.

Precision (checked against the device), the Accelerator, the recipe's settings, the stain
normaliser, the Classifier (through the model group's builder) and the datasets are built here and
handed down; the engine and the models never re-read the config to decide these again.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from breakhis_ft.config import EvaluateConfig, Fusion
from breakhis_ft.data.breakhis import BreakhisScan, load_image
from breakhis_ft.data.dataset import ImageCache, ImageDataset, build_image_cache, labels_for
from breakhis_ft.data.records import ImageRecord, Task
from breakhis_ft.data.stain import (
    STAIN_FALLBACKS,
    StainNormalizer,
    fit_stain_normalizer,
    load_normalizer,
    reference_records,
    save_normalizer,
)
from breakhis_ft.engine.recipe import LogFn, RecipeSettings
from breakhis_ft.errors import DeviceError, StainFitError
from breakhis_ft.evaluate.metrics import dataset_metrics
from breakhis_ft.models.base import Classifier
from breakhis_ft.models.factory import build_classifier
from breakhis_ft.models.precision import Precision
from breakhis_ft.third_party import enable_bitsandbytes

log = logging.getLogger(__name__)


def run_precision(cfg: DictConfig) -> Precision:
    """`precision.name` on the device the run uses; refuses bf16 on a GPU without it."""
    on_gpu = torch.cuda.is_available() and not cfg.trainer.cpu
    name = str(cfg.precision.name)
    if name == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            "precision=bf16: this GPU has no bfloat16 support; use precision=fp32 "
            "(fp16 overflows to NaN on Gemma 3), or a GPU with bf16 (Ampere or newer)"
        )
    return Precision.of(name)


def make_accelerator(cfg: DictConfig, precision: Precision) -> Accelerator:
    """The run's Accelerator: the precision's mixed-precision mode, gradient accumulation."""
    return Accelerator(
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        cpu=cfg.trainer.cpu,
    )


def evaluate_settings(cfg: DictConfig) -> EvaluateConfig:
    """The `evaluate` group as its schema dataclass (the fusion method as its Enum)."""
    values = OmegaConf.to_container(cfg.evaluate, resolve=True)
    settings = EvaluateConfig(**values)  # type: ignore[arg-type]
    settings.patient_fusion = Fusion(settings.patient_fusion)
    return settings


def recipe_settings(cfg: DictConfig, run_dir: Path, log_fn: LogFn | None = None) -> RecipeSettings:
    """What the training recipe trains by: the trainer group, the optimizer (trainer.optimizer
    instantiated), the cheap metrics of each validation, the tracker's log and the seed."""
    if str(cfg.trainer.optimizer.get("_target_", "")).startswith("bitsandbytes."):
        enable_bitsandbytes()  # an 8-bit optimizer (held back until used: third_party.py)
    return RecipeSettings(
        trainer=cfg.trainer,
        run_dir=Path(run_dir),
        optimizer_factory=instantiate(cfg.trainer.optimizer),
        metrics_fn=functools.partial(dataset_metrics, class_names=tuple(cfg.task.classes)),
        log_fn=log_fn,
        seed=cfg.seed,
    )


def make_classifier(
    cfg: DictConfig, precision: Precision, stain: StainNormalizer | None = None
) -> Classifier:
    """The configured classifier, with the caches its family keeps between runs (MedGemma's
    vision features, those of stain-normalised images apart)."""
    classifier = build_classifier(
        cfg.model, cfg.peft, precision, tuple(cfg.task.classes), cfg.paths, seed=cfg.seed
    )
    classifier.configure_run_caches(cfg, None if stain is None else stain.identity())
    return classifier


def stain_reference_records(train: Sequence[ImageRecord], n: int) -> list[ImageRecord]:
    """Up to `n` training images for a stain reference (`stain.reference_records`): round robin
    over the patients, in a fixed order independent of the run's seed."""
    return reference_records(train, n)


def make_stain_normalizer(
    cfg: DictConfig,
    splits: dict[str, list[ImageRecord]],
    root: str | Path,
    run_dir: Path,
    main_process: bool = True,
) -> StainNormalizer | None:
    """The run's stain normaliser (data.stain_norm; None for none), fitted to data.stain_reference
    and saved as stain_normalizer.json in the run folder; a resumed run reuses its saved one."""
    method = str(cfg.data.stain_norm)
    if method == "none":
        return None
    saved = load_normalizer(run_dir) if cfg.resume is not None else None
    if saved is not None and saved.method == method:
        return saved
    reference = str(cfg.data.stain_reference)
    if reference == "train":  # training images only: val or test colour must not leak in
        records = stain_reference_records(splits.get("train", []), cfg.data.stain_reference_images)
        if not records:
            raise StainFitError(
                "data.stain_reference=train: the training split is empty; give a reference image "
                "file instead"
            )
        names = [r.path for r in records]
        images = [load_image(Path(root) / name) for name in names]
    else:
        path = Path(reference).expanduser().resolve()
        names, images = [str(path)], [load_image(path)]
    try:
        normalizer = fit_stain_normalizer(method, images, names)
    except ValueError as err:
        raise StainFitError(f"data.stain_reference={reference}: {err}") from err
    log.info(
        "stain normalisation %s (%s), reference: %d image(s) of %s",
        method,
        normalizer.identity(),
        len(normalizer.reference),
        reference,
    )
    if main_process:
        save_normalizer(normalizer, run_dir)
    return normalizer


def _record_stain(cache: ImageCache, stain: StainNormalizer, run_dir: Path | None) -> None:
    """Log the images the normaliser kept as they were (no stain to estimate, or a failed check);
    count them in data_stats.json and list them all in stain_fallbacks.csv."""
    passed = cache.passed_through
    checks = sum(reason.startswith("stain check:") for _, reason in passed)
    if passed:
        log.warning(
            "stain normalisation kept %d of %d image(s) as they were (%d failed a check, %d had no "
            "stain to estimate; listed in stain_fallbacks.csv), e.g. %s: %s",
            len(passed),
            len(cache),
            checks,
            len(passed) - checks,
            *passed[0],
        )
    stats_file = None if run_dir is None else run_dir / "data_stats.json"
    if stats_file is None or not stats_file.is_file():
        return
    if passed:
        with open(run_dir / STAIN_FALLBACKS, "w", newline="") as f:
            f.write(f"# {len(passed)} image(s) kept as they were by {stain.method} (reason)\n")
            rows = csv.writer(f)
            rows.writerow(["path", "reason"])
            rows.writerows(passed)
    stats = json.loads(stats_file.read_text())
    stats["stain_normalization"] = {
        "method": stain.method,
        "identity": stain.identity(),
        "reference_images": len(stain.reference),
        "passed_through": len(passed),  # kept as they were, for either reason
        "failed_check": checks,
        "no_stain": len(passed) - checks,
        "fallbacks_file": STAIN_FALLBACKS if passed else None,
        "passed_through_files": [{"path": p, "reason": r} for p, r in passed[:100]],
    }
    stats_file.write_text(json.dumps(stats, indent=2, default=str))


def make_datasets(
    cfg: DictConfig,
    scan: BreakhisScan,
    splits: dict[str, list[ImageRecord]],
    needs_images: bool,
    stain: StainNormalizer | None = None,
    run_dir: Path | None = None,
    model_side: int | None = None,
) -> dict[str, ImageDataset]:
    """One dataset per non-empty split over one shared image cache; augmentation on train only.

    `stain`: the cache holds normalised images; `run_dir`: the main process's run folder, whose
    data_stats.json then counts the images the normaliser passed through; `model_side`: the
    square the model reads (`Classifier.input_side`), which caps the cached size.
    """
    used = [r for records in splits.values() for r in records]
    source: Any = scan.root
    size = cfg.data.image_size
    if needs_images and used:
        unique = list({r.path: r for r in used}.values())
        source = build_image_cache(
            unique, scan.root, size, cfg.paths.images, stain=stain, model_side=model_side
        )
        log.info(
            "image cache %s: %d images, %.1f MB (longest side <= %d px%s); %d built now",
            source.directory,
            len(source),
            source.megabytes(),
            size,
            f", shorter side >= the model's {model_side} px" if model_side else "",
            source.built,
        )
        if stain is not None:
            _record_stain(source, stain, run_dir)
    task = Task.from_config(cfg.task)
    return {
        split: ImageDataset(
            records,
            labels_for(records, task),
            source,
            augment=cfg.data.augment if split == "train" else None,
            with_images=needs_images,
            image_size=size,  # how `load` resizes when decoding from the root
            stain=stain,
            model_side=model_side,
        )
        for split, records in splits.items()
        if records
    }


def prepare_cached_inputs(
    classifier: Classifier, datasets: dict[str, ImageDataset], root: str | Path, acc: Accelerator
) -> None:
    """Features or embeddings computed once per image (main process first), reused by all."""
    if classifier.needs_images:
        return
    classifier.to(acc.device)
    with acc.main_process_first():
        computed = classifier.prepare_cached_inputs(list(datasets.values()), root)
    log.info("cached inputs: %d computed, the rest reused", computed)
