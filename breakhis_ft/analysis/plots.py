"""PNG plots of finished runs (figures.py per run) and a sweep plot across runs.

matplotlib is the optional `plots` extra; it is imported only when a plot is drawn, with the Agg
backend (no display needed on a server or in a container).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from breakhis_ft.analysis.report import SELECTION, differing_keys, optimized_metric
from breakhis_ft.analysis.runs import Run, metric_value
from breakhis_ft.evaluate.figures import _pyplot, _save, plot_run_figures

# settings a sweep usually varies: their panels come first
SWEEP_AXES = ("peft.r", "trainer.lr", "magnification")
DECADE = 10  # numeric values whose largest is this many times their smallest: a log axis
PANEL_COLUMNS = 3  # sweep plot panels per row
# overrides that say nothing about what was trained: left out of a run's label
_UNNAMED = ("hydra", "paths.", "data.root=", "logger.", "rerun=", "resume=")
Point = tuple[Any, float, tuple[float, float] | None]  # x, value, 95% interval


def run_label(run: Run, settings: Sequence[str] = ()) -> str:
    """What distinguishes a run: `peft.r=8, trainer.lr=0.0001` (the settings that differ between
    the runs compared, else its command-line overrides), else its experiment and folder name."""
    if settings:
        return ", ".join(f"{k}={run.value(k)}" for k in settings)
    named = [o for o in run.overrides if not o.lstrip("+~").startswith(_UNNAMED)]
    if named:
        return ", ".join(named)
    return f"{run.config.get('experiment_name', 'run')} ({run.path.name})"


def plot_run(run: Run, split: str = "test", settings: Sequence[str] = ()) -> list[Path]:
    """Confusion matrix, per-class F1 (of `split`) and curves, written into the run folder; the
    titles name the run by `run_label`."""
    title = run_label(run, settings)
    return plot_run_figures(run.path, run.metrics, run.history, split, title=title)


def _magnification(run: Run) -> str | None:
    factors = run.config.get("magnification.factors")
    if run.config.get("magnification.name"):
        return str(run.config["magnification.name"])
    if "magnification" in run.choices:
        return run.choices["magnification"]
    return None if factors is None else ",".join(map(str, factors))


def _axis_value(run: Run, axis: str) -> Any:
    return _magnification(run) if axis == "magnification" else run.value(axis)


def _order(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order, then '40x' < '100x' < ..., then other text."""
    if isinstance(value, int | float):
        return (0, float(value), "")
    digits = str(value).rstrip("xX")
    return (1, float(digits), "") if digits.isdigit() else (2, 0.0, str(value))


def sweep_axes(runs: Sequence[Run], keys: Sequence[str] | None = None) -> list[str]:
    """The swept settings: those of `keys` (the report's differing keys; default: the settings
    that differ between the runs) that vary between runs and hold one value each (not a list);
    the usual ones (SWEEP_AXES) first."""
    candidates = list(differing_keys(runs) if keys is None else keys)
    swept = []
    for key in candidates:
        values = [_axis_value(r, key) for r in runs]
        scalar = not any(isinstance(v, list | dict) for v in values)
        if scalar and len({str(v) for v in values}) > 1:
            swept.append(key)
    return sorted(swept, key=lambda k: (SWEEP_AXES.index(k) if k in SWEEP_AXES else 99, k))


def _log_base(xs: Sequence[Any]) -> int | None:
    """10 when numeric values span a decade or more (a learning rate from 1e-5 to 1e-3), so
    that they are evenly spaced; None for a linear axis."""
    numbers = [x for x in xs if isinstance(x, int | float) and not isinstance(x, bool)]
    if len(numbers) != len(xs) or not numbers or min(numbers) <= 0:
        return None
    return 10 if max(numbers) / min(numbers) >= DECADE else None


def criterion_value(run: Run, metric: str) -> float | None:
    """`metric` of a run; "selection": the value of the run's own optimized_metric."""
    if metric == SELECTION:
        name = optimized_metric(run)
        return metric_value(run, name) if name else None
    return metric_value(run, metric)


def metric_interval(run: Run, metric: str) -> tuple[float, float] | None:
    """The 95% interval of a metric (`<name>_ci95` beside it in metrics.json), when recorded."""
    if metric == SELECTION:
        metric = optimized_metric(run) or ""
    *parents, leaf = metric.split("/")
    value: Any = run.metrics
    for part in parents:
        value = value.get(part) if isinstance(value, dict) else None
    ci = value.get(f"{leaf}_ci95") if isinstance(value, dict) else None
    if not (isinstance(ci, list | tuple) and len(ci) == 2):
        return None
    return (float(ci[0]), float(ci[1])) if all(isinstance(v, int | float) for v in ci) else None


