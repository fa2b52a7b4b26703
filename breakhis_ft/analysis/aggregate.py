"""Cross-validation and repeated runs: runs that differ only in the fold or a seed, summarised as
mean +- std over the runs, the pooled out-of-fold metrics, and one row per run (Markdown, CSV).

Runs are grouped by everything in their config except the fold and seed keys (and the keys a
report ignores: paths, logger, ...). A group of two or more completed runs is summarised. Where its
runs' test sets are disjoint (k-fold: every image tested once), their `predictions_test.csv` are
pooled and the metrics recomputed on the pooled images (`evaluate.final`, with intervals by
patient); with seeds as well as folds, each seed's folds are pooled separately. Pooled figures mix
the folds' models: a pooled AUROC ranks one model's scores against another's, so read it beside the
per-fold mean.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breakhis_ft.analysis.runs import Run, metric_interval, metric_value, resampled_unit

FOLD_KEYS = ("split.fold", "split.seed", "seed", "data.augment.seed")
_IGNORED = ("paths", "resume", "logger", "model.builder", "trainer.optimizer._partial_")


@dataclass
class Pooled:
    """The metrics of several runs' test predictions pooled (disjoint test sets)."""

    label: str  # which runs: "split.fold=1..3" or "seed=2"
    runs: list[Run]
    metrics: dict[str, Any]  # a split's metrics (final_metrics) of the pooled images


@dataclass
class CVGroup:
    """Runs that differ only in FOLD_KEYS, and their summary over `metrics`."""

    label: str  # the group's shared settings that differ from other groups, or "(all runs)"
    runs: list[Run]  # completed, in fold/seed order
    varying: list[str]  # the fold/seed keys whose values differ
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)  # runs with a value, per metric
    pooled: list[Pooled] = field(default_factory=list)
    note: str = ""  # why a pooled figure is missing


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*_IGNORED, *FOLD_KEYS))


def _identity(run: Run) -> str:
    """What the run is, without its fold and seeds."""
    return json.dumps({k: v for k, v in run.config.items() if not _ignored(k)}, sort_keys=True)


