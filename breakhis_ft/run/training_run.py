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
from breakhis_ft.engine.loop_state import true_class_nll
from breakhis_ft.engine.predict import predict
from breakhis_ft.engine.recipe import FitResult, TrainingRecipe
from breakhis_ft.evaluate.metrics import write_predictions
from breakhis_ft.models.base import Classifier
from breakhis_ft.run.setup import (
    RunSetup,
    make_classifier,
    make_datasets,
    make_run_setup,
    prepare_cached_inputs,
)
from breakhis_ft.run.summary import log_summary
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
    max_batches: int | None = None,
) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Metrics of val and test (`loss`: the true class's NLL); writes predictions_<split>.csv on
    the main process. `max_batches`: only the first batches (trainer.limit_eval_batches)."""
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
            probs, labels, indices = predict(
                classifier, dataset, acc, batch_size, None, max_batches
            )
        metrics[split] = setup.metrics_fn(probs, labels, indices, dataset)
        metrics[split]["loss"] = true_class_nll(probs, labels)
        preds = probs.argmax(dim=1)
        predictions[split] = (labels.tolist(), preds.tolist())
        if acc.is_main_process:
            records = [dataset.records[i] for i in indices.tolist()]
            rows = [{**r.as_dict(), "label": int(y)} for r, y in zip(records, labels, strict=True)]
            write_predictions(run_dir / f"predictions_{split}.csv", rows, probs, preds, names)
    return metrics, predictions


def _train(
    cfg: DictConfig, setup: RunSetup, classifier: Classifier, data: dict, run_dir: Path, log_fn
) -> tuple[TrainingRecipe, FitResult]:
    """Fit with the recipe; the best model is loaded back into the classifier."""
    trainable, total = classifier.parameter_counts()
    log.info(
        "training %s of %s parameters (%.3f%%), peft=%s",
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
        cfg.peft.method,
    )
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
    return recipe, result


def _model_metadata(cfg: DictConfig, result: FitResult) -> dict[str, Any]:
    """What the W&B model artifact says about the adapter it holds."""
    return {
        "base_model": str(cfg.model.name_or_path),
        "peft": str(cfg.peft.method),
        "classes": list(cfg.task.classes),
        "monitor": str(cfg.trainer.monitor),
        "value": result.best_value,
        "step": result.best_step,
    }


def _fit_or_load(
    cfg: DictConfig, setup: RunSetup, classifier: Classifier, data: dict, run_dir: Path, tracker
) -> tuple[TrainingRecipe | None, tuple[str, float | None, int | None] | None]:
    """Train (or load resume's best model); (recipe, (monitor, best value, best step))."""
    if not cfg.train:
        if cfg.resume is not None and (Path(cfg.resume) / "best").is_dir():
            classifier.load_trained(Path(cfg.resume) / "best")
        return None, None
    recipe, result = _train(cfg, setup, classifier, data, run_dir, tracker.log)
    if cfg.logger.log_model and result.best_dir is not None:
        tracker.log_model(result.best_dir, _model_metadata(cfg, result))
    return recipe, (str(cfg.trainer.monitor), result.best_value, result.best_step)


def train_and_evaluate(
    cfg: DictConfig,
    config: dict,
    run_dir: Path,
    scan: BreakhisScan,
    splits: dict[str, list[ImageRecord]],
    group: str,
    name: str,
) -> float | None:
    """Train (unless train=false), evaluate the best model on val and test; return the metric.

    The terminal's last lines are the summary block (run/summary.py), after W&B has closed."""
    setup = make_run_setup(cfg)
    acc = setup.accelerator
    main = acc.is_main_process  # read now: the state is reset at the end
    tracker = RunTracker(run_dir, config, cfg.logger, name, group, active=main)
    failed = True
    try:
        classifier = make_classifier(cfg, setup)
        trainable, total = classifier.parameter_counts()
        tracker.log({"model/trainable_parameters": trainable, "model/parameters": total}, 0)
        data = make_datasets(cfg, scan, splits, needs_images=classifier.needs_images)
        prepare_cached_inputs(classifier, data, scan.root, acc)
        recipe, best = _fit_or_load(cfg, setup, classifier, data, run_dir, tracker)
        value = best[1] if best and cfg.optimized_metric == cfg.trainer.monitor else None
        metrics: dict[str, dict] = {}
        if cfg.test:
            batch, limit = cfg.trainer.eval_batch_size, cfg.trainer.limit_eval_batches
            metrics, predictions = evaluate_splits(
                classifier, data, setup, batch, run_dir, recipe, limit if limit > 0 else None
            )
            tracker.log_final(metrics, predictions)
            tracker.log_plots(metrics, title=name)
            value = metric_value(metrics, cfg.optimized_metric)
        failed = False
    finally:
        tracker.finish(failed=failed)
        acc.wait_for_everyone()  # gloo ranks may abort at exit without it
        acc.end_training()
        if acc.num_processes == 1:
            # a multirun's next job builds a fresh Accelerator in this same process
            AcceleratorState._reset_state(reset_partial_state=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if main:
        log_summary(run_dir, metrics, best)
    return value
