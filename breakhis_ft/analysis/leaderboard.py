"""eva's BreakHis leaderboard beside our runs of eva's protocol, as mean +- sd over seeds.

eva reports each encoder's balanced accuracy on its 14 validation patients (BreakHis has no test
split there) as the mean over 5 runs, with `statistics.stdev` (the sample SD) beside it
(`eva.core.trainers._recorder`). `leaderboard_markdown` takes such summaries of our runs and
places them among eva's published rows (docs/references.md). `eva_summaries` groups the completed
runs of the eva protocol by experiment; runs differing in anything but the seed belong in separate
experiments (the report's general seed aggregation can replace this grouping).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from breakhis_ft.analysis.runs import Run, metric_value

# kaiko-ai/eva leaderboard, BreakHis (4 classes, 40X), balanced accuracy (docs/references.md)
EVA_LEADERBOARD: tuple[tuple[str, float], ...] = (
    ("UNI2-h", 0.859),
    ("kaiko ViT-L14", 0.837),
    ("Prov-GigaPath", 0.827),
    ("Virchow2", 0.821),
    ("H-optimus-0", 0.801),
    ("UNI", 0.785),
    ("Phikon", 0.717),
)
EVA_METRIC = "val/balanced_accuracy"  # eva's val/MulticlassAccuracy (macro) on its val patients


@dataclass(frozen=True)
class SeedSummary:
    """One model's figure over repeated runs: mean and sample SD, as eva's results.json."""

    name: str
    mean: float
    std: float
    n: int


def summarise(name: str, values: Sequence[float]) -> SeedSummary:
    """Mean and sample standard deviation (0 for a single run, as eva writes it)."""
    if not values:
        raise ValueError(f"{name}: no values to summarise")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return SeedSummary(name, statistics.mean(values), std, len(values))


def is_eva_run(run: Run) -> bool:
    """A run of eva's protocol: split=eva (task eva4 at 40X, checked when it composed)."""
    return run.config.get("split.kind") == "eva"


def eva_summaries(runs: Sequence[Run]) -> list[SeedSummary]:
    """Completed eva-protocol runs with a validation balanced accuracy, per experiment."""
    values: dict[str, list[float]] = {}
    for run in runs:
        value = metric_value(run, EVA_METRIC)
        if is_eva_run(run) and run.status == "completed" and value is not None:
            values.setdefault(str(run.value("experiment_name")), []).append(value)
    return [summarise(name, v) for name, v in sorted(values.items())]


def leaderboard_rows(ours: Sequence[SeedSummary]) -> list[dict[str, str]]:
    """eva's rows and ours in one ranking by mean balanced accuracy (ours marked)."""
    rows = [(score, name, f"{score:.3f}", "eva leaderboard") for name, score in EVA_LEADERBOARD]
    for s in ours:
        figure = f"{s.mean:.3f} ± {s.std:.3f}"
        rows.append((s.mean, f"**{s.name}**", figure, f"this project, {s.n} seed(s)"))
    rows.sort(key=lambda row: -row[0])
    return [{"model": name, "balanced accuracy": fig, "source": src} for _, name, fig, src in rows]


def leaderboard_markdown(ours: Sequence[SeedSummary]) -> list[str]:
    """The Markdown section: our mean ± SD among eva's published BreakHis rows."""
    lines = [
        "## eva leaderboard (BreakHis, 4 classes at 40X, balanced accuracy on eva's validation "
        "patients)",
        "",
        "Ours: mean ± sample SD over the runs (seeds) of each experiment, "
        f"`{EVA_METRIC}` of the best checkpoint, as eva reports its 5 runs.",
        "",
        "| model | balanced accuracy | source |",
        "|---|---|---|",
    ]
    for row in leaderboard_rows(ours):
        lines.append(f"| {row['model']} | {row['balanced accuracy']} | {row['source']} |")
    return lines
