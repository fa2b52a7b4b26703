"""The files that describe a run in its folder: run_info.json, splits.csv, data_stats.json."""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = (
    "breakhis-ft",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "wandb",
    "pillow",
)
SPLITS_COLUMNS = ("path", "split", "label", "subtype", "patient", "stem", "magnification")


def _git_state() -> dict[str, Any]:
    """The commit of the code that runs and whether the work tree had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (torchrun / accelerate set RANK), or a single process.

    Decided from the environment because the run folder's files are written before the
    Accelerator exists; only this process writes them.
    """
    return int(os.environ.get("RANK", "0")) == 0


def now_iso() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_run_info(run_dir: Path, status: str, **extra: Any) -> dict[str, Any]:
    """Create or update run_info.json (git state, versions, command line, host, times, status)."""
    path = Path(run_dir) / "run_info.json"
    info: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if "start_time" not in info:
        info.update(
            start_time=now_iso(),
            git=_git_state(),
            versions=_versions(),
            command=[Path(sys.argv[0]).name, *sys.argv[1:]],
            host=socket.gethostname(),
            python=platform.python_version(),
            pid=os.getpid(),
        )
    info.update(status=status, **extra)
    if status in ("completed", "failed", "interrupted"):
        info["end_time"] = now_iso()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(path)
    return info


def write_splits_csv(path: Path, rows: list[dict], class_names: tuple[str, ...]) -> None:
    """One row per image used (from `splits.split_rows`), with the label as a class name."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SPLITS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "label": class_names[row["label"]]})


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
