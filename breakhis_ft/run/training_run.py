"""The model half of a run: set up from the config, train with the recipe, evaluate, track.

Called by `experiment.run_experiment` after the data is prepared; imports torch and transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from omegaconf import DictConfig

from breakhis_ft.data.breakhis import BreakhisScan
from breakhis_ft.data.dataset import ImageDataset
from breakhis_ft.data.records import ImageRecord
from breakhis_ft.engine.predict import predict
from breakhis_ft.engine.recipe import FitResult, TrainingRecipe
from breakhis_ft.evaluate.final import summary_scalars
from breakhis_ft.evaluate.generation import (
    UNPARSEABLE,
    GeneratedAnswers,
    agreement,
    generate_split,
    generation_metrics,
    merge_adapter,
)
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


@dataclass
class SplitResult:
    """One split's final evaluation: its metrics and what predictions_<split>.csv holds."""

    metrics: dict[str, Any]
    probs: torch.Tensor  # scoring's probabilities, or generation's one-hot answers
    preds: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    class_names: list[str]  # the probability columns (generation adds `unparseable`)
    extra: dict[str, list[str]] = field(default_factory=dict)  # more CSV columns


def _generated(
    result: SplitResult | None, answers: GeneratedAnswers, metrics: dict, names: list[str]
) -> SplitResult:
    """Add generation to a scored split (eval_mode=both), or make it the split's result."""
    parsed = [names[i] if i >= 0 else UNPARSEABLE for i in answers.preds.tolist()]
    if result is None:  # eval_mode=generate
        n = len(names)
        return SplitResult(
            metrics,
            answers.one_hot(n),
            answers.hard(n),
            answers.labels,
            answers.indices,
            [*names, UNPARSEABLE],
            {"raw_answer": answers.answers},
        )
    result.metrics["generation"] = metrics
    result.metrics["agreement"] = agreement(result.preds, answers)
    result.extra = {"generated_pred": parsed, "raw_answer": answers.answers}
    return result


def evaluate_split(
    classifier: Classifier,
    dataset: ImageDataset,
    setup: RunSetup,
    batch_size: int,
    eval_mode: str = "score",
    recipe: TrainingRecipe | None = None,
    max_batches: int | None = None,
) -> SplitResult:
    """Score (label likelihoods) and/or generate (parsed answers) one split, by `eval_mode`.

    `max_batches`: score only the first batches (trainer.limit_eval_batches, debug presets)."""
    acc, names = setup.accelerator, list(setup.class_names)
    result = None
    if eval_mode in ("score", "both"):
        if recipe is not None:  # through the wrapper training prepared (DDP/FSDP); its limit
            probs, labels, indices = recipe.predict(dataset, batch_size)
        else:
            probs, labels, indices = predict(
                classifier, dataset, acc, batch_size, None, max_batches
            )
        metrics = setup.final_metrics_fn(probs, labels, indices, dataset)
        result = SplitResult(metrics, probs, probs.argmax(dim=1), labels, indices, names)
    if eval_mode in ("generate", "both"):
        answers = generate_split(classifier, dataset, acc, batch_size)
        gen_metrics = generation_metrics(answers, dataset, names)
        log.info("generation: %d of %d answers unparseable", answers.parse_failures, len(dataset))
        result = _generated(result, answers, gen_metrics, names)
    if result is None:
        raise ValueError(f"model.eval_mode={eval_mode!r}: allowed score, generate, both")
    return result


