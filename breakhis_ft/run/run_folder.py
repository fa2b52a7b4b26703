"""The files that describe a run in its folder: run_info.json, splits.csv, data_stats.json."""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from breakhis_ft.run.secrets import mask_secrets

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
FINAL_STATUSES = ("completed", "failed", "interrupted")
# what the last end wrote; a resume moves it into its history entry
_END_KEYS = ("status", "step", "signal", "end_time", "optimized_metric", "value")
_command_line: list[str] | None = None  # the command as typed (cli.main rewrites sys.argv)


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


def set_command_line(argv: list[str]) -> None:
    """Record the command line as the user typed it, before the entrypoint rewrites sys.argv."""
    global _command_line
    _command_line = [Path(argv[0]).name, *argv[1:]]


def command_line() -> list[str]:
    """The command of this process, with the values of secret-looking overrides masked."""
    return mask_secrets(_command_line or [Path(sys.argv[0]).name, *sys.argv[1:]])


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run_info.json of a run folder ({} when absent)."""
    path = Path(run_dir) / "run_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_info(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Set top-level fields of run_info.json (atomically); returns the whole record."""
    info = {**read_run_info(run_dir), **fields}
    write_json(Path(run_dir) / "run_info.json", info)
    return info


def write_run_info(run_dir: Path, status: str, **extra: Any) -> dict[str, Any]:
    """Create or update run_info.json (git state, versions, command line, host, times, status)."""
    info = read_run_info(run_dir)
    if "start_time" not in info:
        info.update(
            start_time=now_iso(),
            git=_git_state(),
            versions=_versions(),
            command=command_line(),
            host=socket.gethostname(),
            python=platform.python_version(),
            pid=os.getpid(),
        )
    info.update(status=status, **extra)
    if status in FINAL_STATUSES:
        info["end_time"] = now_iso()
    write_json(Path(run_dir) / "run_info.json", info)
    return info


def record_resume(run_dir: Path, from_step: int) -> dict[str, Any]:
    """Append this resume to run_info.json's `history` (time, command, step it continues from and
    how the previous attempt ended); the original command and start time stay as they were."""
    info = read_run_info(run_dir)
    previous = {k: info.pop(k) for k in _END_KEYS if k in info}
    info.setdefault("history", []).append(
        {
            "time": now_iso(),
            "command": command_line(),
            "from_step": from_step,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "git": _git_state(),
            "previous": previous,
        }
    )
    info.update(status="running", host=socket.gethostname(), pid=os.getpid())  # alive again
    write_json(Path(run_dir) / "run_info.json", info)
    return info


def mask_saved_config(*files: Path) -> list[Path]:
    """Mask secret-looking values in the YAML files Hydra saved (.hydra/config.yaml,
    overrides.yaml, hydra.yaml, multirun.yaml); a file without any is left byte-identical.
    Returns the files rewritten."""
    changed = []
    for path in files:
        if not path.is_file():
            continue
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        masked = mask_secrets(saved)
        if masked != saved:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # sweep jobs may race
            tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(masked)))
            tmp.replace(path)
            changed.append(path)
    return changed


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


def group_choices(runtime: Mapping[str, Any], depth: int = 0) -> dict[str, str]:
    """The config-group choices in Hydra's `runtime` record (hydra.yaml's `hydra.runtime`).

    A `rerun=` / `resume=` job is composed from a saved config.yaml, which has no groups: its
    choices are those of the run whose .hydra folder it was composed from (followed, 5 deep)."""
    choices = {
        str(group): str(choice)
        for group, choice in (runtime.get("choices") or {}).items()
        if not str(group).startswith("hydra/") and choice is not None
    }
    if choices or depth >= 5:
        return choices
    for source in runtime.get("config_sources") or []:
        saved = Path(str(source.get("path", ""))) / "hydra.yaml"
        if source.get("provider") == "main" and source.get("schema") == "file" and saved.is_file():
            record = OmegaConf.to_container(OmegaConf.load(saved)).get("hydra") or {}
            return group_choices(record.get("runtime") or {}, depth + 1)
    return {}
