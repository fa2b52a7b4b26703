"""Is run A better than run B? A paired group bootstrap on the same test images.

Both runs' `predictions_<split>.csv` are matched image by image (`evaluate.compare`); every
resample draws the split's units (the stems for `split.group_by=stem`, else the patient folders)
with replacement within each class and scores both runs on the same draw, so the interval is of
the difference itself, narrower than two separate intervals suggest.

COMPARE_RESAMPLES, the default number of resamples, is measured (`python -m benchmarks
compare-resamples`, benchmarks/results/compare_resamples.json): over 20 bootstrap seeds, for two
runs of equal skill on the demo's test split and on a 224-image one, 95% of a bound's values lie
within 0.008 of their mean at 1,000 resamples, 0.004 at 5,000 and 0.003 at 10,000; with 10,000
only a bound within 0.003 of 0 can change the verdict from one seed to another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from breakhis_ft.analysis.runs import load_run, resampled_unit
from breakhis_ft.evaluate.bootstrap import MetricFn, auroc_macro, balanced_accuracy, units_of
from breakhis_ft.evaluate.compare import align_predictions, paired_bootstrap, separable

COMPARED: dict[str, MetricFn] = {
    "balanced_accuracy": balanced_accuracy,
    "auroc_macro": auroc_macro,
}


COMPARE_RESAMPLES = 10000


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
    n_resamples: int = COMPARE_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The paired bootstrap of A - B for each COMPARED metric on the split's shared images."""
    try:
        aligned = align_predictions(_predictions(run_a, split), _predictions(run_b, split))
        unit = resampled_unit([load_run(Path(run_a)), load_run(Path(run_b))])
        units = units_of(aligned["patients"], unit).groups
    except ValueError as err:
        raise ValueError(f"cannot compare {run_a} and {run_b}: {err}") from err
    results = {
        name: paired_bootstrap(
            fn,
            aligned["probs_a"],
            aligned["probs_b"],
            aligned["labels"],
            units,
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
        "interval": {
            "method": "paired percentile bootstrap",
            "unit": unit,
            "stratified_by": "class",
            "n_groups": len(set(units)),
        },
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
    scheme = result["interval"]
    lines = [
        f"# A vs B on {result['split']} ({result['n_images']} images, "
        f"{result['n_patients']} patients, {scheme['n_groups']} {scheme['unit']} groups; "
        f"{result['resamples']} paired resamples of the {scheme['unit']}s, stratified by "
        f"{scheme['stratified_by']}, seed {result['seed']})",
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
        "test patients cannot tell the runs apart. A class held by one group is the same in "
        "every resample: the interval does not cover its sampling.",
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
