"""PNG plots of finished runs (figures.py per run) and a sweep plot across runs.

matplotlib is the optional `plots` extra; it is imported only when a plot is drawn, with the Agg
backend (no display needed on a server or in a container).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from breakhis_ft.analysis.report import SELECTION, optimized_metric
from breakhis_ft.analysis.runs import Run, metric_value
from breakhis_ft.evaluate.figures import _pyplot, _save, plot_run_figures

# settings a sweep varies, in the order they are tried as the x axis
SWEEP_AXES = ("peft.r", "trainer.lr", "magnification")
_LOG_AXES = {"peft.r": 2, "trainer.lr": 10}
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
    return _magnification(run) if axis == "magnification" else run.config.get(axis)


def _order(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order, then '40x' < '100x' < ..., then other text."""
    if isinstance(value, int | float):
        return (0, float(value), "")
    digits = str(value).rstrip("xX")
    return (1, float(digits), "") if digits.isdigit() else (2, 0.0, str(value))


def sweep_axes(runs: Sequence[Run]) -> list[str]:
    """The sweep settings (LoRA rank, learning rate, magnification) that vary between runs."""
    return [a for a in SWEEP_AXES if len({str(_axis_value(r, a)) for r in runs}) > 1]


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


def _points(
    runs: Sequence[Run], metric: str, x_axis: str, hue: str | None
) -> tuple[dict[Any, list[Point]], int]:
    """(hue value -> [(x, value, interval)]) of the runs that have the value; and how many do
    not."""
    points: dict[Any, list[Point]] = {}
    missing = 0
    for run in runs:
        value = criterion_value(run, metric)
        if value is None:
            missing += 1  # failed, running or no such split: counted, not plotted as zero
            continue
        points.setdefault(_axis_value(run, hue) if hue else None, []).append(
            (_axis_value(run, x_axis), value, metric_interval(run, metric))
        )
    return points, missing


def _draw(ax: Any, pts: list[Point], xs: list, numeric: bool, **style: Any) -> tuple[Any, list]:
    """One line with its intervals as error bars; (the line, every value and bound drawn)."""
    ys = [p[1] for p in pts]
    lows = [p[2][0] if p[2] else p[1] for p in pts]
    highs = [p[2][1] if p[2] else p[1] for p in pts]
    bars = ax.errorbar(
        [p[0] if numeric else xs.index(p[0]) for p in pts],
        ys,
        yerr=[
            [y - lo for y, lo in zip(ys, lows, strict=True)],
            [hi - y for y, hi in zip(ys, highs, strict=True)],
        ],
        marker="o",
        capsize=3,
        **style,
    )
    return bars.lines[0], lows + highs


def _y_limits(ax: Any, values: Sequence[float]) -> None:
    """From 0 (a difference of 0.002 is not stretched to full height); to 1 for a [0, 1] metric."""
    if values and min(values) >= 0:
        ax.set_ylim(0, 1.02 if max(values) <= 1 else max(values) * 1.05)


def plot_sweep(
    runs: Sequence[Run],
    metric: str,
    path: str | Path,
    beside: str | None = "test/balanced_accuracy",
) -> Path | None:
    """The criterion (`metric`: a validation metric, or "selection" for each run's
    optimized_metric) against the first varying sweep setting, one line per value of the
    second; `beside` (test) drawn dashed in the same colour, to read, never to select by. Error
    bars show 95% intervals where metrics.json has them; the y axis starts at 0."""
    if metric.split("/")[0] == "test":
        raise ValueError(f"{metric}: a sweep is plotted by its validation criterion, not test")
    axes = sweep_axes(runs)
    if not axes:
        return None
    x_axis, hue = axes[0], (axes[1] if len(axes) > 1 else None)
    points, missing = _points(runs, metric, x_axis, hue)
    extra = _points(runs, beside, x_axis, hue)[0] if beside else {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = sorted({p[0] for pts in [*points.values(), *extra.values()] for p in pts}, key=_order)
    numeric = all(isinstance(x, int | float) for x in xs)
    drawn: list[float] = []
    for key in sorted(set(points) | set(extra), key=_order):
        label = f"{hue}={key}" if hue else metric
        line = None
        for series, style, name in ((points, "-", label), (extra, "--", f"{label} ({beside})")):
            pts = sorted(series.get(key, []), key=lambda p: _order(p[0]))
            if not pts:
                continue
            colour = None if line is None else line.get_color()
            line, values = _draw(ax, pts, xs, numeric, fmt=style, color=colour, label=name)
            drawn += values
    _y_limits(ax, drawn)
    if x_axis in _LOG_AXES and numeric:
        # ranks double (4, 8, 16), learning rates step by decades: evenly spaced on a log axis
        ax.set_xscale("log", base=_LOG_AXES[x_axis])
    if numeric:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(x_axis)
    shown = "each run's optimized_metric" if metric == SELECTION else metric
    ax.set_ylabel(f"{shown} (solid)" + (f"; {beside} (dashed)" if beside else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    note = f", {missing} without a value (failed/running) left out" if missing else ""
    ax.set_title(f"{shown} vs {x_axis}\n{len(runs) - missing} of {len(runs)} runs{note}")
    fig.tight_layout()
    return _save(fig, Path(path))
