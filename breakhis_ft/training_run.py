"""The model half of a run: build the classifier and datasets, train, evaluate, track.

Called by `experiment.run_experiment` after the data is prepared; imports torch and transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from omegaconf import DictConfig

from breakhis_ft.data.breakhis import BreakhisScan
from breakhis_ft.data.dataset import ImageDataset, build_image_cache, labels_for
from breakhis_ft.data.records import ImageRecord, class_names
from breakhis_ft.engine.evaluate import compute_metrics, malignant_flags, write_predictions
from breakhis_ft.engine.predict import predict
from breakhis_ft.engine.trainer import fit, make_accelerator
from breakhis_ft.models.base import Classifier
from breakhis_ft.tracking import RunTracker

log = logging.getLogger(__name__)


def build_classifier(
    cfg: DictConfig, names: tuple[str, ...], seed: int | None = None
) -> Classifier:
    """The configured classifier (MedGemma or SigLIP), building the tiny checkpoint if asked.

    `seed` is set after any tiny checkpoint is built (building draws random weights), so that the
    adapter or head initialisation is the same whether or not the checkpoint was already cached.
    """
    if cfg.model.build_tiny:
        from breakhis_ft.models.tiny import ensure_tiny_gemma3
        from breakhis_ft.models.tiny_siglip import ensure_tiny_siglip

        ensure = ensure_tiny_gemma3 if cfg.model.kind == "medgemma" else ensure_tiny_siglip
        ensure(cfg.model.name_or_path)
    if seed is not None:
        set_seed(seed)
    if cfg.model.kind == "medgemma":
        from breakhis_ft.models.medgemma import build_medgemma_classifier
        from breakhis_ft.models.vision_cache import check_feature_cache, configure_feature_cache

        check_feature_cache(cfg)  # an impossible cache_vision_features=true fails before loading
        classifier = build_medgemma_classifier(cfg.model, cfg.peft, cfg.precision, names)
        configure_feature_cache(classifier, cfg)  # cached soft tokens where valid (`auto`)
        return classifier
    from breakhis_ft.models.siglip import build_siglip_classifier

    return build_siglip_classifier(
        cfg.model,
        cfg.peft,
        cfg.precision,
        names,
        embedding_cache_dir=Path(cfg.data.cache_dir) / "embeddings",
    )


def build_datasets(
    cfg: DictConfig, scan: BreakhisScan, splits: dict[str, list[ImageRecord]], needs_images: bool
) -> dict[str, ImageDataset]:
    """One dataset per non-empty split over one shared image cache; augmentation on train only."""
    used = [r for records in splits.values() for r in records]
    source: Any = scan.root
    if needs_images and used:
        unique = list({r.path: r for r in used}.values())
        source = build_image_cache(
            unique, scan.root, cfg.data.image_size, Path(cfg.data.cache_dir) / "data"
        )
    return {
        split: ImageDataset(
            records,
            labels_for(records, cfg.task.name),
            source,
            augment=cfg.data.augment if split == "train" else None,
            with_images=needs_images,
            image_size=cfg.data.image_size,  # how `load` resizes when decoding from the root
        )
        for split, records in splits.items()
        if records
    }


def _metric_value(metrics: dict[str, dict], path: str) -> float | None:
    """`val/balanced_accuracy` -> metrics["val"]["balanced_accuracy"] (None when absent)."""
    value: Any = metrics
    for key in path.split("/"):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def evaluate_splits(
    classifier: Classifier,
    data: dict[str, ImageDataset],
    accelerator: Any,
    batch_size: int,
    run_dir: Path,
) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Metrics of val and test; writes predictions_<split>.csv on the main process."""
    names = list(classifier.class_names)
    metrics: dict[str, dict] = {}
    predictions: dict[str, tuple] = {}
    for split in ("val", "test"):
        if split not in data:
            continue
        dataset = data[split]
        probs, labels, indices = predict(classifier, dataset, accelerator, batch_size)
        records = [dataset.records[i] for i in indices.tolist()]
        metrics[split] = compute_metrics(
            probs,
            labels,
            names,
            [r.patient for r in records],
            [r.magnification for r in records],
            malignant_flags(names),
        )
        preds = probs.argmax(dim=1)
        predictions[split] = (labels.tolist(), preds.tolist())
        if accelerator.is_main_process:
            rows = [{**r.as_dict(), "label": int(y)} for r, y in zip(records, labels, strict=True)]
            write_predictions(run_dir / f"predictions_{split}.csv", rows, probs, preds, names)
    return metrics, predictions


def train_and_evaluate(
    cfg: DictConfig,
    config: dict,
    run_dir: Path,
    scan: BreakhisScan,
    splits: dict[str, list[ImageRecord]],
    group: str,
    name: str,
) -> float | None:
    """Train (unless train=false), evaluate the best model on val and test; return the metric."""
    names = class_names(cfg.task.name)
    accelerator = make_accelerator(cfg.trainer, cfg.precision, cfg.trainer.grad_accum)
    tracker = RunTracker(
        run_dir, config, cfg.logger, name, group, active=accelerator.is_main_process
    )
    failed = True
    try:
        classifier = build_classifier(cfg, names, seed=cfg.seed)
        trainable, total = classifier.parameter_counts()
        tracker.log({"model/trainable_parameters": trainable, "model/parameters": total}, 0)
        probe = getattr(classifier, "mode", None) == "probe"
        # cached MedGemma vision features: batches carry soft tokens, not images
        cached = getattr(classifier, "feature_store", None) is not None
        data = build_datasets(cfg, scan, splits, needs_images=not probe and not cached)
        if cached:  # computed once per image (main process first), reused by every epoch and run
            classifier.to(accelerator.device)
            with accelerator.main_process_first():
                classifier.prepare_vision_features(list(data.values()), scan.root)
        if (
            probe
        ):  # embeddings computed once per image and cached on disk, then only the head trains
            classifier.to(accelerator.device)
            with accelerator.main_process_first():
                classifier.prepare_embeddings(
                    [r.path for s in splits.values() for r in s], scan.root
                )
        best_value = None
        if cfg.train:
            result = fit(
                classifier,
                data["train"],
                data.get("val"),
                cfg.trainer,
                run_dir,
                accelerator,
                log_fn=tracker.log,
                resume=cfg.resume is not None,
                seed=cfg.seed,
            )
            best_value = result.best_value
            if result.best_dir is not None:
                classifier.load_trained(result.best_dir)
        elif cfg.resume is not None and (Path(cfg.resume) / "best").is_dir():
            classifier.load_trained(Path(cfg.resume) / "best")
        value = best_value if cfg.optimized_metric == cfg.trainer.monitor else None
        if cfg.test:
            metrics, predictions = evaluate_splits(
                classifier, data, accelerator, cfg.trainer.eval_batch_size, run_dir
            )
            tracker.log_final(metrics, predictions)
            tracker.log_plots()
            value = _metric_value(metrics, cfg.optimized_metric)
        failed = False
        return value
    finally:
        tracker.finish(failed=failed)
        accelerator.wait_for_everyone()  # gloo ranks may abort at exit without it
        accelerator.end_training()
        if accelerator.num_processes == 1:
            # a multirun's next job builds a fresh Accelerator in this same process
            AcceleratorState._reset_state(reset_partial_state=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
