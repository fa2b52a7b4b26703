"""The PyTorch profiler over a few training updates (`trainer.profile_steps`, `debug=profile`).

The trace (Chrome trace format: open it in https://ui.perfetto.dev or chrome://tracing) and a table
of the most expensive operators are written into the run folder's `profile/`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)

WAIT, WARMUP = 1, 1  # updates skipped, then traced but discarded, before the recorded ones


def _write_trace(out_dir: Path) -> Any:
    def on_trace_ready(prof: torch.profiler.profile) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        trace = out_dir / f"trace_step{prof.step_num}.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        (out_dir / "operators.txt").write_text(table + "\n")
        log.info("profiler: trace %s, top operators in %s", trace, out_dir / "operators.txt")

    return on_trace_ready


def step_profiler(out_dir: Path, steps: int, acc: Accelerator) -> contextlib.AbstractContextManager:
    """A profiler to `.step()` after each update (main process only), or a null context (None)."""
    if steps <= 0 or not acc.is_main_process:
        return contextlib.nullcontext(None)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=steps, repeat=1),
        on_trace_ready=_write_trace(Path(out_dir)),
        profile_memory=True,
    )
