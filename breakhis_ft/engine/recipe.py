"""The training recipe on accelerate: setup, train, evaluate, save, resume, clean up.

Laid out as torchtune's recipes are: `TrainingRecipe(...)` receives objects already built from the
config (classifier, datasets, accelerator, and `RecipeSettings`: the trainer group, the run folder,
the optimizer factory, metrics and logging), `fit()` runs setup -> resume -> epochs -> final
checkpoint and returns a `FitResult`. The classifier's `loss`/`predict_proba` run
inside `ClassifierForward.forward`, so the prepared (DDP or FSDP) wrapper sees a forward call.

Stopping: Ctrl-C (KeyboardInterrupt, where it lands) and SIGTERM (what SLURM, Cloud Run and docker
send; acted on before the next micro-batch or evaluation batch) both end the run with the last
completed update's checkpoint saved; an unfinished gradient accumulation is dropped and `resume=`
continues from the checkpoint exactly. `trainer.checkpoint_every_minutes` adds checkpoints by time.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset
from transformers import get_scheduler

from breakhis_ft.engine.checkpoint import (
    FAILED_FILE,
    CheckpointManager,
    find_latest_checkpoint,
    mark_failed,
    register_trainable_hooks,
    resumable_checkpoint,
    save_trained_atomic,
)
from breakhis_ft.engine.loop_state import (
    LoopState,
    StepWindow,
    UpdateBoundary,
    check_class_weights_supported,
    eval_line,
    first_nonfinite_grad,
    lookup_metric,
    scalars,
    true_class_nll,
)
from breakhis_ft.engine.optim import param_groups
from breakhis_ft.engine.predict import ClassifierForward, make_loader, predict
from breakhis_ft.engine.profiling import step_profiler
from breakhis_ft.engine.sampling import EpochSampler, dataset_labels, inverse_frequency_weights
from breakhis_ft.engine.stop import RunInterrupted, StopRequested, StopSignal
from breakhis_ft.errors import NonFiniteError

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
OptimizerFactory = Callable[..., torch.optim.Optimizer]  # (params, lr=...) -> optimizer
# (probs, labels, dataset indices, dataset) -> the split's metrics (evaluate.metrics)
MetricsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Dataset], dict[str, Any]]


@dataclass(frozen=True)
class RecipeSettings:
    """What a recipe trains by beside its model, data and accelerator, built from the config."""

    trainer: Any  # the trainer group (TrainerConfig): steps, batches, evaluation, checkpoints
    run_dir: Path  # checkpoints, best/ and the FAILED mark go here
    optimizer_factory: OptimizerFactory  # trainer.optimizer, instantiated
    metrics_fn: MetricsFn  # the metrics of each evaluation during training
    log_fn: LogFn | None = None  # the tracker's (main process)
    seed: int = 42  # data order and loader workers


@dataclass
class FitResult:
    """What `fit` leaves behind."""

    best_dir: Path | None  # classifier.save_trained() of the best evaluation (or the final model)
    best_value: float | None  # the monitored value there
    best_step: int | None
    global_step: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    last_checkpoint: Path | None = None


class TrainingRecipe:
    """One training run of a classifier; `fit()` runs it, `predict()` goes through its wrapper."""

    def __init__(
        self,
        classifier: nn.Module,
        train_ds: Dataset,
        val_ds: Dataset | None,
        accelerator: Accelerator,
        settings: RecipeSettings,
    ) -> None:
        self.classifier, self.train_ds, self.val_ds = classifier, train_ds, val_ds
        self.acc, self.settings = accelerator, settings
        trainer_cfg = self.cfg = settings.trainer
        self.run_dir = Path(settings.run_dir)
        self.optimizer_factory, self.metrics_fn = settings.optimizer_factory, settings.metrics_fn
        self.log_fn, self.seed = settings.log_fn, settings.seed
        # trainer.eval_split=test (the blog notebook's) is only logged: nothing is selected on it
        self.eval_name = str(getattr(trainer_cfg, "eval_split", "val"))
        selects = val_ds is not None and self.eval_name == "val"
        self.state = LoopState(
            monitor=trainer_cfg.monitor if selects else None,
            sign=1.0 if trainer_cfg.monitor_mode == "max" else -1.0,
        )
        self.forward: nn.Module | None = None
        self.profiler: Any = None  # torch.profiler.profile while trainer.profile_steps > 0
        self.last_ckpt_step = -1
        self.stop = StopSignal()
        self.clock: Callable[[], float] = time.monotonic  # seconds; checkpoints by time
        self.last_ckpt_time = 0.0
        self.boundary: UpdateBoundary | None = None  # the generators after the last update
        # from optimizer.step until the loop state records the update: a Ctrl-C there would save
        # weights and a step that do not match
        self.updating = False

    # ---- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Loader, optimizer, scheduler and checkpoint hooks, prepared by accelerate."""
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if cfg.gradient_checkpointing:
            self.classifier.enable_gradient_checkpointing()
        labels = dataset_labels(self.train_ds)
        self.class_weights = self._class_weights(labels)
        self.sampler = EpochSampler(labels, seed=self.seed, balanced=cfg.sampler == "balanced")
        loader = make_loader(
            self.train_ds,
            functools.partial(self.classifier.collate, train=True),
            cfg.batch_size,
            self.sampler,
            cfg.num_workers,
            self.seed,
        )
        groups = param_groups(self.classifier, cfg.weight_decay)
        optimizer = self.optimizer_factory(groups, lr=cfg.lr)
        # accelerate shards the loader: its length is per process; a prepared scheduler steps once
        # per process per update, so its step counts are multiplied by num_processes
        self.forward, self.optimizer, self.loader = acc.prepare(
            ClassifierForward(self.classifier), optimizer, loader
        )
        if len(self.loader) == 0:
            raise ValueError("the training split gives no batches (is it empty?)")
        # debug=limit: an epoch of limit_train_batches, rounded up to whole updates
        limit, accum = cfg.limit_train_batches, acc.gradient_accumulation_steps
        whole = math.ceil(limit / accum) * accum
        self.batches_per_epoch = min(len(self.loader), whole) if limit > 0 else len(self.loader)
        steps_per_epoch = math.ceil(self.batches_per_epoch / acc.gradient_accumulation_steps)
        self.total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
        warmup = math.ceil(cfg.warmup_ratio * self.total)
        self.scheduler = acc.prepare(
            get_scheduler(
                cfg.scheduler,
                self.optimizer,
                num_warmup_steps=warmup * acc.num_processes,
                num_training_steps=self.total * acc.num_processes,
            )
        )
        self.hooks = register_trainable_hooks(acc)
        self.manager = CheckpointManager(self.run_dir, acc, cfg.keep_checkpoints)
        self.params = [p for p in self.forward.parameters() if p.requires_grad]
        norm = cfg.max_grad_norm
        self.max_norm = norm if norm and norm > 0 else math.inf

    def _class_weights(self, labels: list[int]) -> torch.Tensor | None:
        if self.cfg.class_weighting != "inverse_frequency":
            return None
        check_class_weights_supported(self.classifier)
        if self.cfg.sampler == "balanced":
            log.warning("trainer.sampler=balanced with class_weighting: imbalance corrected twice")
        n_classes = len(self.classifier.class_names)
        return inverse_frequency_weights(labels, n_classes).to(self.acc.device)

    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies (clearing a FAILED mark)."""
        failed = self.run_dir / FAILED_FILE
        if self.acc.is_main_process and failed.exists():
            log.warning(
                "resume: clearing the FAILED mark of %s: %s", self.run_dir, failed.read_text()
            )
            failed.unlink()
        found = resumable_checkpoint(self.run_dir)  # the newest that verifies
        if found is None:
            log.warning("resume: no complete checkpoint in %s; starting from step 0", self.run_dir)
            return
        latest = found[1]
        self.state.load(self.manager.load(latest))
        self.last_ckpt_step = self.state.global_step
        log.info("resumed from %s (step %d)", latest, self.state.global_step)

    def pending_evaluation(self) -> None:
        """The evaluation a stop cut short (the checkpoint says so): run it, save it, go on."""
        if not self.state.eval_pending or self.val_ds is None:
            return
        log.info(
            "resume: the evaluation of step %d was interrupted; running it", self.state.global_step
        )
        self.evaluate()
        self.state.eval_pending = False
        self.forward.train()
        self.save_checkpoint()

    # ---- training --------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        """Train, evaluating on the validation split; resume from the run folder when asked.

        Raises NonFiniteError (run folder marked FAILED, last good checkpoint kept) on a non-finite
        loss or gradient, and RunInterrupted (a KeyboardInterrupt) after saving a checkpoint when
        Ctrl-C or SIGTERM stops it.
        """
        self.setup()
        if resume:
            self.resume()
        self.window = StepWindow(total=self.total, initial=self.state.global_step, acc=self.acc)
        self.forward.train()
        self.boundary = UpdateBoundary.capture(self.acc)
        self.last_ckpt_time = self.clock()
        profile_dir = self.run_dir / "profile"
        try:
            with self.stop, step_profiler(profile_dir, self.cfg.profile_steps, self.acc) as prof:
                self.profiler = prof
                self.pending_evaluation()
                while self.state.global_step < self.total and not self.state.stopped_early:
                    self.train_epoch()
            self.finish()
            self.check_stop()  # a signal during the last update: the run still ends interrupted
        except NonFiniteError as err:
            self._fail(err)
        except KeyboardInterrupt as err:
            self._interrupted(err)
        finally:
            self.window.close()
            for hook in self.hooks:
                hook.remove()
        self.acc.wait_for_everyone()
        st = self.state
        return FitResult(
            best_dir=self.run_dir / "best",
            best_value=st.best_value,
            best_step=st.best_step,
            global_step=st.global_step,
            stopped_early=st.stopped_early,
            history=st.history,
            last_checkpoint=find_latest_checkpoint(self.run_dir),
        )

    def train_epoch(self) -> None:
        """The rest of the current epoch (from the saved batch position after a resume)."""
        st, acc = self.state, self.acc
        epoch, consumed = st.epoch, st.batch_in_epoch
        self.sampler.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)
        self.loader.generator.manual_seed(self.seed + epoch)
        loader = acc.skip_first_batches(self.loader, consumed) if consumed else self.loader
        for batch in loader:
            self.check_stop()  # SIGTERM: before the micro-batch, not at the end of the update
            with acc.accumulate(self.forward):
                loss = self.train_step(batch, epoch, consumed)
            consumed += 1
            self.window.add(loss, len(batch["class_label"]) * acc.num_processes)
            if not acc.sync_gradients:
                continue
            # the state only moves at updates: a checkpoint always sits on an update boundary
            end_of_epoch = consumed >= self.batches_per_epoch
            st.advance(epoch, consumed, end_of_epoch)
            self.boundary = UpdateBoundary.capture(acc)
            self.updating = False
            self.after_update(end_of_epoch)
            if st.global_step >= self.total or st.stopped_early or end_of_epoch:
                return

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process (every process gets the same answer)."""
        if self.acc.num_processes == 1:
            return flag
        count = self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), "sum")
        return bool(count.item() > 0)

    def check_stop(self) -> None:
        """Raise StopRequested when a stop signal reached any process (all stop at this batch)."""
        if self.any_process(self.stop.requested is not None):
            raise StopRequested(self.stop.requested or "SIGTERM")

    def train_step(self, batch: dict[str, Any], epoch: int, consumed: int) -> float:
        """Forward, backward, clip and step (at accumulation boundaries); returns the mean loss."""
        acc, step = self.acc, self.state.global_step + 1
        loss = self.forward(batch, class_weights=self.class_weights)
        losses = acc.gather(loss.detach().float().reshape(1))
        if not bool(torch.isfinite(losses).all()):
            raise NonFiniteError(
                f"non-finite loss ({losses.tolist()}) at training step {step} "
                f"(epoch {epoch}, batch {consumed})"
            )
        acc.backward(loss)
        if acc.sync_gradients:
            norm = acc.clip_grad_norm_(self.params, self.max_norm)  # the norm before clipping
            if norm is not None:
                self.window.add_grad_norm(float(norm))
            # with fp16 the grad scaler skips inf steps itself: not an error there
            if acc.scaler is None and norm is not None and not torch.isfinite(norm):
                raise NonFiniteError(
                    f"non-finite gradient (norm {float(norm)}) at training step {step} "
                    f"(epoch {epoch}): first in parameter "
                    f"{first_nonfinite_grad(self.classifier)!r}"
                )
        self.updating = acc.sync_gradients
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(losses.mean())

    def after_update(self, end_of_epoch: bool) -> None:
        """Log, evaluate and checkpoint where due after an optimizer update."""
        st, cfg = self.state, self.cfg
        step = st.global_step
        epoch_progress = st.epoch + st.batch_in_epoch / self.batches_per_epoch
        due = step % max(cfg.log_every_steps, 1) == 0 or step == self.total
        stats = self.window.step(self.scheduler.get_last_lr()[0], epoch_progress, due)
        if stats is not None:
            self.log(stats, step)
        if self.profiler is not None:
            self.profiler.step()
        final = step >= self.total
        due = (step % cfg.eval_every_steps == 0) if cfg.eval_every_steps > 0 else end_of_epoch
        if self.val_ds is not None and (due or final):
            st.eval_pending = True  # until it ends: a stop during it leaves it to resume
            self.evaluate()
            st.eval_pending = False
            self.forward.train()
        every = cfg.checkpoint_every_steps
        if ((step % every == 0) if every > 0 else end_of_epoch) or final or self.checkpoint_due():
            self.save_checkpoint()

    def checkpoint_due(self) -> bool:
        """trainer.checkpoint_every_minutes have passed since the last checkpoint (any process's
        clock: every process saves together)."""
        minutes = getattr(self.cfg, "checkpoint_every_minutes", None)
        if minutes is None:
            return False
        return self.any_process(self.clock() - self.last_ckpt_time >= 60.0 * minutes)

    def finish(self) -> None:
        """The final checkpoint; the final model becomes `best` if no evaluation ever did."""
        st = self.state
        if st.global_step != self.last_ckpt_step:
            self.save_checkpoint()
        if st.best_step is None:
            if st.monitor is not None:
                log.warning(
                    "%s was never defined: the final model is kept as best", self.cfg.monitor
                )
            st.best_step = st.global_step
            self.save_best()

    def _fail(self, err: NonFiniteError) -> None:
        latest = find_latest_checkpoint(self.run_dir)
        message = (
            f"{err}. The run stopped; the last good checkpoint is "
            f"{latest if latest else '(none saved yet)'}. Likely causes: fp16 overflow "
            "(use precision=bf16 or fp32) or a learning rate too high (lower trainer.lr)."
        )
        if self.acc.is_main_process:
            mark_failed(self.run_dir, message)
        raise NonFiniteError(message) from None

    def _interrupted(self, err: KeyboardInterrupt) -> None:
        # a StopRequested comes at the same batch on every process; a bare Ctrl-C lands anywhere,
        # so only one process saves after it, and never from inside an optimizer step
        step = self.state.global_step
        agreed = isinstance(err, StopRequested) or self.acc.num_processes == 1
        if self.updating:
            log.warning("interrupted inside an optimizer update: its state is not saved")
        elif agreed and step != self.last_ckpt_step:
            log.warning("interrupted: saving the checkpoint of step %d", step)
            self.back_to_boundary()
            self.save_checkpoint()
        saved = self.last_ckpt_step if self.last_ckpt_step >= 0 else None  # resume starts there
        name = err.signal_name if isinstance(err, StopRequested) else "SIGINT"
        raise RunInterrupted(saved, self.stop.requested or name) from err

    def back_to_boundary(self) -> None:
        """Drop the micro-batches since the last update (their gradients, the generators they
        moved, accelerate's count of them): the state is the last completed update's."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.boundary is not None:
            self.boundary.restore(self.acc)

    # ---- evaluation and checkpoints ------------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Send metrics to the tracker (main process only)."""
        if self.log_fn is not None and self.acc.is_main_process:
            self.log_fn(metrics, step)

    def evaluate(self) -> None:
        """Metrics of the evaluated split; on validation the best model so far is saved and
        early stopping counts; a test split (trainer.eval_split=test) is only logged."""
        st = self.state
        probs, labels, indices = self.predict(
            self.val_ds, self.cfg.eval_batch_size, before_batch=self.check_stop
        )
        metrics = self.metrics_fn(probs, labels, indices, self.val_ds)
        metrics["class_nll"] = true_class_nll(probs, labels)
        flat = scalars(metrics, self.eval_name)
        st.history.append({"step": st.global_step, "epoch": st.epoch, **flat})
        st.last_eval_step = st.global_step
        self.log(flat, st.global_step)
        value = lookup_metric(metrics, self.cfg.monitor) if st.monitor else None
        improved = st.monitor is not None and st.improves(value)
        if improved:
            st.best_value, st.best_step, st.bad_evals = value, st.global_step, 0
        if self.acc.is_main_process:
            log.info(eval_line(st, value, metrics["class_nll"], improved, self.eval_name))
        if st.monitor is None:  # curves only (trainer.eval_split=test): nothing is selected
            return
        if improved:
            self.save_best(metrics)
            return
        if value is None:
            log.warning("%s undefined at step %d: no improvement", self.cfg.monitor, st.global_step)
        st.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        if patience > 0 and st.bad_evals >= patience:
            st.stopped_early = True
            log.info(
                "early stopping at step %d: %s did not improve in %d evaluations",
                st.global_step,
                self.cfg.monitor,
                patience,
            )

    def predict(
        self, dataset: Dataset, batch_size: int, before_batch: Callable[[], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities, labels and indices of `dataset`, through the prepared wrapper
        (`before_batch`: the stop check while training)."""
        limit = self.cfg.limit_eval_batches if self.cfg.limit_eval_batches > 0 else None
        return predict(
            self.classifier,
            dataset,
            self.acc,
            batch_size,
            forward=self.forward,
            max_batches=limit,
            before_batch=before_batch,
        )

    def save_checkpoint(self) -> None:
        """A resumable checkpoint of the current step (trainable weights, optimizer, RNG, data)."""
        self.manager.save(self.state.global_step, self.state.as_dict())
        self.last_ckpt_step = self.state.global_step
        self.last_ckpt_time = self.clock()

    def save_best(self, metrics: dict[str, Any] | None = None) -> None:
        """The current model as `best/` (its monitored value and metrics in best.json)."""
        if self.acc.is_main_process:
            info = {
                "step": self.state.global_step,
                "monitor": self.cfg.monitor,
                "value": self.state.best_value,
                "metrics": metrics,
            }
            extra = {"best.json": json.dumps(info, indent=1)}
            save_trained_atomic(self.classifier, self.run_dir / "best", extra)
        self.acc.wait_for_everyone()
