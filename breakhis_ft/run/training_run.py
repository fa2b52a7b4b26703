"""The model half of a run as one object: set up from the config once, train with the recipe,
evaluate, track.

`TrainingRun` resolves the run in its constructor, as torchtune's recipe classes do in their first
lines: precision (checked against the device), Accelerator, evaluation settings, tracker, recipe
settings, stain normaliser, classifier and datasets, in that order, as typed attributes. `fit()`,
`evaluate()` and `close()` read them. `train_and_evaluate` runs it for `experiment.run_experiment`
after the data is prepared; this module imports torch and transformers.
"""

from __future__ import annotations

import functools
import json
import logging
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from accelerate.state import AcceleratorState
from omegaconf import DictConfig

from breakhis_ft.config import EvaluateConfig
from breakhis_ft.data.breakhis import BreakhisScan
from breakhis_ft.data.dataset import ImageDataset
from breakhis_ft.data.records import ImageRecord
from breakhis_ft.deploy.export import ExportError, export_adapter
from breakhis_ft.engine.checkpoint import save_trained_atomic
from breakhis_ft.engine.predict import predict
from breakhis_ft.engine.recipe import FitResult, MetricsFn, TrainingRecipe
from breakhis_ft.evaluate.final import dataset_final_metrics
from breakhis_ft.evaluate.generation import (
    UNPARSEABLE,
    GeneratedAnswers,
    agreement,
    generate_split,
    generation_metrics,
)
from breakhis_ft.evaluate.metrics import write_predictions
from breakhis_ft.run.calibrate import calibrate_run
from breakhis_ft.run.setup import (
    evaluate_settings,
    make_accelerator,
    make_classifier,
    make_datasets,
    make_stain_normalizer,
    prepare_cached_inputs,
    recipe_settings,
    run_precision,
)
from breakhis_ft.run.summary import log_summary
from breakhis_ft.run.tracking import RunTracker, TrackedJob, summary_of

log = logging.getLogger(__name__)

# what training leaves for the summary: (trainer.monitor, its best value, the step of it)
Best = tuple[str, float | None, int | None]
LAST_MODEL = "last"  # logger.log_model=last: the model at the end of training, saved as last/
GIB = 2**30


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


@dataclass(frozen=True)
class EvaluationSettings:
    """How a run's final evaluation of val and test goes (not the per-epoch validation)."""

    batch_size: int  # trainer.eval_batch_size
    max_batches: int | None  # trainer.limit_eval_batches (debug presets); None: every batch
    statistics: EvaluateConfig  # the evaluate group: intervals, calibration, patient fusion
    metrics_fn: MetricsFn  # a split's final metrics, with those statistics

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EvaluationSettings:
        """The settings of the composed config `cfg`."""
        statistics = evaluate_settings(cfg)
        limit = int(cfg.trainer.limit_eval_batches)
        return cls(
            batch_size=int(cfg.trainer.eval_batch_size),
            max_batches=limit if limit > 0 else None,
            statistics=statistics,
            metrics_fn=functools.partial(
                dataset_final_metrics,
                class_names=tuple(cfg.task.classes),
                settings=statistics,
                group_by=str(cfg.split.group_by),  # the intervals resample the split's own groups
            ),
        )


def log_model_choice(value: Any) -> str:
    """logger.log_model as best | last | none (a saved config's true / false: best / none)."""
    if isinstance(value, bool) or value is None:
        return "best" if value else "none"
    return str(value)


def _model_metadata(cfg: DictConfig, result: FitResult, metrics: dict[str, dict]) -> dict:
    """What the W&B model artifact says about the model it holds: base, classes, selection and
    the validation headline (test's stays with the run: no selection looks at it)."""
    return {
        "base_model": str(cfg.model.name_or_path),
        "peft": str(cfg.peft.method),
        "classes": list(cfg.task.classes),
        "monitor": str(cfg.trainer.monitor),
        "monitor_mode": str(cfg.trainer.monitor_mode),
        "best_value": result.best_value,
        "best_step": result.best_step,
        "final_step": result.global_step,
        **{k: v for k, v in summary_of(metrics).items() if k.startswith("val/")},
    }


def data_facts(splits: dict[str, list[ImageRecord]]) -> dict[str, int]:
    """`data/<split>/images` and `data/<split>/patients` (patient folders) of each split."""
    out = {}
    for split, records in splits.items():
        out[f"data/{split}/images"] = len(records)
        out[f"data/{split}/patients"] = len({r.patient for r in records})
    return out


