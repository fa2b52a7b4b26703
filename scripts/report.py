"""Compare runs: a table of what differs between runs against their metrics, and plots.

python scripts/report.py                          # every run under outputs/
python scripts/report.py outputs/sweeps/demo/2025-01-01_10-00-00-000000 --plots
python scripts/report.py outputs/runs/a/1 outputs/runs/b/2 --metrics val/f1_macro test/f1_macro
python scripts/report.py --by-magnification --group-by magnification --out reports/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from breakhis_ft.analysis.report import (
    DEFAULT_METRICS,
    build_report,
    by_magnification,
    normalise_metrics,
    to_markdown,
    write_report,
)
from breakhis_ft.analysis.runs import find_runs, load_run


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--sort-by", help="metric that orders the table (default: the first)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the report, write it, print the Markdown; 0 on success."""
    args = build_parser().parse_args(argv)
    runs = [load_run(p) for p in find_runs(args.paths)]
    if not runs:
        raise ValueError(
            f"no run folders under {', '.join(args.paths)} (a run folder holds "
            "run_info.json or .hydra/config.yaml)"
        )
    metrics = normalise_metrics(args.metrics)
    if args.by_magnification:
        metrics = by_magnification(runs, metrics)
    sort_by = normalise_metrics([args.sort_by])[0] if args.sort_by else None
    report = build_report(
        runs, metrics, sort_by=sort_by, descending=not args.ascending, group_by=args.group_by
    )
    out = args.out or report.root
    written = list(write_report(report, out).values())
    if args.plots:
        from breakhis_ft.analysis.plots import plot_run, plot_sweep

        settings = report.columns[3 : len(report.columns) - len(report.metrics)]
        for run in runs:  # titles name what differs between the runs (peft.r=8), not job1
            written += plot_run(run, args.plot_split, settings)
        sweep = plot_sweep(runs, report.sort_by, Path(out) / "sweep.png")
        written += [sweep] if sweep else []
    print(to_markdown(report))
    print("wrote:\n  " + "\n  ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, ImportError) as err:
        sys.exit(f"error: {err}")
