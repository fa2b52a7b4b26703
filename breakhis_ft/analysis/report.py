"""Compare run folders: what differs between the runs against their metrics, best run per group.

Run folders are read by `runs.py`; this module never imports torch either.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breakhis_ft.analysis.aggregate import CVGroup, cv_markdown, format_interval, write_cv_csv
from breakhis_ft.analysis.gallery import PAIRS_SHOWN, run_confused_pairs
from breakhis_ft.analysis.runs import Run, metric_interval, metric_value
from breakhis_ft.evaluate.compare import separable

DEFAULT_METRICS = (
    "test/balanced_accuracy",
    "test/f1_macro",
    "test/auroc_macro",
    "test/patient_recognition_rate",
)
SPLITS = ("train", "val", "test")
# keys that differ between runs without changing what was trained or measured
IGNORED_KEYS = ("paths", "resume", "logger", "model.builder", "trainer.optimizer._partial_")
VS_BEST = "vs best"  # the column saying whether a run's interval overlaps the best run's


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
    # run name -> metric -> its stored (lo, hi), or None: shown beside the value
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    rows, intervals = [], {}
    for run in runs:
        name = os.path.relpath(run.path, root) if run.path != root else run.path.name
        row: dict[str, Any] = {"run": name, "status": run.status, "last_step": run.last_step}
        row.update({k: run.value(k) for k in settings})
        row.update({m: metric_value(run, m) for m in metrics})
        intervals[name] = {m: metric_interval(run, m) for m in metrics}  # beside the value
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
    if mark_separability(rows, sort_by, intervals):
        columns.append(VS_BEST)
    report = Report(
        columns, rows, metrics, sort_by, descending, group_by, best_rows, list(runs), root
    )
    report.intervals = intervals
    return report


def mark_separability(
    rows: list[dict[str, Any]], metric: str, intervals: dict[str, dict[str, Any]]
) -> bool:
    """Mark each row `best`, `not separable` (its interval of `metric` overlaps the best run's)
    or `separable` under VS_BEST; False (nothing marked) when the best run has no interval.

    The best run is the first completed row with a value (rows are sorted). Overlapping
    intervals of runs on the same test images are a coarse test; `report.py --compare A B`
    (a paired bootstrap) is the sharper one.
    """
    best = next((r for r in rows if _eligible(r, metric)), None)
    best_ci = intervals.get(best["run"], {}).get(metric) if best else None
    if best is None or best_ci is None:
        return False
    for row in rows:
        ci = intervals.get(row["run"], {}).get(metric)
        if row is best:
            row[VS_BEST] = "best"
        elif ci is not None:
            row[VS_BEST] = "separable" if separable(ci, best_ci) else "not separable"
    return True


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
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    intervals: dict[str, dict[str, Any]],
) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        ci = intervals.get(row.get("run"), {})
        cells = [
            format_interval(row[c], ci.get(c))
            if c in metrics and isinstance(row.get(c), float)
            else _cell(row.get(c), True, c in metrics)
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def errors_section(report: Report, galleries: dict[Path, str] | None = None) -> list[str]:
    """Markdown lines: each run's most confused test class pairs, and a link to its error gallery
    (`galleries`: run folder -> the gallery page, relative to the report's folder)."""
    title = f"## Most confused class pairs (test; true -> predicted: count, top {PAIRS_SHOWN})"
    lines = [title, ""]
    for run in report.runs:
        name = os.path.relpath(run.path, report.root) if run.path != report.root else run.path.name
        pairs = run_confused_pairs(run.metrics)
        text = ", ".join(f"{p['true']} -> {p['pred']}: {p['count']}" for p in pairs)
        page = (galleries or {}).get(run.path)
        link = f" ([errors]({page}))" if page else ""
        lines.append(f"- {name}: {text or 'no errors or no test metrics'}{link}")
    return [*lines, ""]


def to_markdown(report: Report, galleries: dict[Path, str] | None = None) -> str:
    """The report as Markdown: the comparison table, the best run per group, the confused class
    pairs of each run (with a link to its error gallery where `galleries` has one)."""
    order = "highest" if report.descending else "lowest"
    best_columns = ["group", "run", "status", *report.metrics]
    lines = [
        f"# Runs under {report.root}",
        "",
        f"{len(report.rows)} runs, sorted by {report.sort_by} ({order} first; runs without a "
        "value last). Columns between status and the metrics are the settings that differ.",
        "",
        *_md_table(report.columns, report.rows, report.metrics, report.intervals),
        "",
        f"## Best run per {report.group_by} (by {report.sort_by})",
        "",
        *_md_table(best_columns, report.best, report.metrics, report.intervals),
        "",
        *errors_section(report, galleries),
    ]
    return "\n".join(lines)


def _with_interval_columns(
    columns: Sequence[str], rows: Sequence[dict[str, Any]], intervals: dict[str, dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """CSV columns `<metric>_ci_lo` / `_ci_hi` for the metrics that have intervals."""

    def interval(row: dict[str, Any], column: str) -> Any:
        return intervals.get(row.get("run"), {}).get(column)

    shown = [c for c in columns if any(interval(r, c) for r in rows)]
    extra = [f"{c}_ci_{end}" for c in shown for end in ("lo", "hi")]
    out = []
    for row in rows:
        row = dict(row)
        for c in shown:
            ci = interval(row, c) or (None, None)
            row[f"{c}_ci_lo"], row[f"{c}_ci_hi"] = ci
        out.append(row)
    return [*columns, *extra], out


def _write_csv(
    path: Path,
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    intervals: dict[str, dict[str, Any]],
) -> None:
    columns, rows = _with_interval_columns(columns, rows, intervals)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_cell(r.get(c), False) for c in columns] for r in rows])


def write_report(
    report: Report,
    out_dir: str | Path,
    galleries: dict[Path, str] | None = None,
    cv: Sequence[CVGroup] = (),
) -> dict[str, Path]:
    """Write report.md, report.csv and report_best.csv (and report_cv.csv for cross-validated
    groups) into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "best_csv": out / "report_best.csv",
    }
    paths["markdown"].write_text(to_markdown(report, galleries) + cv_markdown(cv, report.metrics))
    _write_csv(paths["csv"], report.columns, report.rows, report.intervals)
    best_columns = ["group", "run", "status", *report.metrics]
    _write_csv(paths["best_csv"], best_columns, report.best, report.intervals)
    if cv:
        paths["cv_csv"] = out / "report_cv.csv"
        write_cv_csv(paths["cv_csv"], cv, report.metrics)
    return paths
