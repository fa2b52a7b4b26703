"""Is run A better than run B? A paired patient bootstrap on the same test images.

Both runs' `predictions_<split>.csv` are matched image by image (`evaluate.compare`); every
resample draws patients with replacement and scores both runs on the same draw, so the interval
is of the difference itself, narrower than two separate intervals suggest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from breakhis_ft.evaluate.bootstrap import MetricFn, auroc_macro, balanced_accuracy
from breakhis_ft.evaluate.compare import align_predictions, paired_bootstrap, separable

COMPARED: dict[str, MetricFn] = {
    "balanced_accuracy": balanced_accuracy,
    "auroc_macro": auroc_macro,
}


def _predictions(run_dir: Path, split: str) -> dict[str, Any]:
    from breakhis_ft.evaluate.metrics import read_predictions  # torch: only when comparing

    path = Path(run_dir) / f"predictions_{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions of the {split} split in this run folder")
    return read_predictions(path)


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    split: str = "test",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The paired bootstrap of A - B for each COMPARED metric on the split's shared images."""
    try:
        aligned = align_predictions(_predictions(run_a, split), _predictions(run_b, split))
    except ValueError as err:
        raise ValueError(f"cannot compare {run_a} and {run_b}: {err}") from err
    results = {
        name: paired_bootstrap(
            fn,
            aligned["probs_a"],
            aligned["probs_b"],
            aligned["labels"],
            aligned["patients"],
            n_resamples,
            seed,
        )
        for name, fn in COMPARED.items()
    }
    return {
        "a": str(run_a),
        "b": str(run_b),
        "split": split,
        "n_images": len(aligned["paths"]),
        "n_patients": len(set(aligned["patients"])),
        "resamples": n_resamples,
        "seed": seed,
        "metrics": results,
    }


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table: A, B, A - B, its 95% interval, shares of resamples."""
    lines = [
        f"# A vs B on {result['split']} ({result['n_images']} images, "
        f"{result['n_patients']} patients; {result['resamples']} paired patient resamples, "
        f"seed {result['seed']})",
        "",
        f"A: {result['a']}",
        f"B: {result['b']}",
        "",
        "| metric | A | B | A - B | 95% interval | A wins | B wins | ties |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["metrics"].items():
        ci = r["ci95"]
        interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "n/a"
        lines.append(
            f"| {name} | {_number(r['a'])} | {_number(r['b'])} | "
            f"{_number(r['difference'], True)} | {interval} | {_share(r['share_a_wins'])} | "
            f"{_share(r['share_b_wins'])} | {_share(r['share_ties'])} |"
        )
    lines += [
        "",
        "A wins: the share of resamples where A scores higher. An interval that holds 0 means the "
        "test patients cannot tell the runs apart.",
        "",
    ]
    return "\n".join(lines)


VS_BEST = "vs best"  # the report column saying whether a run's interval overlaps the best's


def mark_separability(
    rows: list[dict[str, Any]], metric: str, intervals: dict[str, dict[str, Any]]
) -> bool:
    """Mark each row `best`, `not separable` (its interval of `metric` overlaps the best run's)
    or `separable` under VS_BEST; False (nothing marked) when the best run has no interval.

    The best run is the first completed row with a value (rows are sorted). Overlapping
    intervals of runs on the same test images are a coarse test; `report.py --compare A B`
    (a paired bootstrap) is the sharper one.
    """
    best = next(
        (r for r in rows if r.get("status") == "completed" and r.get(metric) is not None), None
    )
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
