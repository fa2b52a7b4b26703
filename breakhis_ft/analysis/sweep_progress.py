"""Where a sweep shared by the tasks of an array job stands: its plan (`sweep_plan.json`, written
by launcher=array) against the job folders found, for a report read while the tasks run.

Every planned job is counted by its status (completed, running, failed, interrupted, stopped, or
not started: no folder, or no run_info.json yet); the jobs not completed are listed with the task
that runs them, their host and how long ago their folder was last written, which tells a running
job on another machine (its lock does not show over a bucket mount) from one whose task died.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from breakhis_ft.analysis.runs import Run
from breakhis_ft.run.array import PLAN_FILE

NOT_STARTED = "not started"
_ORDER = ("completed", "running", "interrupted", "failed", "stopped", NOT_STARTED)


def _last_written(folder: Path) -> float | None:
    """The newest modification time among a folder's files (its log is written as it runs)."""
    times = [p.stat().st_mtime for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    return max(times) if times else None


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _swept(jobs: list[dict[str, Any]]) -> list[set[str]]:
    """Each job's overrides that are not the same in every job (what the sweep varies)."""
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if jobs else set()
    return [set(j["overrides"]) - common for j in jobs]


def sweep_folders(runs: Sequence[Run]) -> list[Path]:
    """The sweep folders with a plan among the runs' parent folders."""
    return sorted({r.path.parent for r in runs if (r.path.parent / PLAN_FILE).is_file()})


def progress_lines(sweep_dir: Path, runs: Sequence[Run], now: float | None = None) -> list[str]:
    """Markdown: the sweep's jobs counted by status, and a table of the ones not completed."""
    plan = json.loads((sweep_dir / PLAN_FILE).read_text())
    jobs = plan.get("jobs") or []
    by_path = {r.path.resolve(): r for r in runs}
    now = time.time() if now is None else now
    rows, counts = [], Counter()
    for job, swept in zip(jobs, _swept(jobs), strict=True):
        folder = (sweep_dir / job["folder"]).resolve()
        run = by_path.get(folder)
        status = run.status if run is not None and run.info else NOT_STARTED
        counts[status] += 1
        if status == "completed":
            continue
        written = _last_written(folder)
        rows.append(
            f"| {job['folder']} | {job['task']} | {status} | "
            f"{run.last_step if run is not None and run.last_step is not None else '-'} | "
            f"{(run.info.get('host') if run is not None else None) or '-'} | "
            f"{_ago(now - written) if written is not None else '-'} | "
            f"{' '.join(sorted(swept)) or '-'} |"
        )
    shown = [f"{counts[s]} {s}" for s in _ORDER if counts[s]]
    shown += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in _ORDER]
    lines = [
        f"## Sweep {sweep_dir.name}: {len(jobs)} jobs for {plan.get('task_count')} tasks",
        "",
        f"{', '.join(shown)} ({sweep_dir / PLAN_FILE}).",
        "",
    ]
    if rows:
        lines += [
            "| job | task | status | last step | host | last written | swept |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    return lines


def sweeps_markdown(runs: Sequence[Run]) -> list[str]:
    """The progress of every planned sweep among the runs (nothing when there is none)."""
    return [line for folder in sweep_folders(runs) for line in progress_lines(folder, runs)]
