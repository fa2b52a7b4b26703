"""Compare run folders: what differs between the runs against their metrics, best run per group.

Reads only the files a run writes (`.hydra/*.yaml`, `run_info.json`, `FAILED`, `metrics.json`,
`metrics.jsonl`); never imports torch, so it runs anywhere the run folders are.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = (
    "test/balanced_accuracy",
    "test/f1_macro",
    "test/auroc_macro",
    "test/patient_accuracy",
)
SPLITS = ("train", "val", "test")
# keys that differ between runs without changing what was trained or measured
IGNORED_KEYS = ("paths", "resume", "logger", "model.builder", "trainer.optimizer._partial_")
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

    @property
    def last_step(self) -> int | None:
        """The last step logged in metrics.jsonl (how far a running run got)."""
        steps = [row["step"] for row in self.history if isinstance(row.get("step"), int)]
        return max(steps) if steps else None

    def value(self, key: str) -> Any:
        """A group choice, a dotted config key or a run_info key; None when absent."""
        if key in self.choices:
            return self.choices[key]
        if key in self.config:
            return self.config[key]
        return self.info.get(key)


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
    # a run killed hard (OOM killer, SIGKILL) never writes its end status
    if status == "running" and _pid_gone(info):
        return "stopped"
    return status


def _choices(run_dir: Path, overrides: list[str], config: dict[str, Any]) -> dict[str, str]:
    """Hydra group choices: hydra.yaml's runtime.choices, else the group overrides given."""
    choices: dict[str, str] = {}
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        runtime = ((_read_yaml(hydra_file) or {}).get("hydra") or {}).get("runtime") or {}
        for group, choice in (runtime.get("choices") or {}).items():
            if not str(group).startswith("hydra/") and choice is not None:
                choices[str(group)] = str(choice)
    for text in overrides:
        key, sep, value = text.lstrip("+~").partition("=")
        # a group override names a config node (model=...), not a leaf (peft.r=...)
        if sep and (isinstance(config.get(key), dict) or key in ("experiment", "hparams_search")):
            choices[key] = value
    return choices


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
    )


def metric_value(run: Run, key: str) -> float | None:
    """A metric by path, `test/balanced_accuracy` or `test/by_magnification/40/f1_macro`."""
    value: Any = run.metrics
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def normalise_metrics(names: Sequence[str], split: str = "test") -> list[str]:
    """Metric names with their split: `f1_macro` -> `test/f1_macro` (`split` when none given)."""
    return [n if n.split("/")[0] in SPLITS else f"{split}/{n}" for n in names]


def by_magnification(runs: Sequence[Run], metrics: Sequence[str]) -> list[str]:
    """Each metric followed by its per-magnification values found in any run."""
    out: list[str] = []
    for key in metrics:
        split, _, rest = key.partition("/")
        mags: set[str] = set()
        for run in runs:
            mags.update((run.metrics.get(split) or {}).get("by_magnification") or {})
        out.append(key)
        out.extend(f"{split}/by_magnification/{m}/{rest}" for m in sorted(mags, key=_natural))
    return out


def _natural(text: Any) -> tuple[int, float, str]:
    """Numbers in numeric order ("4" < "16"), then other text."""
    try:
        return (0, float(text), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(text))


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)


def differing_keys(runs: Sequence[Run], ignore: Sequence[str] = IGNORED_KEYS) -> list[str]:
    """Group choices, then config keys, whose values are not the same in every run.

    Config keys under a group whose choice differs (model.name_or_path when model differs) are
    left out, as the choice explains them, unless a run overrode that key on the command line.
    """
    if len(runs) < 2:
        return []

    def differs(values: list[Any]) -> bool:
        return len({_canon(v) for v in values}) > 1

    groups = sorted({g for r in runs for g in r.choices})
    groups = [
        g for g in groups if not _ignored(g, ignore) and differs([r.choices.get(g) for r in runs])
    ]
    overridden = {o.lstrip("+~").partition("=")[0] for r in runs for o in r.overrides}
    keys = sorted({k for r in runs for k in r.config})
    leaves = [
        k
        for k in keys
        if not _ignored(k, ignore)
        and differs([r.config.get(k) for r in runs])
        and (k in overridden or not any(k.startswith(g + ".") for g in groups))
    ]
    return groups + leaves


def _fmt_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


