"""The training loop's resumable state, its logging window, and small checks of the recipe."""

from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import get_torch_accelerator_backend
from torch import nn
from tqdm.auto import tqdm

# not part of the saved state: set by the recipe from the config
_CONFIG_FIELDS = ("monitor", "sign")


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint (trainer_state.json) and restored."""

    monitor: str | None = None  # e.g. val/balanced_accuracy; None without a validation split
    sign: float = 1.0  # +1: higher is better (monitor_mode=max), -1: lower is better
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    last_eval_step: int = -1
    # a stop came during this step's evaluation: resume runs that evaluation first
    eval_pending: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The saved part of the state."""
        return {k: v for k, v in asdict(self).items() if k not in _CONFIG_FIELDS}

    def load(self, saved: dict[str, Any]) -> None:
        """Restore a saved state (keys of `as_dict`)."""
        for key, value in saved.items():
            if key not in _CONFIG_FIELDS and hasattr(self, key):
                setattr(self, key, value)

    def advance(self, epoch: int, consumed: int, end_of_epoch: bool) -> None:
        """One optimizer update done after `consumed` batches of `epoch`."""
        self.global_step += 1
        self.epoch, self.batch_in_epoch = (epoch + 1, 0) if end_of_epoch else (epoch, consumed)

    def improves(self, value: float | None) -> bool:
        """Whether `value` of the monitored metric beats the best so far."""
        if value is None:
            return False
        return self.best_value is None or self.sign * (value - self.best_value) > 0


@dataclass
class UpdateBoundary:
    """The process state accelerate's save_state records beside the model, taken after an update.

    A stop between two updates saves the last update's checkpoint; the micro-batches run since
    then moved the random generators (dropout, augmentation) and accelerate's micro-batch count,
    so these are put back first: the checkpoint is the one an uninterrupted run saves there.
    """

    accumulation_step: int  # Accelerator.step: micro-batches counted for gradient accumulation
    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    device: Any  # the accelerator backend's generators (CUDA: one per device); None on the CPU

    @classmethod
    def capture(cls, acc: Accelerator) -> UpdateBoundary:
        """The generators and micro-batch count now (the states that save_state writes)."""
        _device_type, module = get_torch_accelerator_backend()
        device = None if module is None else _device_rng(module, get=True)
        return cls(
            acc.step, random.getstate(), np.random.get_state(), torch.get_rng_state(), device
        )

    def restore(self, acc: Accelerator) -> None:
        """Put the generators and the micro-batch count back as they were at the update."""
        acc.step = self.accumulation_step
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        _device_type, module = get_torch_accelerator_backend()
        if module is not None and self.device is not None:
            _device_rng(module, get=False, state=self.device)


def _device_rng(module: Any, get: bool, state: Any = None) -> Any:
    """Get or set a device backend's generators the way accelerate's checkpointing does."""
    if module is torch.accelerator:  # a backend torch exposes only through torch.accelerator
        module = torch.get_device_module(torch.accelerator.current_accelerator().type)
    every = hasattr(module, "get_rng_state_all")  # CUDA-like: one generator per device
    if get:
        return module.get_rng_state_all() if every else module.get_rng_state()
    return module.set_rng_state_all(state) if every else module.set_rng_state(state)


class StepWindow:
    """The progress bar and the running loss / throughput between two log lines."""

    def __init__(self, total: int, initial: int, acc: Accelerator) -> None:
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not acc.is_local_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.images = 0
        self.start = time.perf_counter()

    def add(self, loss: float, images: int) -> None:
        """One batch's mean loss and image count."""
        self.losses.append(loss)
        self.images += images

    def add_grad_norm(self, norm: float) -> None:
        """One update's gradient norm, before clipping."""
        self.grad_norms.append(norm)

    def step(self, lr: float, epoch_progress: float, due: bool) -> dict[str, float] | None:
        """Advance the bar one update; when `due`, the window's stats (then reset)."""
        self.bar.update(1)
        if not due:
            return None
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        stats = {
            "train/loss": sum(self.losses) / len(self.losses),
            "train/lr": lr,
            "train/images_per_s": self.images / elapsed,
            "train/epoch": epoch_progress,
        }
        if self.grad_norms:  # the mean over the window's updates, before clipping
            stats["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        self.bar.set_postfix(
            loss=f"{stats['train/loss']:.4f}",
            lr=f"{stats['train/lr']:.2e}",
            img_s=f"{stats['train/images_per_s']:.1f}",
        )
        self.reset()
        return stats

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def lookup_metric(metrics: dict[str, Any], monitor: str) -> float | None:
    """`val/balanced_accuracy` -> metrics["balanced_accuracy"]; None where undefined (NaN)."""
    value: Any = metrics
    for key in monitor.split("/")[1:]:
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"trainer.monitor: no metric {monitor!r} in the validation metrics")
        value = value[key]
    return None if value is None or not math.isfinite(float(value)) else float(value)


def true_class_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """`val/class_nll`: mean negative log-probability of the true class under predict_proba.

    The cross-entropy of the predicted class distribution (for MedGemma: over the classes'
    answers), so it compares across models; it is not `train/loss`, MedGemma's token-level loss.
    """
    picked = probs.float()[torch.arange(len(labels)), labels.long()]
    return float(-picked.clamp_min(1e-12).log().mean())


def eval_line(
    state: LoopState, value: float | None, class_nll: float, improved: bool, split: str = "val"
) -> str:
    """One terminal line per evaluation: the monitored value and the best so far."""
    head = f"eval step {state.global_step}: "
    if state.monitor is None:
        return head + f"{split}/class_nll {class_nll:.4f} (no model selection on {split})"
    shown = "undefined" if value is None else f"{value:.4f}"
    if improved:
        best = "new best"
    elif state.best_value is None:
        best = "no best yet"
    else:
        best = f"best {state.best_value:.4f} at step {state.best_step}"
    return head + f"{state.monitor} {shown} ({best}), {split}/class_nll {class_nll:.4f}"


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Flatten the numeric leaves of a metrics dict into `prefix/key` entries for logging."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("confusion_matrix", "classes", "auroc_undefined_classes"):
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, int | float) and value is not None:
            out[f"{prefix}/{key}"] = float(value)
    return out


def check_class_weights_supported(classifier: nn.Module) -> None:
    """Class weighting needs `loss(batch, class_weights=...)`; a clear error otherwise."""
    if "class_weights" not in inspect.signature(classifier.loss).parameters:
        raise TypeError(
            f"trainer.class_weighting: {type(classifier).__name__}.loss(batch) takes "
            "no class_weights; use trainer.class_weighting=none (or trainer.sampler=balanced)"
        )


def first_nonfinite_grad(classifier: nn.Module) -> str:
    """The name of the first parameter whose gradient holds inf or NaN."""
    for name, param in classifier.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return name
    return "<unknown parameter>"