def _order(run: Run) -> tuple:
    """Runs by fold, then seeds, numerically (fold 2 before fold 10)."""
    values = [run.config.get(k) for k in FOLD_KEYS]
    return tuple((0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in values)


def _varying(runs: Sequence[Run]) -> list[str]:
    return [k for k in FOLD_KEYS if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def _label(group: Sequence[Run], others: Sequence[Sequence[Run]]) -> str:
    """The group's values of the settings that tell the groups apart."""
    if len(others) < 2:
        return "(all runs)"
    keys = sorted({k for g in others for r in g for k in r.config if not _ignored(k)})
    shown = [
        k for k in keys if len({json.dumps(g[0].config.get(k), sort_keys=True) for g in others}) > 1
    ]
    return ", ".join(f"{k}={group[0].config.get(k)}" for k in shown) or "(all runs)"


def cv_groups(runs: Sequence[Run], metrics: Sequence[str]) -> list[CVGroup]:
    """Groups of 2+ completed runs differing only in fold or seed, with mean, std and pooled."""
    completed = [r for r in runs if r.status == "completed" and r.metrics]
    by_identity: dict[str, list[Run]] = {}
    for run in completed:
        by_identity.setdefault(_identity(run), []).append(run)
    found = [sorted(g, key=_order) for g in by_identity.values() if len(g) > 1 and _varying(g)]
    groups = []
    for runs_ in found:
        group = CVGroup(_label(runs_, found), runs_, _varying(runs_))
        for metric in metrics:
            values = [v for r in runs_ if (v := metric_value(r, metric)) is not None]
            group.count[metric] = len(values)
            group.mean[metric] = statistics.fmean(values) if values else None
            group.std[metric] = statistics.stdev(values) if len(values) > 1 else None
        group.pooled, group.note = _pooled(runs_, group.varying)
        groups.append(group)
    return groups


def _test_paths(run: Run) -> list[str] | None:
    """The image paths of the run's predictions_test.csv, or None without one."""
    path = run.path / "predictions_test.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return [row["path"] for row in csv.DictReader(f)]


def _pooled(runs: Sequence[Run], varying: Sequence[str]) -> tuple[list[Pooled], str]:
    """Pooled test metrics of each set of runs with disjoint test images (per seed, if any)."""
    if "split.fold" not in varying:
        return [], "not pooled: the runs do not differ in split.fold (their test sets overlap)"
    subsets: dict[str, list[Run]] = {}
    for run in runs:
        other = [f"{k}={run.config.get(k)}" for k in varying if k != "split.fold"]
        subsets.setdefault(", ".join(other), []).append(run)
    pooled, notes = [], []
    for name, subset in subsets.items():
        paths = [_test_paths(r) for r in subset]
        label = f"{name}: " if name else ""
        if any(p is None for p in paths):
            notes.append(f"{label}a run has no predictions_test.csv")
            continue
        flat = [p for ps in paths for p in ps]  # type: ignore[union-attr]
        if len(flat) != len(set(flat)):
            notes.append(f"{label}the folds' test sets overlap: not pooled")
            continue
        folds = ",".join(str(r.config.get("split.fold")) for r in subset)
        pooled.append(Pooled(f"{label}folds {folds}", subset, pool_predictions(subset)))
    return pooled, "; ".join(notes)


def pool_predictions(runs: Sequence[Run]) -> dict[str, Any]:
    """final_metrics of the runs' test predictions together (one image set, every fold's)."""
    import torch  # the metrics need torch; the rest of the report does not

    from breakhis_ft.config import EvaluateConfig
    from breakhis_ft.evaluate.bootstrap import units_of
    from breakhis_ft.evaluate.final import final_metrics
    from breakhis_ft.evaluate.metrics import read_predictions

    parts = [read_predictions(r.path / "predictions_test.csv") for r in runs]
    classes = parts[0]["classes"]
    if any(p["classes"] != classes for p in parts):
        raise ValueError(f"runs {[str(r.path) for r in runs]} have different classes")
    keys = {f.name for f in EvaluateConfig.__dataclass_fields__.values()}
    settings = EvaluateConfig(
        **{k: runs[0].config[f"evaluate.{k}"] for k in keys if f"evaluate.{k}" in runs[0].config}
    )
    patients = [x for p in parts for x in p["patients"]]
    return final_metrics(
        torch.cat([p["probs"] for p in parts]),
        torch.cat([p["labels"] for p in parts]),
        classes,
        patients,
        [x for p in parts for x in p["magnifications"]],
        settings,
        units_of(patients, resampled_unit(runs)),
    )


def _pooled_value(pooled: Pooled, metric: str) -> tuple[float | None, Any]:
    """A metric of a pooled set (test/... only), with its interval."""
    split, _, rest = metric.partition("/")
    if split != "test":
        return None, None
    fake = Run(Path(), "completed", {}, {}, [], {"test": pooled.metrics})
    return metric_value(fake, metric), metric_interval(fake, metric)


def cv_rows(group: CVGroup, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of one group's table: mean +- std, pooled, then each run (`_ci` intervals)."""
    n = len(group.runs)
    rows: list[dict[str, Any]] = [
        {"row": f"mean ± std ({n} runs)", **{m: (group.mean[m], group.std[m]) for m in metrics}}
    ]
    for pooled in group.pooled:
        values = {m: _pooled_value(pooled, m) for m in metrics}
        n_images = pooled.metrics.get("n")
        rows.append(
            {
                "row": f"pooled out-of-fold, {pooled.label} ({n_images} images)",
                **{m: v for m, (v, _) in values.items()},
                "_ci": {m: ci for m, (_, ci) in values.items()},
            }
        )
    for run in group.runs:
        name = ", ".join(f"{k}={run.config.get(k)}" for k in group.varying)
        rows.append(
            {
                "row": name,
                "run": str(run.path),
                **{m: metric_value(run, m) for m in metrics},
                "_ci": {m: metric_interval(run, m) for m in metrics},
            }
        )
    return rows


def format_interval(value: float, ci: Sequence[float] | None) -> str:
    """`0.62 [0.48, 0.75]`: two places, as an interval this wide warrants; 4 without one."""
    if ci is None:
        return f"{value:.4f}"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _cv_cell(value: Any, ci: Sequence[float] | None) -> str:
    if isinstance(value, tuple):  # (mean, std)
        mean, std = value
        if mean is None:
            return "-"
        return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
    return format_interval(value, ci) if isinstance(value, float) else "-"


def _aggregated(groups: Sequence[CVGroup], metrics: Sequence[str]) -> list[str]:
    """The metrics the groups were aggregated over (not the report's own criterion column)."""
    return [m for m in metrics if any(m in g.mean for g in groups)]


def cv_markdown(groups: Sequence[CVGroup], metrics: Sequence[str]) -> str:
    """One table per cross-validated group: mean ± std (sample std over the runs), the pooled
    out-of-fold metrics with intervals, then each run."""
    if not groups:
        return ""
    metrics = _aggregated(groups, metrics)
    lines = ["", "## Runs that differ only in fold or seed", ""]
    for group in groups:
        lines += [f"### {group.label}: {len(group.runs)} runs over {', '.join(group.varying)}", ""]
        lines += ["| | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        for row in cv_rows(group, metrics):
            ci = row.get("_ci") or {}
            cells = [_cv_cell(row.get(m), ci.get(m)) for m in metrics]
            lines.append(f"| {row['row']} | " + " | ".join(cells) + " |")
        lines += ["", *([f"({group.note})", ""] if group.note else [])]
    return "\n".join(lines)


def write_cv_csv(path: Path, groups: Sequence[CVGroup], metrics: Sequence[str]) -> None:
    """One CSV row per table row; a mean row also fills `<metric>_std`."""
    metrics = _aggregated(groups, metrics)
    columns = ["group", "row", "run"]
    columns += [c for m in metrics for c in (m, f"{m}_std", f"{m}_ci_lo", f"{m}_ci_hi")]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for group in groups:
            for row in cv_rows(group, metrics):
                out = {"group": group.label, "row": row["row"], "run": row.get("run", "")}
                for m in metrics:
                    value, ci = row.get(m), (row.get("_ci") or {}).get(m)
                    if isinstance(value, tuple):
                        out[m], out[f"{m}_std"] = value
                    else:
                        out[m] = value
                    if ci:
                        out[f"{m}_ci_lo"], out[f"{m}_ci_hi"] = ci
                writer.writerow({k: "" if v is None else v for k, v in out.items()})