def evaluate_splits(
    classifier: Classifier,
    data: dict[str, ImageDataset],
    setup: RunSetup,
    batch_size: int,
    run_dir: Path,
    recipe: TrainingRecipe | None = None,
    eval_mode: str = "score",
    max_batches: int | None = None,
) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Final metrics of val and test (with intervals, calibration, patient level); writes
    predictions_<split>.csv on the main process."""
    metrics: dict[str, dict] = {}
    predictions: dict[str, tuple] = {}
    for split in ("val", "test"):
        if split not in data:
            continue
        dataset = data[split]
        res = evaluate_split(classifier, dataset, setup, batch_size, eval_mode, recipe, max_batches)
        metrics[split] = res.metrics
        predictions[split] = (res.labels.tolist(), res.preds.tolist())
        if setup.accelerator.is_main_process:
            records = [dataset.records[i] for i in res.indices.tolist()]
            rows = [
                {**r.as_dict(), "label": int(y)} for r, y in zip(records, res.labels, strict=True)
            ]
            path = run_dir / f"predictions_{split}.csv"
            write_predictions(path, rows, res.probs, res.preds, res.class_names, res.extra)
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
        data.get(str(cfg.trainer.eval_split)),  # test only to log it (validate.py)
        cfg.trainer,
        run_dir,
        setup.accelerator,
        optimizer_factory=setup.optimizer_factory,
        metrics_fn=setup.metrics_fn,
        log_fn=log_fn,
        seed=cfg.seed,
    )
    result = recipe.fit(resume=cfg.resume is not None)
    if cfg.trainer.select == "best" and result.best_dir is not None:
        classifier.load_trained(result.best_dir)
    # trainer.select=last: the classifier holds the final model already
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


def _evaluate_and_track(
    cfg: DictConfig,
    setup: RunSetup,
    classifier: Classifier,
    data: dict,
    run_dir: Path,
    recipe: TrainingRecipe | None,
    tracker: RunTracker,
    scan: BreakhisScan,
    name: str,
) -> dict[str, dict]:
    """The final evaluation of val and test, its statistics, files and W&B record."""
    batch, mode = cfg.trainer.eval_batch_size, str(cfg.model.eval_mode)
    limit = cfg.trainer.limit_eval_batches if cfg.trainer.limit_eval_batches > 0 else None
    if cfg.model.merge_for_eval and merge_adapter(classifier):
        log.info("LoRA adapter merged into the weights for the final evaluation")
        recipe = None  # the prepared wrapper holds the unmerged modules
    metrics, predictions = evaluate_splits(
        classifier, data, setup, batch, run_dir, recipe, mode, limit
    )
    _final_statistics(metrics, run_dir, setup, tracker)
    tracker.log_final(metrics, predictions)
    tracker.log_errors(run_dir / "predictions_test.csv", scan.root)
    tracker.log_plots(metrics, title=name)
    return metrics


def train_and_evaluate(
    cfg: DictConfig,
    config: dict,
    run_dir: Path,
    scan: BreakhisScan,
    splits: dict[str, list[ImageRecord]],
    group: str,
    name: str,
    resume_step: int | None = None,
) -> float | None:
    """Train (unless train=false), evaluate the best model on val and test; return the metric.

    `resume_step` (on `resume=`): the checkpoint training continues from; the tracker keeps the
    metrics logged up to it and continues the run's W&B run. The terminal's last lines are the
    summary block (run/summary.py), printed after W&B has closed.
    """
    setup = make_run_setup(cfg)
    acc = setup.accelerator
    main = acc.is_main_process  # read now: the accelerator's state is reset at the end
    # on resume, training logs again what followed resume_step
    resume_step = resume_step if cfg.train else None
    resumed = cfg.resume is not None
    tracker = RunTracker(run_dir, config, cfg.logger, name, group, main, resume_step, resumed)
    failed = True
    try:
        setup.stain = make_stain_normalizer(cfg, splits, scan.root, run_dir, main)
        classifier = make_classifier(cfg, setup)
        trainable, total = classifier.parameter_counts()
        tracker.log({"model/trainable_parameters": trainable, "model/parameters": total}, 0)
        data = make_datasets(
            cfg,
            scan,
            splits,
            classifier.needs_images,
            setup.stain,
            run_dir if main else None,
            classifier.input_side,
        )
        prepare_cached_inputs(classifier, data, scan.root, acc)
        recipe, best = _fit_or_load(cfg, setup, classifier, data, run_dir, tracker)
        selected = cfg.trainer.select == "best" and cfg.optimized_metric == cfg.trainer.monitor
        value = best[1] if best and selected else None
        metrics: dict[str, dict] = {}
        if cfg.test:
            metrics = _evaluate_and_track(
                cfg, setup, classifier, data, run_dir, recipe, tracker, scan, name
            )
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
