"""The training loop on accelerate: any Classifier, mixed precision, checkpoints, resume.

The classifier's `loss`/`predict_proba` run inside `ClassifierForward.forward`, so that the prepared
(DDP or FSDP) wrapper sees a forward call (DDP only syncs gradients of a forward it saw) and
autocast wraps it.
"""

from __future__ import annotations

import functools
import inspect
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
from tqdm.auto import tqdm
from transformers import get_scheduler

from breakhis_ft.config import ConfigError
from breakhis_ft.engine.checkpoint import (
    FAILED_FILE,
    CheckpointManager,
    NonFiniteError,
    find_latest_checkpoint,
    mark_failed,
    register_trainable_hooks,
    save_trained_atomic,
)
from breakhis_ft.engine.predict import (
    ClassifierForward,
    evaluate_dataset,
    make_loader,
    predict,
    register_prepared,
)
from breakhis_ft.engine.sampling import EpochSampler, dataset_labels, inverse_frequency_weights

log = logging.getLogger(__name__)

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
LogFn = Callable[[dict[str, float], int], None]


def make_accelerator(trainer_cfg: Any, precision_cfg: Any, grad_accum: int = 1) -> Accelerator:
    """An Accelerator with mixed precision from `precision.name` and gradient accumulation."""
    name = precision_cfg.name
    if name not in MIXED_PRECISION:
        raise ConfigError(f"config error: precision.name: {name!r} is not one of bf16, fp16, fp32")
    on_gpu = torch.cuda.is_available() and not trainer_cfg.cpu
    if name == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "config error: precision: this GPU has no bfloat16 support; use precision=fp32 "
            "(fp16 overflows to NaN on Gemma 3)"
        )
    return Accelerator(
        mixed_precision=MIXED_PRECISION[name],
        gradient_accumulation_steps=grad_accum,
        cpu=trainer_cfg.cpu,
    )


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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: decayed matrices; biases and norms without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or "norm" in name.lower() or name.endswith("bias")
        (no_decay if plain else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the classifier has no trainable parameters (check peft / freeze options)")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where the device and dtype support it."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError) as err:
        log.info("fused AdamW unavailable (%s); using the default implementation", err)
        return torch.optim.AdamW(groups, lr=lr)


def _monitor_key(monitor: str) -> list[str]:
    parts = monitor.split("/")
    if len(parts) < 2 or parts[0] != "val":
        raise ConfigError(
            f"config error: trainer.monitor: {monitor!r} must name a validation metric, "
            "e.g. val/balanced_accuracy, val/f1_macro, val/patient_accuracy, val/binary/auroc"
        )
    return parts[1:]


def _lookup(metrics: dict[str, Any], keys: list[str]) -> float | None:
    value: Any = metrics
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise KeyError(
                f"trainer.monitor: no metric {'/'.join(keys)!r} in the validation metrics"
            )
        value = value[key]
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Flatten the numeric leaves of a metrics dict into `prefix/key` entries for logging."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("confusion_matrix", "classes", "auroc_undefined_classes"):
            continue
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, int | float) and value is not None:
            out[f"{prefix}/{key}"] = float(value)
    return out


def _check_class_weights_supported(classifier: nn.Module) -> None:
    if "class_weights" not in inspect.signature(classifier.loss).parameters:
        raise ConfigError(
            f"config error: trainer.class_weighting: {type(classifier).__name__}.loss(batch) takes "
            "no class_weights; use trainer.class_weighting=none (or trainer.sampler=balanced)"
        )


def _first_nonfinite_grad(classifier: nn.Module) -> str:
    for name, param in classifier.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return name
    return "<unknown parameter>"


