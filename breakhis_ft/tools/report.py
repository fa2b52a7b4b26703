"""Compare runs: a table of what differs between runs against their metrics, and plots.

breakhis-ft-report                          # every run under outputs/
breakhis-ft-report outputs/sweeps/demo/2025-01-01_10-00-00-000000 --plots
breakhis-ft-report outputs/runs/a/1 outputs/runs/b/2 --metrics val/f1_macro test/f1_macro
breakhis-ft-report --by-magnification --group-by magnification --out reports/
breakhis-ft-report outputs/runs/demo/1 --gallery --explanations explanations/  # errors page
breakhis-ft-report outputs/sweeps/demo_cv3       # + mean ± std over folds, pooled, per fold
breakhis-ft-report --compare RUN_A RUN_B         # paired bootstrap of A - B (stems, by class)

Runs are ranked, and the best run per group picked, by each run's optimized_metric (validation);
test metrics are shown beside it, never used to select. --gallery writes, per run,
gallery/<run>/index.html (and gallery.md) beside the report: the test images the run got wrong,
most confident first, with thumbnails, true and predicted class, probabilities, patient and
magnification, and the heatmaps of breakhis-ft-explain's output for that run (--explanations,
e.g. from `breakhis-ft-explain RUN --errors --out DIR`). Metrics with a stored interval show as
`0.62 [0.48, 0.75]`; runs whose interval of the criterion overlaps the best run's are marked
`not separable`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from breakhis_ft.analysis.aggregate import cv_groups, cv_markdown
from breakhis_ft.analysis.comparison import COMPARE_RESAMPLES
from breakhis_ft.analysis.gallery import GALLERY_ROWS, explanation_overlays, write_gallery
from breakhis_ft.analysis.report import (
    DEFAULT_METRICS,
    build_report,
    by_magnification,
    common_parent,
    normalise_metrics,
    to_markdown,
    write_report,
)
from breakhis_ft.analysis.runs import find_runs, load_run
from breakhis_ft.tools import run_tool, tool_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-report", __doc__)
    parser.add_argument(
        "paths",
        nargs="*",
        default=["outputs"],
        help="run folders, or folders searched for runs (default: outputs)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        help="metrics as split/name[/sub] (a bare name means test/name)",
    )
    parser.add_argument(
        "--by-magnification",
        action="store_true",
        help="add each metric per magnification (test/by_magnification/40/...)",
    )
    parser.add_argument(
        "--sort-by",
        help="validation metric that ranks the runs and picks each group's best (a bare name "
        "means val/name; default: each run's optimized_metric). Never a test metric",
    )
    parser.add_argument("--ascending", action="store_true", help="lowest first (for losses)")
    parser.add_argument(
        "--group-by",
        default="experiment_name",
        help="config key or group whose values form the best-run groups",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for report.md / report.csv (default: the runs' common parent)",
    )
    parser.add_argument(
        "--plots",
        action="store_true",
        help="write PNGs into each run folder and a sweep plot into --out",
    )
    parser.add_argument("--plot-split", default="test", help="split of the per-run plots")
    parser.add_argument(
        "--gallery",
        nargs="?",
        type=int,
        const=GALLERY_ROWS,
        metavar="N",
        help=f"write each run's error gallery (its N most confident test errors, {GALLERY_ROWS} "
        "without N) into gallery/ beside the report",
    )
    parser.add_argument(
        "--explanations",
        action="append",
        default=[],
        metavar="DIR",
        help="breakhis-ft-explain output folder(s) whose heatmaps the galleries show",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        type=Path,
        help="compare two runs on the same images: a paired bootstrap of A - B that resamples "
        "the split's groups (stems or patient folders) within each class",
    )
    parser.add_argument("--split", default="test", help="--compare: the split compared")
    parser.add_argument(
        "--resamples",
        type=int,
        default=COMPARE_RESAMPLES,
        help=f"--compare: resamples (default {COMPARE_RESAMPLES}: between bootstrap seeds a bound "
        "moves by under 0.003, so only a bound that close to 0 can change the verdict; "
        "benchmarks/results/compare_resamples.json)",
    )
    parser.add_argument("--seed", type=int, default=0, help="--compare: bootstrap seed")
    return parser


def write_galleries(runs: list, out: Path, n: int, explanations: list[str]) -> dict[Path, str]:
    """Each run's error gallery under out/gallery/<run>/; run folder -> page relative to out."""
    pages: dict[Path, str] = {}
    root = common_parent([run.path for run in runs])
    for run in runs:
        name = os.path.relpath(run.path, root) if run.path != root else run.path.name
        folder = Path("gallery") / name.replace(os.sep, "__")
        shown = [e for e in explanations if explanation_overlays(e, run.path)]
        page = write_gallery(run.path, out / folder, n, shown[0] if shown else None)
        if page is not None:
            pages[run.path] = (folder / page.name).as_posix()
    return pages


def compare(args: argparse.Namespace) -> int:
    """Print the paired comparison of two runs (and write it as JSON beside --out, if given)."""
    from breakhis_ft.analysis.comparison import compare_runs, comparison_markdown

    if args.resamples < 1:
        raise ValueError(f"--resamples must be at least 1, got {args.resamples}")
    result = compare_runs(*args.compare, args.split, args.resamples, args.seed)
    print(comparison_markdown(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps(result, indent=2))
        print(f"wrote: {args.out / 'compare.json'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Build the report, write it, print the Markdown; 0 on success."""
    errors = (ValueError, FileNotFoundError, ImportError)
    return run_tool(build_parser(), lambda a: compare(a) if a.compare else report(a), argv, errors)


def report(args: argparse.Namespace) -> int:
    """The table of the runs under args.paths (with galleries, folds and plots as asked)."""
    runs = [load_run(p) for p in find_runs(args.paths)]
    if not runs:
        raise ValueError(
            f"no run folders under {', '.join(args.paths)} (a run folder holds "
            "run_info.json or .hydra/config.yaml)"
        )
    metrics = normalise_metrics(args.metrics)
    if args.by_magnification:
        metrics = by_magnification(runs, metrics)
    sort_by = normalise_metrics([args.sort_by], split="val")[0] if args.sort_by else None
    report = build_report(
        runs, metrics, sort_by=sort_by, descending=not args.ascending, group_by=args.group_by
    )
    out = Path(args.out or report.root)
    galleries = {}
    if args.gallery is not None:
        galleries = write_galleries(runs, out, args.gallery, args.explanations)
    cv = cv_groups(runs, metrics)
    written = list(write_report(report, out, galleries, cv).values())
    written += [out / page for page in galleries.values()]
    if args.plots:
        from breakhis_ft.analysis.plots import plot_run, plot_sweep

        for run in runs:  # titles name what differs between the runs (peft.r=8), not job1
            written += plot_run(run, args.plot_split, report.settings)
        sweep = plot_sweep(runs, report.sort_by, Path(out) / "sweep.png", keys=report.settings)
        written += [sweep] if sweep else []
    print(to_markdown(report, galleries) + cv_markdown(cv, report.metrics))
    print("wrote:\n  " + "\n  ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
