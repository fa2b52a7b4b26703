"""`trainer.batch_size=auto` resolved once per run, before the data and the model load.

The chosen micro-batch and gradient accumulation replace `auto` in the run's config object, which
every later stage reads (the data's overfit subset, the Accelerator, the recipe, the W&B config);
the choice and its reason go to the log and to run_info.json (`batch_plan`). A resumed run trains
with the plan its folder recorded: its checkpoints count batches of that size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from breakhis_ft.run.run_folder import read_run_info, update_run_info

if TYPE_CHECKING:
    from breakhis_ft.vram.plan import BatchPlan

log = logging.getLogger(__name__)


def memory_budget(cfg: DictConfig) -> tuple[int, str, str]:
    """(bytes, where the figure comes from, the estimator's device) of the run's memory budget:
    trainer.memory_budget_gib, else the CUDA device's free memory."""
    import torch

    from breakhis_ft.vram.estimate import GIB

    on_gpu = torch.cuda.is_available() and not cfg.trainer.cpu
    device = "cuda" if on_gpu else "cpu"
    if cfg.trainer.memory_budget_gib is not None:
        return int(float(cfg.trainer.memory_budget_gib) * GIB), "trainer.memory_budget_gib", device
    free, total = torch.cuda.mem_get_info()  # validate.py refuses auto without a GPU or budget
    name = torch.cuda.get_device_name()
    return free, f"free memory of {name}, {free / GIB:.2f} of {total / GIB:.2f} GiB", device


def resolve_batch_size(cfg: DictConfig, run_dir: Path, main: bool = True) -> BatchPlan | None:
    """With trainer.batch_size=auto: choose (or, on resume, reuse) the plan, write its sizes into
    `cfg.trainer` and record it (`main`: this process writes run_info.json); None otherwise."""
    if str(cfg.trainer.batch_size) != "auto":
        return None
    from breakhis_ft.vram.plan import BatchPlan, plan_batch_size  # heavy: transformers

    saved = read_run_info(run_dir).get("batch_plan") if cfg.resume is not None else None
    if saved:
        plan = BatchPlan.from_dict(saved)
        log.info("resume: the batch size this run chose at its start: %s", plan.reason())
    else:
        budget, source, device = memory_budget(cfg)
        plan = plan_batch_size(cfg, budget, source, device)
        log.info(plan.reason())
    cfg.trainer.batch_size = plan.batch_size
    cfg.trainer.grad_accum = plan.grad_accum
    if main:
        update_run_info(run_dir, batch_plan=plan.as_dict())
    return plan
