"""Compare run folders: what differs between the runs against their metrics, best run per group.

Runs are ranked, and each group's best picked, by each run's `optimized_metric` (a validation
metric, recorded in its config and run_info.json): comparing runs never selects on test. Test
metrics are shown beside it. Run folders are read by `runs.py`; this module never imports torch.
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
from breakhis_ft.analysis.comparison import VS_BEST, mark_separability
from breakhis_ft.analysis.gallery import errors_section
from breakhis_ft.analysis.leaderboard import eva_summaries, leaderboard_markdown
from breakhis_ft.analysis.runs import Run, metric_interval, metric_value
from breakhis_ft.analysis.sweep_progress import sweeps_markdown

DEFAULT_METRICS = (
    "test/balanced_accuracy",
    "test/f1_macro",
    "test/auroc_macro",
    "test/patient_recognition_rate",
)
SPLITS = ("train", "val", "test")
# the default criterion: the value of each run's own optimized_metric (validation)
SELECTION = "selection"
SELECTED_BY = "selected_by"  # the name of that metric, a column when runs name different ones
# keys that differ between runs without changing what was trained or measured
IGNORED_KEYS = ("paths", "resume", "logger", "model.builder", "trainer.optimizer._partial_")


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

    columns: list[str]  # run, status, last_step, differing keys..., selection, metrics...
    rows: list[dict[str, Any]]  # sorted
    metrics: list[str]  # the numeric columns: the criterion first, then the metrics shown
    sort_by: str
    descending: bool
    group_by: str
    best: list[dict[str, Any]]  # one row per group: group, run, status, metrics...
    runs: list[Run]
    root: Path
    criterion: str = ""  # what sort_by stands for (each run's optimized_metric, named)
    warnings: list[str] = field(default_factory=list)  # splits missing classes, etc.
    # run name -> metric -> its stored (lo, hi), or None: shown beside the value
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: list[str] = field(default_factory=list)  # the differing keys among the columns


def optimized_metric(run: Run) -> str | None:
    """The validation metric a run optimised (its config, else run_info.json)."""
    name = run.config.get("optimized_metric") or run.info.get("optimized_metric")
    return None if name is None else str(name)


def check_criterion(sort_by: str) -> None:
    """Refuse a test metric as the criterion: comparing runs never selects on test."""
    if sort_by.split("/")[0] == "test":
        raise ValueError(
            f"--sort-by {sort_by}: comparing runs never selects on test; sort by a validation "
            "metric (val/...) or leave it out to use each run's optimized_metric"
        )


def split_warnings(run: Run, name: str) -> list[str]:
    """Classes without any image (so without a patient) in a run's validation or test split."""
    out = []
    for split in ("val", "test"):
        per_class = (run.metrics.get(split) or {}).get("per_class") or {}
        absent = [c for c, pc in per_class.items() if not pc.get("support")]
        if absent:
            out.append(
                f"{name}: no patient of {', '.join(absent)} in {split}: their {split} figures "
                "are undefined, and the split's macro averages cover the other classes only"
            )
    if run.status == "completed" and run.metrics and "val" not in run.metrics:
        out.append(f"{name}: no validation split: nothing selects this run (its criterion is -)")
    return out


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest folder that holds every path (a single run's own folder)."""
    if len(paths) == 1:
        return Path(paths[0])
    return Path(os.path.commonpath([str(p) for p in paths]))


def _eligible(row: dict[str, Any], sort_by: str) -> bool:
    # only a finished run can be a group's best: a failed one's partial figures never win
    return row["status"] == "completed" and row[sort_by] is not None


def _row_name(run: Run, root: Path) -> str:
    """A run's name in the table: its folder relative to the runs' common parent."""
    return os.path.relpath(run.path, root) if run.path != root else run.path.name


def _rows(
    runs: Sequence[Run], settings: list[str], metrics: list[str], group_by: str
) -> tuple[list[dict[str, Any]], Path, dict[str, dict[str, Any]]]:
    """One row per run: settings, criterion (name and value), metrics; the common parent; the
    stored intervals by run and column."""
    root = common_parent([r.path for r in runs])
    rows: list[dict[str, Any]] = []
    intervals: dict[str, dict[str, Any]] = {}  # run name -> column -> (lo, hi) or None
    for run in runs:
        row: dict[str, Any] = {
            "run": _row_name(run, root),
            "status": run.status,
            "last_step": run.last_step,
        }
        row.update({k: run.value(k) for k in settings})
        criterion = optimized_metric(run)
        row[SELECTED_BY] = criterion
        row[SELECTION] = metric_value(run, criterion) if criterion else None
        row.update({m: metric_value(run, m) for m in metrics})
        shown = {m: metric_interval(run, m) for m in metrics}  # beside the value
        shown[SELECTION] = metric_interval(run, criterion) if criterion else None
        intervals[row["run"]] = shown
        row["_group"] = run.value(group_by)
        rows.append(row)
    return rows, root, intervals


def _best_per_group(rows: list[dict[str, Any]], sort_by: str, metrics: list[str]) -> list[dict]:
    """The first eligible row of each group (rows are sorted), groups in natural order."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = _fmt_value(row["_group"]) or "(none)"
        if group not in best or (not _eligible(best[group], sort_by) and _eligible(row, sort_by)):
            best[group] = row
    return [
        {
            "group": g,
            "run": r["run"] if _eligible(r, sort_by) else "",
            "status": r["status"],
            **{m: r[m] for m in metrics},
        }
        for g, r in sorted(best.items(), key=lambda item: _natural(item[0]))
    ]


def build_report(
    runs: Sequence[Run],
    metrics: Sequence[str] = DEFAULT_METRICS,
    sort_by: str | None = None,
    descending: bool = True,
    group_by: str = "experiment_name",
    ignore: Sequence[str] = IGNORED_KEYS,
) -> Report:
    """Rows of runs x (differing settings, criterion, metrics), sorted by the criterion (each
    run's optimized_metric unless `sort_by` names a validation metric); best completed run per
    group by the same criterion."""
    if not runs:
        raise ValueError("no run folders found (a run folder holds run_info.json or .hydra/)")
    metrics = list(metrics)
    if sort_by is not None:
        check_criterion(sort_by)
        metrics = [sort_by, *(m for m in metrics if m != sort_by)]  # the criterion first
    if not any(run.value(group_by) is not None for run in runs):
        keys = sorted({k for r in runs for k in [*r.choices, *r.config]})
        raise ValueError(f"--group-by {group_by!r}: no run has this key; try one of {keys}")
    settings = differing_keys(runs, ignore)
    rows, root, intervals = _rows(runs, settings, metrics, group_by)
    names = sorted({str(r[SELECTED_BY]) for r in rows if r[SELECTED_BY]})
    criterion = sort_by or f"each run's optimized_metric ({', '.join(names) or 'none recorded'})"
    key = sort_by or SELECTION
    sign = -1.0 if descending else 1.0
    # runs without the value (failed, running, no validation) go last, each keeping its status
    rows.sort(key=lambda r: (r[key] is None, sign * (r[key] or 0.0), r["run"]))
    numeric = [SELECTION, *metrics]
    best = _best_per_group(rows, key, numeric)
    for row in rows:
        row.pop("_group")
    shown = [SELECTED_BY] if len(names) > 1 else []
    columns = ["run", "status", "last_step", *settings, *shown, *numeric]
    if mark_separability(rows, key, intervals):
        columns.append(VS_BEST)
    warnings = [w for run in runs for w in split_warnings(run, _row_name(run, root))]
    report = Report(
        columns,
        rows,
        numeric,
        key,
        descending,
        group_by,
        best,
        list(runs),
        root,
        criterion,
        warnings,
    )
    report.intervals = intervals
    report.settings = settings
    return report


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


def to_markdown(report: Report, galleries: dict[Path, str] | None = None) -> str:
    """The report as Markdown: the comparison table, the best run per group, the progress of
    sweeps shared by array tasks (their plan against the job folders), the confused class
    pairs of each run (with a link to its error gallery where `galleries` has one), the eva
    leaderboard rows when eva-protocol runs are present, and warnings."""
    order = "highest" if report.descending else "lowest"
    best_columns = ["group", "run", "status", *report.metrics]
    lines = [
        f"# Runs under {report.root}",
        "",
        f"{len(report.rows)} runs, sorted by {report.criterion} in column `{report.sort_by}` "
        f"({order} first; runs without a value last): a validation metric, never test; test "
        "metrics are shown beside it. Columns between status and the metrics are the settings "
        "that differ.",
        "",
        *_md_table(report.columns, report.rows, report.metrics, report.intervals),
        "",
        f"## Best run per {report.group_by} (by `{report.sort_by}`)",
        "",
        *_md_table(best_columns, report.best, report.metrics, report.intervals),
        "",
        *sweeps_markdown(report.runs),
        *errors_section(report.runs, report.root, galleries),
    ]
    summaries = eva_summaries(report.runs)
    if summaries:
        lines += [*leaderboard_markdown(summaries), ""]
    if report.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in report.warnings), ""]
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
