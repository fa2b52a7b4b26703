"""The model half of a run: set up from the config, train with the recipe, evaluate, track.

Called by `experiment.run_experiment` after the data is prepared; imports torch and transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from omegaconf import DictConfig

from breakhis_ft.data.breakhis import BreakhisScan
from breakhis_ft.data.dataset import ImageDataset
from breakhis_ft.data.records import ImageRecord
from breakhis_ft.engine.predict import predict
from breakhis_ft.engine.recipe import TrainingRecipe
from breakhis_ft.evaluate.final import summary_scalars
from breakhis_ft.evaluate.metrics import write_predictions
from breakhis_ft.models.base import Classifier
from breakhis_ft.run.calibrate import calibrate_run
from breakhis_ft.run.setup import (
    RunSetup,
    make_classifier,
    make_datasets,
    make_run_setup,
    make_stain_normalizer,
    prepare_cached_inputs,
)
from breakhis_ft.run.tracking import RunTracker

log = logging.getLogger(__name__)


def metric_value(metrics: dict[str, dict], path: str) -> float | None:
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
    setup: RunSetup,
    batch_size: int,
    run_dir: Path,
    recipe: TrainingRecipe | None = None,
) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Final metrics of val and test (with intervals, calibration, patient level); writes
    predictions_<split>.csv on the main process."""
    acc, names = setup.accelerator, list(setup.class_names)
    metrics: dict[str, dict] = {}
    predictions: dict[str, tuple] = {}
    for split in ("val", "test"):
        if split not in data:
            continue
        dataset = data[split]
        if recipe is not None:  # through the wrapper training prepared (DDP/FSDP)
            probs, labels, indices = recipe.predict(dataset, batch_size)
        else:
            probs, labels, indices = predict(classifier, dataset, acc, batch_size)
        metrics[split] = setup.final_metrics_fn(probs, labels, indices, dataset)
        preds = probs.argmax(dim=1)
        predictions[split] = (labels.tolist(), preds.tolist())
        if acc.is_main_process:
            records = [dataset.records[i] for i in indices.tolist()]
            rows = [{**r.as_dict(), "label": int(y)} for r, y in zip(records, labels, strict=True)]
            write_predictions(run_dir / f"predictions_{split}.csv", rows, probs, preds, names)
    return metrics, predictions


def _final_statistics(
    metrics: dict[str, dict], run_dir: Path, setup: RunSetup, tracker: RunTracker
) -> None:
    """Temperature scaling and reliability diagrams (main process), and the statistics summary
    (intervals, calibration, patient level) for the dashboard."""
    if not setup.accelerator.is_main_process:
        return
    calibrate_run(metrics, run_dir, setup.evaluate)
    tracker.log_summary(summary_scalars(metrics))


def _train(
    cfg: DictConfig, setup: RunSetup, classifier: Classifier, data: dict, run_dir: Path, log_fn
) -> tuple[TrainingRecipe, float | None]:
    """Fit with the recipe; the best model is loaded back into the classifier."""
    recipe = TrainingRecipe(
        classifier,
        data["train"],
        data.get("val"),
        cfg.trainer,
        run_dir,
        setup.accelerator,
        optimizer_factory=setup.optimizer_factory,
        metrics_fn=setup.metrics_fn,
        log_fn=log_fn,
        seed=cfg.seed,
    )
    result = recipe.fit(resume=cfg.resume is not None)
    if result.best_dir is not None:
        classifier.load_trained(result.best_dir)
    return recipe, result.best_value


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
    setup = make_run_setup(cfg)
    acc = setup.accelerator
    tracker = RunTracker(run_dir, config, cfg.logger, name, group, active=acc.is_main_process)
    failed = True
    try:
        main = acc.is_main_process
        setup.stain = make_stain_normalizer(cfg, splits, scan.root, run_dir, main)
        classifier = make_classifier(cfg, setup)
        trainable, total = classifier.parameter_counts()
        tracker.log({"model/trainable_parameters": trainable, "model/parameters": total}, 0)
        data = make_datasets(
            cfg, scan, splits, classifier.needs_images, setup.stain, run_dir if main else None
        )
        prepare_cached_inputs(classifier, data, scan.root, acc)
        recipe, best_value = None, None
        if cfg.train:
            recipe, best_value = _train(cfg, setup, classifier, data, run_dir, tracker.log)
        elif cfg.resume is not None and (Path(cfg.resume) / "best").is_dir():
            classifier.load_trained(Path(cfg.resume) / "best")
        value = best_value if cfg.optimized_metric == cfg.trainer.monitor else None
        if cfg.test:
            batch = cfg.trainer.eval_batch_size
            metrics, predictions = evaluate_splits(classifier, data, setup, batch, run_dir, recipe)
            _final_statistics(metrics, run_dir, setup, tracker)
            tracker.log_final(metrics, predictions)
            tracker.log_errors(run_dir / "predictions_test.csv", scan.root)
            tracker.log_plots(metrics)
            value = metric_value(metrics, cfg.optimized_metric)
        failed = False
        return value
    finally:
        tracker.finish(failed=failed)
        acc.wait_for_everyone()  # gloo ranks may abort at exit without it
        acc.end_training()
        if acc.num_processes == 1:
            # a multirun's next job builds a fresh Accelerator in this same process
            AcceleratorState._reset_state(reset_partial_state=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
