"""Run setup: the composed config turned into the objects a run needs, once.

Precision (dtype and accelerate's mode), the Accelerator, the Classifier (through the model
group's builder), the datasets and the optimizer factory are built here and handed down; the
engine and the models never re-read the config to decide these again.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from breakhis_ft.config import EvaluateConfig, Fusion
from breakhis_ft.data.breakhis import BreakhisScan
from breakhis_ft.data.dataset import ImageDataset, build_image_cache, labels_for
from breakhis_ft.data.records import ImageRecord, Task
from breakhis_ft.engine.recipe import MetricsFn, OptimizerFactory
from breakhis_ft.evaluate.final import dataset_final_metrics
from breakhis_ft.evaluate.metrics import dataset_metrics
from breakhis_ft.models.base import Classifier
from breakhis_ft.models.factory import build_classifier
from breakhis_ft.models.precision import Precision, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """Everything a run trains and evaluates with, built from the config."""

    precision: Precision
    accelerator: Accelerator
    optimizer_factory: OptimizerFactory
    metrics_fn: MetricsFn  # every validation during training: cheap
    class_names: tuple[str, ...]
    final_metrics_fn: MetricsFn  # the final evaluation: + intervals, calibration, patient level
    evaluate: EvaluateConfig  # the final evaluation's statistics settings


def evaluate_settings(cfg: DictConfig) -> EvaluateConfig:
    """The `evaluate` group as its schema dataclass (the fusion method as its Enum)."""
    values = OmegaConf.to_container(cfg.evaluate, resolve=True)
    settings = EvaluateConfig(**values)  # type: ignore[arg-type]
    settings.patient_fusion = Fusion(settings.patient_fusion)
    return settings


def make_run_setup(cfg: DictConfig) -> RunSetup:
    """Precision, Accelerator, optimizer factory and metrics of the run (no model yet)."""
    on_gpu = torch.cuda.is_available() and not cfg.trainer.cpu
    precision = resolve_precision(cfg.precision.name, on_gpu)
    accelerator = Accelerator(
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        cpu=cfg.trainer.cpu,
    )
    names = tuple(cfg.task.classes)
    settings = evaluate_settings(cfg)
    return RunSetup(
        precision=precision,
        accelerator=accelerator,
        optimizer_factory=instantiate(cfg.trainer.optimizer),
        metrics_fn=functools.partial(dataset_metrics, class_names=names),
        class_names=names,
        final_metrics_fn=functools.partial(
            dataset_final_metrics, class_names=names, settings=settings
        ),
        evaluate=settings,
    )


def make_classifier(cfg: DictConfig, setup: RunSetup) -> Classifier:
    """The configured classifier, with MedGemma's vision feature cache where valid."""
    medgemma = cfg.model.kind == "medgemma"
    if medgemma:
        from breakhis_ft.models.vision_cache import check_feature_cache

        check_feature_cache(cfg)  # an impossible cache_vision_features=true fails before loading
    classifier = build_classifier(
        cfg.model, cfg.peft, setup.precision, setup.class_names, cfg.paths, seed=cfg.seed
    )
    if medgemma:
        from breakhis_ft.models.vision_cache import configure_feature_cache

        configure_feature_cache(classifier, cfg)  # cached soft tokens where valid (`auto`)
    return classifier


def make_datasets(
    cfg: DictConfig,
    scan: BreakhisScan,
    splits: dict[str, list[ImageRecord]],
    needs_images: bool,
) -> dict[str, ImageDataset]:
    """One dataset per non-empty split over one shared image cache; augmentation on train only."""
    used = [r for records in splits.values() for r in records]
    source: Any = scan.root
    if needs_images and used:
        unique = list({r.path: r for r in used}.values())
        source = build_image_cache(unique, scan.root, cfg.data.image_size, cfg.paths.images)
    task = Task.from_config(cfg.task)
    return {
        split: ImageDataset(
            records,
            labels_for(records, task),
            source,
            augment=cfg.data.augment if split == "train" else None,
            with_images=needs_images,
            image_size=cfg.data.image_size,  # how `load` resizes when decoding from the root
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