class _Loop:
    """The state and steps of one `fit` call (kept in one place so resume can restore it)."""

    def __init__(self, classifier, val_ds, cfg, run_dir: Path, accelerator, log_fn) -> None:
        self.classifier, self.val_ds, self.cfg = classifier, val_ds, cfg
        self.run_dir, self.acc, self.log_fn = run_dir, accelerator, log_fn
        self.monitor = _monitor_key(cfg.monitor) if val_ds is not None else None
        self.sign = 1.0 if cfg.monitor_mode == "max" else -1.0
        self.state: dict[str, Any] = {
            "global_step": 0,
            "epoch": 0,
            "batch_in_epoch": 0,  # batches of `epoch` already consumed
            "best_value": None,
            "best_step": None,
            "bad_evals": 0,
            "stopped_early": False,
            "last_eval_step": -1,
            "history": [],
        }

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.log_fn is not None and self.acc.is_main_process:
            self.log_fn(metrics, step)

    def evaluate(self) -> None:
        st = self.state
        metrics = evaluate_dataset(self.classifier, self.val_ds, self.acc, self.cfg.eval_batch_size)
        value = _lookup(metrics, self.monitor)
        entry = {"step": st["global_step"], "epoch": st["epoch"], **_scalars(metrics, "val")}
        st["history"].append(entry)
        st["last_eval_step"] = st["global_step"]
        self.log(_scalars(metrics, "val"), st["global_step"])
        best = st["best_value"]
        if value is not None and (best is None or self.sign * (value - best) > 0):
            st["best_value"], st["best_step"], st["bad_evals"] = value, st["global_step"], 0
            self.save_best(metrics)
        else:
            if value is None:
                log.warning(
                    "%s is undefined at step %d: counted as no improvement",
                    self.cfg.monitor,
                    st["global_step"],
                )
            st["bad_evals"] += 1
            patience = self.cfg.early_stopping_patience
            if patience > 0 and st["bad_evals"] >= patience:
                st["stopped_early"] = True
                log.info(
                    "early stopping at step %d: %s did not improve in %d evaluations",
                    st["global_step"],
                    self.cfg.monitor,
                    patience,
                )

    def save_best(self, metrics: dict[str, Any] | None = None) -> None:
        if self.acc.is_main_process:
            info = {
                "step": self.state["global_step"],
                "monitor": self.cfg.monitor,
                "value": self.state["best_value"],
                "metrics": metrics,
            }
            extra = {"best.json": json.dumps(info, indent=1)}
            save_trained_atomic(self.classifier, self.run_dir / "best", extra)
        self.acc.wait_for_everyone()