def resource_facts(seconds: float) -> dict[str, float]:
    """`run/wall_time_s` and the peak memory of this process: resident (host) and, on CUDA, the
    most the GPU allocated, in GiB."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {
        "run/wall_time_s": round(seconds, 1),
        "run/peak_rss_gib": round(peak_rss / (GIB if sys.platform == "darwin" else 2**20), 3),
    }
    if torch.cuda.is_available():
        out["run/peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    return out


class TrainingRun:
    """One run's model half, resolved from its config once; a context manager that closes it."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        scan: BreakhisScan,
        splits: dict[str, list[ImageRecord]],
        job: TrackedJob,
        resume_step: int | None = None,
    ) -> None:
        """Build every part of the run, in pipeline order; a failure closes what was opened.

        `resume_step` (on `resume=`): the checkpoint training continues from; the tracker keeps the
        metrics logged up to it and continues the run's W&B run.
        """
        self.cfg, self.run_dir, self.scan, self.job = cfg, Path(run_dir), scan, job
        self.started = time.monotonic()
        self.class_names = tuple(cfg.task.classes)
        self.precision = run_precision(cfg)
        self.accelerator = make_accelerator(cfg, self.precision)
        self.main = self.accelerator.is_main_process  # read now: the state is reset at close
        self.evaluation = EvaluationSettings.from_config(cfg)
        self.tracker = RunTracker(
            self.run_dir,
            job,
            cfg.logger,
            self.main,
            resume_step if cfg.train else None,  # on resume, training logs again what followed
            cfg.resume is not None,
        )
        self.recipe: TrainingRecipe | None = None  # set by fit(): its wrapper evaluates too
        self.fit_result: FitResult | None = None  # set by fit()
        self._closed = False
        try:
            self.recipe_settings = recipe_settings(cfg, self.run_dir, self.tracker.log)
            self.stain = make_stain_normalizer(cfg, splits, scan.root, self.run_dir, self.main)
            self.classifier = make_classifier(cfg, self.precision, self.stain)
            trainable, total = self.classifier.parameter_counts()
            self.tracker.log(
                {"model/trainable_parameters": trainable, "model/parameters": total}, 0
            )
            self.tracker.log_summary(data_facts(splits))
            self.datasets = make_datasets(
                cfg,
                scan,
                splits,
                self.classifier.needs_images,
                self.stain,
                self.run_dir if self.main else None,
                self.classifier.input_side,  # the square the model reads caps the cached size
            )
            prepare_cached_inputs(self.classifier, self.datasets, scan.root, self.accelerator)
        except BaseException:
            self.close(failed=True)
            raise

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    # ---- training ----------------------------------------------------------------------------

    def fit(self) -> Best | None:
        """Train with the recipe; the best model (trainer.select=best) is loaded back into the
        classifier. With train=false, resume's best model is loaded where there is one; None."""
        cfg = self.cfg
        if not cfg.train:
            if cfg.resume is not None and (Path(cfg.resume) / "best").is_dir():
                self.classifier.load_trained(Path(cfg.resume) / "best")
            return None
        trainable, total = self.classifier.parameter_counts()
        log.info(
            "training %s of %s parameters (%.3f%%), peft=%s",
            f"{trainable:,}",
            f"{total:,}",
            100.0 * trainable / max(total, 1),
            cfg.peft.method,
        )
        self.recipe = TrainingRecipe(
            self.classifier,
            self.datasets["train"],
            self.datasets.get(str(cfg.trainer.eval_split)),  # test only to log it (validate.py)
            self.accelerator,
            self.recipe_settings,
        )
        result = self.fit_result = self.recipe.fit(resume=cfg.resume is not None)
        # logger.log_model=last, with W&B on: the artifact's model, saved before best/ is loaded
        if log_model_choice(cfg.logger.log_model) == LAST_MODEL and self.tracker.wandb_run:
            info = {"step": result.global_step}  # the model the artifact holds, as best.json says
            save_trained_atomic(
                self.classifier, self.run_dir / LAST_MODEL, {"best.json": json.dumps(info)}
            )
        if cfg.trainer.select == "best" and result.best_dir is not None:
            self.classifier.load_trained(result.best_dir)
        # trainer.select=last: the classifier holds the final model already
        self.tracker.log_summary(
            {
                "best/monitor": str(cfg.trainer.monitor),
                "best/mode": str(cfg.trainer.monitor_mode),
                "best/value": result.best_value,
                "best/step": result.best_step,
            }
        )
        return str(cfg.trainer.monitor), result.best_value, result.best_step

    def log_model(self, metrics: dict[str, dict]) -> None:
        """logger.log_model=best | last: the exported adapter of that model (as
        `breakhis-ft-export --adapter-only` writes it) with metrics.json and config.yaml, as a
        version of the run's W&B model artifact. A run that trained no adapter logs none."""
        which = log_model_choice(self.cfg.logger.log_model)
        result = self.fit_result
        if which == "none" or result is None or self.tracker.wandb_run is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            try:
                folder = export_adapter(self.run_dir, Path(tmp) / "model", weights=which)
            except ExportError as err:
                log.warning("logger.log_model=%s: no W&B model artifact: %s", which, err)
                return
            for name, source in (
                ("metrics.json", self.run_dir / "metrics.json"),
                ("config.yaml", self.run_dir / ".hydra" / "config.yaml"),
            ):
                if source.is_file():
                    (folder / name).write_bytes(source.read_bytes())
            self.tracker.log_model(folder, which, _model_metadata(self.cfg, result, metrics))

    # ---- the final evaluation ----------------------------------------------------------------

    def evaluate(self) -> dict[str, dict]:
        """The final evaluation of val and test: metrics with intervals, calibration and patient
        level, predictions_<split>.csv, the statistics and the W&B record."""
        recipe = self.recipe
        if self.classifier.prepare_final_evaluation():
            log.info("LoRA adapter merged into the weights for the final evaluation")
            recipe = None  # the prepared wrapper holds the unmerged modules
        metrics: dict[str, dict] = {}
        predictions: dict[str, tuple] = {}
        for split in ("val", "test"):
            if split in self.datasets:
                result = self.evaluate_split(self.datasets[split], recipe)
                metrics[split] = result.metrics
                predictions[split] = (result.labels.tolist(), result.preds.tolist())
                self._write_predictions(split, result)
        if self.main:  # temperature scaling and reliability diagrams
            calibrate_run(metrics, self.run_dir, self.evaluation.statistics)
        self.tracker.log_final(metrics, predictions)
        self.tracker.log_errors(self.run_dir / "predictions_test.csv", self.scan.root)
        self.tracker.log_plots(metrics, title=self.job.name)
        return metrics

    def evaluate_split(
        self, dataset: ImageDataset, recipe: TrainingRecipe | None = None
    ) -> SplitResult:
        """Score (label likelihoods) and/or generate (parsed answers) one split, by the
        classifier's `eval_mode`; through the recipe's prepared wrapper (DDP/FSDP) when given."""
        names, mode = list(self.class_names), self.classifier.eval_mode
        batch_size, acc = self.evaluation.batch_size, self.accelerator
        result = None
        if mode in ("score", "both"):
            if recipe is not None:  # its limit is trainer.limit_eval_batches too
                probs, labels, indices = recipe.predict(dataset, batch_size)
            else:
                probs, labels, indices = predict(
                    self.classifier, dataset, acc, batch_size, None, self.evaluation.max_batches
                )
            metrics = self.evaluation.metrics_fn(probs, labels, indices, dataset)
            result = SplitResult(metrics, probs, probs.argmax(dim=1), labels, indices, names)
        if mode in ("generate", "both"):
            answers = generate_split(self.classifier, dataset, acc, batch_size)
            gen_metrics = generation_metrics(answers, dataset, names)
            log.info(
                "generation: %d of %d answers unparseable", answers.parse_failures, len(dataset)
            )
            result = _generated(result, answers, gen_metrics, names)
        if result is None:
            raise ValueError(f"model.eval_mode={mode!r}: allowed score, generate, both")
        return result

    def _write_predictions(self, split: str, result: SplitResult) -> None:
        """predictions_<split>.csv (main process): each record, its label and probabilities."""
        if not self.main:
            return
        dataset = self.datasets[split]
        records = [dataset.records[i] for i in result.indices.tolist()]
        rows = [
            {**r.as_dict(), "label": int(y)} for r, y in zip(records, result.labels, strict=True)
        ]
        path = self.run_dir / f"predictions_{split}.csv"
        write_predictions(path, rows, result.probs, result.preds, result.class_names, result.extra)

    # ---- the end -------------------------------------------------------------------------------

    def close(self, failed: bool = False) -> None:
        """Finish the tracker (W&B closed, `failed` marked) and release the accelerator, whose
        state a multirun's next job builds afresh in this process. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        acc = self.accelerator
        try:
            self.tracker.log_summary(resource_facts(time.monotonic() - self.started))
            self.tracker.finish(failed=failed)
        finally:
            acc.wait_for_everyone()  # gloo ranks may abort at exit without it
            acc.end_training()
            if acc.num_processes == 1:
                AcceleratorState._reset_state(reset_partial_state=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def train_and_evaluate(
    cfg: DictConfig,
    run_dir: Path,
    scan: BreakhisScan,
    splits: dict[str, list[ImageRecord]],
    job: TrackedJob,
    resume_step: int | None = None,
) -> float | None:
    """Train (unless train=false), evaluate the best model on val and test; return the metric.

    The terminal's last lines are the summary block (run/summary.py), printed after W&B closed.
    """
    metrics: dict[str, dict] = {}
    with TrainingRun(cfg, run_dir, scan, splits, job, resume_step) as run:
        best = run.fit()
        selected = cfg.trainer.select == "best" and cfg.optimized_metric == cfg.trainer.monitor
        value = best[1] if best and selected else None
        if cfg.test:
            metrics = run.evaluate()
            value = metric_value(metrics, cfg.optimized_metric)
        run.log_model(metrics)
    if run.main:
        log_summary(run_dir, metrics, best)
    return value
