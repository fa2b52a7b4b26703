"""`trainer.batch_size=auto`: the largest micro-batch whose estimated memory fits a budget.

The candidates are the divisors of `trainer.effective_batch_size` (micro-batches a process runs
per optimizer update, times their size), largest first, so gradient accumulation
(`effective / micro-batch`) keeps the effective batch exactly. A candidate fits when its
`estimate_vram` total plus the headroom is within the budget. The headroom: HEADROOM_FRACTION of
the estimate (the estimator's accuracy target against a measured peak) plus HEADROOM_GIB (the
allocator's cache and fragmentation, cuBLAS/cuDNN workspaces: memory PyTorch holds beyond what it
allocates). The budget is `trainer.memory_budget_gib` when given, else the free memory of the
CUDA device (`torch.cuda.mem_get_info`, read once before the model loads).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from breakhis_ft.errors import DeviceError
from breakhis_ft.vram.estimate import GIB, VramEstimate, estimate_vram

log = logging.getLogger(__name__)

HEADROOM_FRACTION = 0.15  # of the estimate: its target accuracy (within 15% of the measurement)
HEADROOM_GIB = 0.5  # beyond what PyTorch allocates: allocator cache, fragmentation, workspaces
AUTO = "auto"

Estimator = Callable[..., VramEstimate]  # (cfg, device=...) -> VramEstimate, as estimate_vram


class MemoryBudgetError(DeviceError):
    """Not even a micro-batch of 1 fits the memory budget; the message names the options (a
    DeviceError: the entrypoint ends on its message, exit status 5)."""


@dataclass(frozen=True)
class BatchPlan:
    """The micro-batch and accumulation `batch_size=auto` chose, and why."""

    batch_size: int  # per process micro-batch
    grad_accum: int  # micro-batches per optimizer update
    effective_batch_size: int  # batch_size x grad_accum (per process)
    budget_gib: float
    budget_source: str  # trainer.memory_budget_gib, or the device's free memory
    needed_gib: dict[int, float]  # each micro-batch tried -> estimate + headroom, GiB
    headroom: str  # the rule, in words

    def reason(self) -> str:
        """One line: what was chosen, what it needs, the budget and the next size's need."""
        bigger = [b for b in self.needed_gib if b > self.batch_size]
        over = (
            f"; {min(bigger)} would need {self.needed_gib[min(bigger)]:.3f} GiB"
            if bigger
            else " (the whole effective batch)"
        )
        return (
            f"trainer.batch_size=auto: micro-batch {self.batch_size} x grad_accum "
            f"{self.grad_accum} (effective {self.effective_batch_size}) needs "
            f"{self.needed_gib[self.batch_size]:.3f} GiB of the {self.budget_gib:.3f} GiB budget "
            f"({self.budget_source}){over}; headroom: {self.headroom}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (run_info.json's `batch_plan`)."""
        out = asdict(self)
        out["needed_gib"] = {str(b): gib for b, gib in self.needed_gib.items()}
        out["reason"] = self.reason()
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> BatchPlan:
        """A plan recorded by `as_dict` (what a resumed run trains with again)."""
        fields = {k: v for k, v in saved.items() if k != "reason"}
        fields["needed_gib"] = {int(b): gib for b, gib in saved["needed_gib"].items()}
        return cls(**fields)


def needed_bytes(estimate: VramEstimate) -> int:
    """An estimate's total plus the headroom."""
    return int(estimate.total_bytes * (1 + HEADROOM_FRACTION) + HEADROOM_GIB * GIB)


def plan_batch_size(
    cfg: Any,
    budget_bytes: int,
    budget_source: str,
    device: str = "cuda",
    estimate: Estimator | None = None,
) -> BatchPlan:
    """The largest divisor of trainer.effective_batch_size whose estimate + headroom fits the
    budget (`cfg` is the composed run config; it is not changed; `estimate`: estimate_vram)."""
    estimate = estimate_vram if estimate is None else estimate
    effective = int(cfg.trainer.effective_batch_size)
    trial = copy.deepcopy(cfg)
    needed: dict[int, float] = {}
    for size in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        trial.trainer.batch_size = size
        need = needed_bytes(estimate(trial, device=device))
        needed[size] = round(need / GIB, 4)
        if need <= budget_bytes:
            return BatchPlan(
                batch_size=size,
                grad_accum=effective // size,
                effective_batch_size=effective,
                budget_gib=round(budget_bytes / GIB, 4),
                budget_source=budget_source,
                needed_gib=dict(sorted(needed.items())),
                headroom=f"{HEADROOM_FRACTION:.0%} of the estimate + {HEADROOM_GIB} GiB",
            )
    raise MemoryBudgetError(
        f"trainer.batch_size=auto: even a micro-batch of 1 needs {needed[1]:.3f} GiB "
        f"(estimate + headroom), over the {budget_bytes / GIB:.3f} GiB budget ({budget_source}); "
        "lower the memory (trainer.gradient_checkpointing=true, peft=qlora, a smaller "
        "data.image_size), raise trainer.memory_budget_gib, or use a larger GPU"
    )