@dataclass
class Report:
    """The comparison table and the best run per group."""

    columns: list[str]  # run, status, last_step, differing keys..., metrics...
    rows: list[dict[str, Any]]  # sorted
    metrics: list[str]
    sort_by: str
    descending: bool
    group_by: str
    best: list[dict[str, Any]]  # one row per group: group, run, status, metrics...
    runs: list[Run]
    root: Path


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest folder that holds every path (a single run's own folder)."""
    if len(paths) == 1:
        return Path(paths[0])
    return Path(os.path.commonpath([str(p) for p in paths]))


def _eligible(row: dict[str, Any], sort_by: str) -> bool:
    # only a finished run can be a group's best: a failed one's partial figures never win
    return row["status"] == "completed" and row[sort_by] is not None


def build_report(
    runs: Sequence[Run],
    metrics: Sequence[str] = DEFAULT_METRICS,
    sort_by: str | None = None,
    descending: bool = True,
    group_by: str = "experiment_name",
    ignore: Sequence[str] = IGNORED_KEYS,
) -> Report:
    """Rows of runs x (differing settings, metrics), sorted; the best completed run per group."""
    if not runs:
        raise ValueError("no run folders found (a run folder holds run_info.json or .hydra/)")
    metrics = list(metrics)
    sort_by = sort_by or metrics[0]
    if sort_by not in metrics:
        raise ValueError(f"--sort-by {sort_by!r} is not one of the metrics {metrics}")
    if not any(run.value(group_by) is not None for run in runs):
        keys = sorted({k for r in runs for k in [*r.choices, *r.config]})
        raise ValueError(f"--group-by {group_by!r}: no run has this key; try one of {keys}")
    root = common_parent([r.path for r in runs])
    settings = differing_keys(runs, ignore)
    rows = []
    for run in runs:
        name = os.path.relpath(run.path, root) if run.path != root else run.path.name
        row: dict[str, Any] = {"run": name, "status": run.status, "last_step": run.last_step}
        row.update({k: run.value(k) for k in settings})
        row.update({m: metric_value(run, m) for m in metrics})
        row["_group"] = run.value(group_by)
        rows.append(row)
    sign = -1.0 if descending else 1.0
    # runs without the value (failed, running, no test) go last, each keeping its status
    rows.sort(key=lambda r: (r[sort_by] is None, sign * (r[sort_by] or 0.0), r["run"]))
    best: dict[str, dict[str, Any]] = {}
    for row in rows:  # sorted: the first eligible row of a group is its best
        group = _fmt_value(row["_group"]) or "(none)"
        if group not in best or (not _eligible(best[group], sort_by) and _eligible(row, sort_by)):
            best[group] = row
    best_rows = [
        {
            "group": g,
            "run": r["run"] if _eligible(r, sort_by) else "",
            "status": r["status"],
            **{m: r[m] for m in metrics},
        }
        for g, r in sorted(best.items(), key=lambda item: _natural(item[0]))
    ]
    for row in rows:
        row.pop("_group")
    columns = ["run", "status", "last_step", *settings, *metrics]
    return Report(
        columns, rows, metrics, sort_by, descending, group_by, best_rows, list(runs), root
    )


def _cell(value: Any, markdown: bool, metric: bool = False) -> str:
    if isinstance(value, float):
        if not markdown:
            return repr(value)
        # metrics to 4 places; settings such as a learning rate of 2e-05 as written
        return f"{value:.4f}" if metric else f"{value:g}"
    text = _fmt_value(value)
    if markdown:
        text = text.replace("|", "\\|") or "-"
    return text


def _md_table(
    columns: Sequence[str], rows: Sequence[dict[str, Any]], metrics: Sequence[str]
) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c), True, c in metrics) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(report: Report) -> str:
    """The report as Markdown: the comparison table, then the best run per group."""
    order = "highest" if report.descending else "lowest"
    lines = [
        f"# Runs under {report.root}",
        "",
        f"{len(report.rows)} runs, sorted by {report.sort_by} ({order} first; runs without a "
        "value last). Columns between status and the metrics are the settings that differ.",
        "",
        *_md_table(report.columns, report.rows, report.metrics),
        "",
        f"## Best run per {report.group_by} (by {report.sort_by})",
        "",
        *_md_table(["group", "run", "status", *report.metrics], report.best, report.metrics),
        "",
    ]
    return "\n".join(lines)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_cell(r.get(c), False) for c in columns] for r in rows])


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.csv and report_best.csv into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "best_csv": out / "report_best.csv",
    }
    paths["markdown"].write_text(to_markdown(report))
    _write_csv(paths["csv"], report.columns, report.rows)
    _write_csv(paths["best_csv"], ["group", "run", "status", *report.metrics], report.best)
    return paths
