"""Read run folders: config, group choices, status, metrics and history of each run.

Reads only the files a run writes (`.hydra/*.yaml`, `run_info.json`, `FAILED`, `metrics.json`,
`metrics.jsonl`); never imports torch, so it runs anywhere the run folders are.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from breakhis_ft.run.ownership import LOCK_FILE, is_held
from breakhis_ft.run.run_folder import group_choices

# folders inside a run that never hold another run: skipping them keeps the scan fast
_NOT_RUNS = {"checkpoints", "best", "wandb", ".hydra", "__pycache__"}


@dataclass
class Run:
    """What one run folder says about itself."""

    path: Path
    status: str  # completed | failed | running | interrupted | stopped | unknown
    config: dict[str, Any]  # flattened: {"peft.r": 8, ...}
    choices: dict[str, str]  # Hydra group choices: {"model": "tiny_gemma3", ...}
    overrides: list[str]
    metrics: dict[str, Any]  # metrics.json as written
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    info: dict[str, Any] = field(default_factory=dict)  # run_info.json
    checkpoint_steps: list[int] = field(default_factory=list)  # of its complete checkpoints

    @property
    def last_step(self) -> int | None:
        """How far the run got: the last step logged in metrics.jsonl, or of a checkpoint or an
        interruption when later (a run stopped before it logged its steps)."""
        steps = [row["step"] for row in self.history if isinstance(row.get("step"), int)]
        steps += self.checkpoint_steps
        if isinstance(self.info.get("step"), int):
            steps.append(self.info["step"])
        return max(steps) if steps else None

    def value(self, key: str) -> Any:
        """A group choice, a dotted config key or a run_info key; None when absent."""
        if key in self.choices:
            return self.choices[key]
        if key in self.config:
            return self.config[key]
        return self.info.get(key)


def resampled_unit(runs: Iterable[Run]) -> str:
    """The unit the runs' intervals resample: `stem` unless every run grouped its split by
    patient folder (`split.group_by=patient`, or a saved config without the key)."""
    group_by = {str(run.config.get("split.group_by", "patient")) for run in runs}
    return "patient" if group_by == {"patient"} else "stem"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists and scalars are leaves."""
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err}); is the run folder damaged?") from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); is the run folder damaged?") from err


def _read_history(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a partial last line (a run writing now, or killed) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _pid_gone(info: dict[str, Any]) -> bool:
    """True when run_info names a process on this host that no longer exists."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def _status(run_dir: Path, info: dict[str, Any]) -> str:
    if (run_dir / "FAILED").exists():
        return "failed"
    status = str(info.get("status", "unknown")) if info else "unknown"
    # a run killed hard (OOM killer, SIGKILL) never writes its end status: a running run whose
    # folder no live process holds has stopped. The lock of a run on another machine shows only
    # over a shared file system that carries locks (NFSv4), not over a bucket mount: such a run
    # stays `running`, and its last write tells more (sweep_progress)
    if status == "running" and not is_held(run_dir):
        here = info.get("host") == socket.gethostname()
        if _pid_gone(info) or (here and (run_dir / LOCK_FILE).exists()):
            return "stopped"
    return status


def _choices(run_dir: Path, overrides: list[str], config: dict[str, Any]) -> dict[str, str]:
    """Hydra group choices: hydra.yaml's (a rerun's: its source run's), else the group overrides."""
    choices: dict[str, str] = {}
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        runtime = ((_read_yaml(hydra_file) or {}).get("hydra") or {}).get("runtime") or {}
        choices = group_choices(runtime)
    for text in overrides:
        key, sep, value = text.lstrip("+~").partition("=")
        # a group override names a config node (model=...), not a leaf (peft.r=...)
        if sep and (isinstance(config.get(key), dict) or key in ("experiment", "hparams_search")):
            choices[key] = value
    return choices


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the run's complete checkpoints (checkpoints/step_N/ with its trainer state;
    engine/checkpoint.py writes them), read without importing torch."""
    found = (run_dir / "checkpoints").glob("step_*/trainer_state.json")
    return sorted(int(p.parent.name[5:]) for p in found if p.parent.name[5:].isdigit())


def is_run_dir(path: Path) -> bool:
    """A run folder holds run_info.json or Hydra's .hydra/config.yaml."""
    return (path / "run_info.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders: each path is a run folder or a folder searched recursively for them."""
    found: list[Path] = []
    for root in map(Path, paths):
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder (give run folders or a parent folder)")
        if is_run_dir(root):
            found.append(root)
            continue
        for current, dirs, _files in os.walk(root):
            here = Path(current)
            if is_run_dir(here):
                found.append(here)
                dirs.clear()  # a run does not nest runs
            else:
                dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS)
    return sorted(dict.fromkeys(p.resolve() for p in found))


def load_run(run_dir: str | Path) -> Run:
    """Read one run folder; missing files give empty fields (a run that just started)."""
    run_dir = Path(run_dir)
    hydra = run_dir / ".hydra"
    config = _read_yaml(hydra / "config.yaml") if (hydra / "config.yaml").exists() else {}
    overrides = _read_yaml(hydra / "overrides.yaml") if (hydra / "overrides.yaml").exists() else []
    info = _read_json(run_dir / "run_info.json") if (run_dir / "run_info.json").exists() else {}
    metrics_file = run_dir / "metrics.json"
    metrics = _read_json(metrics_file) if metrics_file.exists() else {}
    config = config or {}
    overrides = [str(o) for o in overrides or []]
    return Run(
        path=run_dir,
        status=_status(run_dir, info),
        config=flatten(config),
        choices=_choices(run_dir, overrides, config),
        overrides=overrides,
        metrics=metrics or {},
        history=_read_history(run_dir / "metrics.jsonl"),
        info=info or {},
        checkpoint_steps=_checkpoint_steps(run_dir),
    )


# metrics.json keys renamed since; runs written before keep the old name
_OLD_NAMES = {"patient_recognition_rate": "patient_accuracy"}


def _lookup(metrics: dict[str, Any], key: str) -> Any:
    """The value at a `/`-separated path of metrics.json, or None."""
    value: Any = metrics
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def metric_value(run: Run, key: str) -> float | None:
    """A metric by path, `test/balanced_accuracy` or `test/by_magnification/40/f1_macro`."""
    value = _lookup(run.metrics, key)
    parent, _, leaf = key.rpartition("/")
    if value is None and leaf in _OLD_NAMES:
        value = _lookup(run.metrics, f"{parent}/{_OLD_NAMES[leaf]}" if parent else _OLD_NAMES[leaf])
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def metric_interval(run: Run, key: str) -> tuple[float, float] | None:
    """The stored interval of a metric (`test/balanced_accuracy` -> its `_ci95`), or None."""
    parent, _, leaf = key.rpartition("/")
    block = _lookup(run.metrics, parent) if parent else run.metrics
    if not isinstance(block, dict):
        return None
    pattern = re.compile(rf"{re.escape(leaf)}_ci[0-9.]+")
    for name, value in block.items():
        if pattern.fullmatch(name) and isinstance(value, list) and len(value) == 2:
            if all(isinstance(v, int | float) for v in value):
                return float(value[0]), float(value[1])
    return None
