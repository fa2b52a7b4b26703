"""PNG figures of one run from its metrics and history: confusion matrix, per-class F1, curves.

matplotlib is the optional `plots` extra; it is imported only when a figure is drawn, with the Agg
backend (no display needed on a server or in a container). The run writes these when W&B is on
(tracking), and the report draws them for finished runs (analysis/plots.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the curves' panels whose values lie in [0, 1] (metrics; losses and the learning rate do not)
BOUNDED_PANELS = ("validation", "test (logged only)")


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "plots need matplotlib: pip install -e '.[plots]' (or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(name: str) -> str:
    """A class name for an axis: 'ductal_carcinoma' -> 'ductal carcinoma'."""
    return name.replace("_", " ")


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_confusion_matrix(split_metrics: dict[str, Any], path: str | Path, title: str) -> Path:
    """Counts and row-normalised confusion matrix side by side, class names on both axes."""
    plt = _pyplot()
    import numpy as np

    classes = [_label(c) for c in split_metrics["classes"]]
    counts = np.asarray(split_metrics["confusion_matrix"], dtype=float)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion_matrix is {counts.shape} for {len(classes)} classes")
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n = len(classes)
    side = max(4.0, 0.75 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    panels = ((axes[0], counts, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f"))
    for ax, values, name, fmt in panels:
        # shares on a fixed 0-1 scale, so colours compare across runs
        vmax = 1.0 if fmt != "d" else max(float(values.max()), 1.0)
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for i in range(n):
            for j in range(n):
                text = format(int(values[i, j]), "d") if fmt == "d" else format(values[i, j], fmt)
                colour = "white" if values[i, j] > 0.6 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
        ax.set_xticks(range(n), classes, rotation=40, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def bar_text(value: float | None, support: Any) -> str:
    """The label of one class's F1 bar: the value, `absent` (no image of the class in the
    split: its F1 says nothing) or n/a (undefined)."""
    if support == 0:
        return "absent from this split"
    return "n/a" if value is None else f"{value:.2f}"


def plot_per_class_f1(split_metrics: dict[str, Any], path: str | Path, title: str) -> Path:
    """Horizontal F1 bars per class, with the class support; a class with no image in the split
    is marked absent (no bar), an undefined F1 n/a."""
    plt = _pyplot()
    per_class = split_metrics["per_class"]
    names = list(per_class)
    support = [per_class[c].get("support", "?") for c in names]
    f1 = [per_class[c].get("f1") for c in names]
    labels = [f"{_label(c)} (n={n})" for c, n in zip(names, support, strict=True)]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.5))
    shown = [0.0 if n == 0 else (v or 0.0) for v, n in zip(f1, support, strict=True)]
    ax.barh(range(len(names)), shown, color="#4c72b0")
    for i, (value, n) in enumerate(zip(f1, support, strict=True)):
        colour = "grey" if n == 0 else "black"
        x = 0.01 if n == 0 else (value or 0.0) + 0.01
        ax.text(x, i, bar_text(value, n), va="center", fontsize=9, color=colour)
    ax.set_yticks(range(len(names)), labels)
    ax.invert_yaxis()  # first class on top, as in the confusion matrix
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("F1")
    macro = split_metrics.get("f1_macro")
    if macro is not None:
        ax.axvline(macro, color="grey", linestyle="--", linewidth=1, label=f"macro F1 {macro:.2f}")
        ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in history:
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value) and "step" in row:
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path | None:
    """The training loss, the evaluated split's class NLL, validation metrics and the learning
    rate against the step: each panel one quantity (MedGemma's train/loss is a token loss, the
    class NLL one over the classes' answers: two scales, never one axis)."""
    panels = [
        ("train/loss (training objective)", ["train/loss"]),
        # val/loss: the class NLL in the metrics.jsonl of a run folder of an earlier release
        # (report --plots draws those too)
        ("class NLL (true class)", ["val/class_nll", "test/class_nll", "val/loss"]),
        (
            "validation",
            [
                "val/balanced_accuracy",
                "val/f1_macro",
                "val/auroc_macro",
                "val/patient_recognition_rate",
            ],
        ),
        # trainer.eval_split=test (the blog notebook's): logged during training, never selecting
        ("test (logged only)", ["test/balanced_accuracy", "test/accuracy", "test/f1_weighted"]),
        ("learning rate", ["train/lr"]),
    ]
    panels = [(name, [k for k in keys if _series(history, k)[0]]) for name, keys in panels]
    panels = [(name, keys) for name, keys in panels if keys]
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            steps, values = _series(history, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if name in BOUNDED_PANELS:
            ax.set_ylim(-0.02, 1.02)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_run_figures(
    run_dir: Path,
    metrics: dict[str, Any],
    history: Sequence[dict[str, Any]],
    split: str = "test",
    title: str | None = None,
) -> list[Path]:
    """Confusion matrix, per-class F1 (of `split`) and curves, written into the run folder.

    `title` names the run in the titles (what differs, e.g. `peft.r=8`); default its folder name.
    """
    written = []
    name = title or Path(run_dir).name
    split_metrics = metrics.get(split)
    if isinstance(split_metrics, dict) and split_metrics.get("confusion_matrix"):
        written.append(
            plot_confusion_matrix(
                split_metrics,
                run_dir / f"confusion_matrix_{split}.png",
                f"{split} confusion matrix: {name} (n={split_metrics.get('n', '?')})",
            )
        )
    if isinstance(split_metrics, dict) and split_metrics.get("per_class"):
        written.append(
            plot_per_class_f1(
                split_metrics,
                run_dir / f"per_class_f1_{split}.png",
                f"{split} F1 per class: {name}",
            )
        )
    curves = plot_curves(history, run_dir / "curves.png", f"training: {name}")
    if curves is not None:
        written.append(curves)
    return written