def fit(
    classifier: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    trainer_cfg: Any,
    run_dir: str | Path,
    accelerator: Accelerator,
    log_fn: LogFn | None = None,
    resume: bool = False,
    seed: int = 42,
) -> FitResult:
    """Train `classifier` on `train_ds`, evaluating on `val_ds`; resume from run_dir's checkpoint.

    Raises NonFiniteError (run folder marked FAILED, last good checkpoint kept) on a non-finite loss
    or gradient, and re-raises KeyboardInterrupt after saving a checkpoint (single process).
    """
    cfg, acc, run_dir = trainer_cfg, accelerator, Path(run_dir)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    loop = _Loop(classifier, val_ds, cfg, run_dir, acc, log_fn)
    if cfg.gradient_checkpointing:
        classifier.enable_gradient_checkpointing()
    labels = dataset_labels(train_ds)
    class_weights = None
    if cfg.class_weighting == "inverse_frequency":
        _check_class_weights_supported(classifier)
        class_weights = inverse_frequency_weights(labels, len(classifier.class_names))
        if cfg.sampler == "balanced":
            log.warning("trainer.sampler=balanced with class_weighting: imbalance corrected twice")
    sampler = EpochSampler(labels, seed=seed, balanced=cfg.sampler == "balanced")
    train_loader = make_loader(
        train_ds,
        functools.partial(classifier.collate, train=True),
        cfg.batch_size,
        sampler,
        cfg.num_workers,
        seed,
    )
    forward = ClassifierForward(classifier)
    optimizer = _adamw(_param_groups(classifier, cfg.weight_decay), cfg.lr)
    # accelerate shards the loader: its length is per process; a prepared scheduler steps once per
    # process per update, so its step counts are multiplied by num_processes (accelerate's way)
    forward, optimizer, train_loader = acc.prepare(forward, optimizer, train_loader)
    if len(train_loader) == 0:
        raise ValueError("the training split gives no batches (is it empty?)")
    steps_per_epoch = math.ceil(len(train_loader) / acc.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    warmup = math.ceil(cfg.warmup_ratio * total)
    scheduler = acc.prepare(
        get_scheduler(
            cfg.scheduler,
            optimizer,
            num_warmup_steps=warmup * acc.num_processes,
            num_training_steps=total * acc.num_processes,
        )
    )
    register_prepared(classifier, forward)
    if class_weights is not None:
        class_weights = class_weights.to(acc.device)
    hooks = register_trainable_hooks(acc)
    manager = CheckpointManager(run_dir, acc, cfg.keep_checkpoints)
    st = loop.state
    last_ckpt_step = -1
    if resume:
        failed = run_dir / FAILED_FILE
        if acc.is_main_process and failed.exists():
            log.warning("resume: clearing the FAILED mark of %s: %s", run_dir, failed.read_text())
            failed.unlink()
        latest = find_latest_checkpoint(run_dir)
        if latest is None:
            log.warning("resume: no complete checkpoint in %s; starting from step 0", run_dir)
        else:
            st.update(manager.load(latest))
            last_ckpt_step = st["global_step"]
            log.info("resumed from %s (step %d)", latest, st["global_step"])
    params = [p for p in forward.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf
    bar = tqdm(
        total=total,
        initial=st["global_step"],
        disable=not acc.is_local_main_process,
        desc="train",
        dynamic_ncols=True,
    )
    window: dict[str, Any] = {"loss": [], "images": 0, "start": time.perf_counter()}

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        manager.save(st["global_step"], st)
        last_ckpt_step = st["global_step"]

    def after_update(end_of_epoch: bool) -> None:
        step = st["global_step"]
        bar.update(1)
        if step % max(cfg.log_every_steps, 1) == 0 or step == total:
            elapsed = max(time.perf_counter() - window["start"], 1e-9)
            stats = {
                "train/loss": sum(window["loss"]) / len(window["loss"]),
                "train/lr": scheduler.get_last_lr()[0],
                "train/images_per_s": window["images"] / elapsed,
                "train/epoch": st["epoch"] + st["batch_in_epoch"] / len(train_loader),
            }
            bar.set_postfix(
                loss=f"{stats['train/loss']:.4f}",
                lr=f"{stats['train/lr']:.2e}",
                img_s=f"{stats['train/images_per_s']:.1f}",
            )
            loop.log(stats, step)
            window.update(loss=[], images=0, start=time.perf_counter())
        final = step >= total
        every = cfg.eval_every_steps
        due = (step % every == 0) if every > 0 else end_of_epoch
        if val_ds is not None and (due or final):
            loop.evaluate()
            forward.train()
        every = cfg.checkpoint_every_steps
        if ((step % every == 0) if every > 0 else end_of_epoch) or final:
            checkpoint()

    forward.train()
    try:
        while st["global_step"] < total and not st["stopped_early"]:
            epoch, consumed = st["epoch"], st["batch_in_epoch"]
            sampler.set_epoch(epoch)
            train_loader.set_epoch(epoch)
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            train_loader.generator.manual_seed(seed + epoch)
            loader = acc.skip_first_batches(train_loader, consumed) if consumed else train_loader
            for batch in loader:
                with acc.accumulate(forward):
                    loss = forward(batch, class_weights=class_weights)
                    losses = acc.gather(loss.detach().float().reshape(1))
                    if not bool(torch.isfinite(losses).all()):
                        raise NonFiniteError(
                            f"non-finite loss ({losses.tolist()}) at training step "
                            f"{st['global_step'] + 1} (epoch {epoch}, batch {consumed})"
                        )
                    acc.backward(loss)
                    if acc.sync_gradients:
                        norm = acc.clip_grad_norm_(params, max_norm)
                        # with fp16 the grad scaler skips inf steps itself: not an error there
                        if acc.scaler is None and norm is not None and not torch.isfinite(norm):
                            raise NonFiniteError(
                                f"non-finite gradient (norm {float(norm)}) at training step "
                                f"{st['global_step'] + 1} (epoch {epoch}): first in parameter "
                                f"{_first_nonfinite_grad(classifier)!r}"
                            )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                consumed += 1
                window["loss"].append(float(losses.mean()))
                window["images"] += len(batch["class_label"]) * acc.num_processes
                if not acc.sync_gradients:
                    continue
                # the state only moves at updates: a checkpoint always sits on an update boundary
                st["global_step"] += 1
                end_of_epoch = consumed >= len(train_loader)
                st["epoch"], st["batch_in_epoch"] = (
                    (epoch + 1, 0) if end_of_epoch else (epoch, consumed)
                )
                after_update(end_of_epoch)
                if st["global_step"] >= total or st["stopped_early"]:
                    break
        if st["global_step"] != last_ckpt_step:
            checkpoint()
        if st["best_step"] is None:
            if val_ds is not None:
                log.warning("%s was never defined: the final model is kept as best", cfg.monitor)
            st["best_step"] = st["global_step"]
            loop.save_best()
    except NonFiniteError as err:
        latest = find_latest_checkpoint(run_dir)
        message = (
            f"{err}. The run stopped; the last good checkpoint is "
            f"{latest if latest else '(none saved yet)'}. Likely causes: fp16 overflow "
            "(use precision=bf16 or fp32) or a learning rate too high (lower trainer.lr)."
        )
        if acc.is_main_process:
            mark_failed(run_dir, message)
        raise NonFiniteError(message) from None
    except KeyboardInterrupt:
        # one process only: ranks are interrupted at different points and could not agree
        if acc.num_processes == 1 and st["global_step"] != last_ckpt_step:
            log.warning("interrupted: saving a checkpoint at step %d", st["global_step"])
            acc.step = 0  # drop the unfinished accumulation: resume restarts at the update boundary
            checkpoint()
        raise
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
    acc.wait_for_everyone()
    return FitResult(
        best_dir=run_dir / "best",
        best_value=st["best_value"],
        best_step=st["best_step"],
        global_step=st["global_step"],
        stopped_early=st["stopped_early"],
        history=st["history"],
        last_checkpoint=find_latest_checkpoint(run_dir),
    )


__all__ = ["FitResult", "LogFn", "evaluate_dataset", "fit", "make_accelerator", "predict"]