def _points(runs: Sequence[Run], metric: str, x_axis: str) -> tuple[list[Point], int]:
    """(x, value, interval) of the runs that have the value; and how many do not."""
    points: list[Point] = []
    missing = 0
    for run in runs:
        value = criterion_value(run, metric)
        if value is None:
            missing += 1  # failed, running or no such split: counted, not plotted as zero
            continue
        points.append((_axis_value(run, x_axis), value, metric_interval(run, metric)))
    return sorted(points, key=lambda p: _order(p[0])), missing


def _draw(ax: Any, pts: list[Point], xs: list, numeric: bool, **style: Any) -> tuple[Any, list]:
    """One series with its intervals as error bars, a line through it where each x has one run
    (else markers only: runs that share an x differ in another key); (the series, every value
    and bound drawn)."""
    ys = [p[1] for p in pts]
    lows = [p[2][0] if p[2] else p[1] for p in pts]
    highs = [p[2][1] if p[2] else p[1] for p in pts]
    line_style = style.pop("linestyle") if len({str(p[0]) for p in pts}) == len(pts) else "none"
    style.pop("linestyle", None)
    bars = ax.errorbar(
        [p[0] if numeric else xs.index(p[0]) for p in pts],
        ys,
        yerr=[
            [y - lo for y, lo in zip(ys, lows, strict=True)],
            [hi - y for y, hi in zip(ys, highs, strict=True)],
        ],
        capsize=3,
        linestyle=line_style,
        **style,
    )
    return bars.lines[0], lows + highs


def _y_limits(ax: Any, values: Sequence[float]) -> None:
    """From 0 (a difference of 0.002 is not stretched to full height); to 1 for a [0, 1] metric."""
    if values and min(values) >= 0:
        ax.set_ylim(0, 1.02 if max(values) <= 1 else max(values) * 1.05)


def _panel(ax: Any, runs: Sequence[Run], key: str, metric: str, beside: str | None) -> int:
    """One swept key's panel: the criterion (solid) and `beside` (dashed, same colour) against
    the key's values, a log axis where they span decades; how many runs have no value."""
    points, missing = _points(runs, metric, key)
    extra = _points(runs, beside, key)[0] if beside else []
    xs = sorted({str(p[0]): p[0] for p in [*points, *extra]}.values(), key=_order)
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    shown = "each run's optimized_metric" if metric == SELECTION else metric
    drawn: list[float] = []
    line = None
    # the criterion in filled circles; `beside` in hollow diamonds of the same colour
    series_styles = (
        (points, {"linestyle": "-", "marker": "o"}, shown),
        (extra, {"linestyle": "--", "marker": "D", "markerfacecolor": "white"}, beside),
    )
    for series, style, name in series_styles:
        if series:
            colour = None if line is None else line.get_color()
            line, values = _draw(ax, series, xs, numeric, color=colour, label=name, **style)
            drawn += values
    _y_limits(ax, drawn)
    if base := _log_base(xs):
        ax.set_xscale("log", base=base)
    if numeric:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(key + (" (log)" if base else ""))
    ax.set_title(f"{shown} vs {key}", fontsize=9)
    ax.grid(alpha=0.3)
    return missing


def plot_sweep(
    runs: Sequence[Run],
    metric: str,
    path: str | Path,
    beside: str | None = "test/balanced_accuracy",
    keys: Sequence[str] | None = None,
) -> Path | None:
    """The criterion (`metric`: a validation metric, or "selection" for each run's
    optimized_metric) against each swept key (`sweep_axes` of `keys`), one panel per key;
    `beside` (test) drawn dashed in the same colour, to read, never to select by. Error bars show
    95% intervals where metrics.json has them; the y axes start at 0."""
    if metric.split("/")[0] == "test":
        raise ValueError(f"{metric}: a sweep is plotted by its validation criterion, not test")
    swept = sweep_axes(runs, keys)
    if not swept:
        return None
    plt = _pyplot()
    columns = min(len(swept), PANEL_COLUMNS)
    rows = -(-len(swept) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.4 * rows + 0.6), squeeze=False, sharey=True
    )
    missing = 0
    for ax, key in zip(axes.flat, swept, strict=False):
        missing = _panel(ax, runs, key, metric, beside)
    for ax in list(axes.flat)[len(swept) :]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    note = f", {missing} without a value (failed/running) left out" if missing else ""
    fig.suptitle(f"{len(runs) - missing} of {len(runs)} runs, one panel per swept key{note}")
    fig.tight_layout()
    return _save(fig, Path(path))
