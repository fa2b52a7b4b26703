"""The demo's figures: compare a `make demo` run with the recorded ones, or record them.

breakhis-ft-demo-metrics                 # the newest completed outputs/runs/demo/* vs the record
breakhis-ft-demo-metrics RUN_DIR         # a given demo run folder
breakhis-ft-demo-metrics --record        # write the record and the README's figure from the
                                         # newest demo run (make demo-record)

Run from the repository's root (or give --record-file and --readme): the README quotes the demo's
test and validation balanced accuracy and the validation balanced accuracy at the run's first and
last evaluation (how much it learned over its epochs), and a test checks that the quote equals the
record, benchmarks/results/demo_metrics.json, which only `--record` writes, from a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from breakhis_ft.tools import run_tool, tool_parser

RECORD = Path("benchmarks/results/demo_metrics.json")  # relative to the repository's root
README = Path("README.md")
# the README's sentence (it may wrap between words): "... a test balanced accuracy of 0.350
# (validation 0.477); its validation balanced accuracy goes from 0.405 at the first evaluation to
# 0.526 at the last (+0.121) ..."
_FIGURE = r"(\d\.\d{3})"
README_FIGURE = re.compile(
    r"\s+".join(
        [
            *"test balanced accuracy of".split(),
            _FIGURE,
            r"\(validation",
            rf"{_FIGURE}\);",
            *"its validation balanced accuracy goes from".split(),
            _FIGURE,
            *"at the first evaluation to".split(),
            _FIGURE,
            *"at the last".split(),
            r"\(([+-]\d\.\d{3})\)",
        ]
    )
)
FIGURES = "test, validation, first and last evaluation's validation, last - first"
Figures = tuple[str, str, str, str, str]  # FIGURES as the README writes them


def readme_figures(text: str) -> Figures:
    """The README's quoted demo figures (FIGURES), three decimals."""
    found = README_FIGURE.findall(text)
    if len(found) != 1:
        raise ValueError(
            "README: expected one 'test balanced accuracy of X.XXX (validation Y.YYY); its "
            "validation balanced accuracy goes from A.AAA at the first evaluation to B.BBB at "
            f"the last (+D.DDD)', found {len(found)}"
        )
    return found[0]


def recorded_figures(record: dict[str, Any]) -> Figures:
    """A record's figures (FIGURES), formatted as the README quotes them; the margin is the
    difference of the two quoted values, so the sentence adds up."""
    first = f"{record['val_balanced_accuracy_first']:.3f}"
    last = f"{record['val_balanced_accuracy_last']:.3f}"
    return (
        f"{record['test_balanced_accuracy']:.3f}",
        f"{record['val_balanced_accuracy']:.3f}",
        first,
        last,
        f"{float(last) - float(first):+.3f}",
    )


def validation_curve(run_dir: Path) -> list[float]:
    """val/balanced_accuracy of each evaluation of a run, in order (from metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    curve = []
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "val/balanced_accuracy" in row:
            curve.append(float(row["val/balanced_accuracy"]))
    if not curve:
        raise ValueError(f"{path}: no val/balanced_accuracy: the run never evaluated")
    return curve


def newest_demo_run(outputs: Path) -> Path:
    """The newest completed run folder under outputs/runs/demo."""
    runs = []
    for info in sorted((outputs / "runs" / "demo").glob("*/run_info.json")):
        if json.loads(info.read_text()).get("status") == "completed":
            runs.append(info.parent)
    if not runs:
        raise FileNotFoundError(f"no completed demo run under {outputs / 'runs' / 'demo'}")
    return runs[-1]  # folder names are timestamps


def record_of(run_dir: Path) -> dict[str, Any]:
    """What a demo run gives, and where it ran."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    curve = validation_curve(run_dir)
    return {
        "test_balanced_accuracy": metrics["test"]["balanced_accuracy"],
        "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
        "val_balanced_accuracy_first": curve[0],  # the first evaluation (end of epoch 1)
        "val_balanced_accuracy_last": curve[-1],
        "val_balanced_accuracy_curve": curve,
        "command": "make demo (breakhis-ft experiment=demo)",
        "run": run_dir.name,
        "git": info.get("git"),
        "versions": info.get("versions"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
    }


def write_readme(readme: Path, figures: Figures) -> None:
    """Put the figures into the README's sentence (its wording and line breaks kept)."""
    text = readme.read_text()
    readme_figures(text)  # exactly one sentence to change
    match = README_FIGURE.search(text)
    for group in range(len(figures), 0, -1):  # from the end: earlier offsets stay valid
        start, end = match.span(group)
        text = text[:start] + figures[group - 1] + text[end:]
    readme.write_text(text)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-demo-metrics", __doc__)
    parser.add_argument("run", nargs="?", type=Path, help="a demo run folder (default: newest)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="paths.output_dir")
    parser.add_argument("--record", action="store_true", help="write the record and the README")
    parser.add_argument("--record-file", type=Path, default=RECORD, help="the recorded figures")
    parser.add_argument("--readme", type=Path, default=README, help="the README quoting them")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Compare (0: same figures, 1: different) or, with --record, write record and README."""
    errors = (ValueError, FileNotFoundError, KeyError)
    return run_tool(build_parser(), compare_or_record, argv, errors)


def compare_or_record(args: argparse.Namespace) -> int:
    """Print this run's figures beside the README's (1 if they differ), or record them."""
    if not args.readme.is_file():
        raise FileNotFoundError(
            f"{args.readme}: no README here; run from the repository's root or give --readme"
        )
    run_dir = args.run or newest_demo_run(args.outputs)
    record = record_of(run_dir)
    figures = recorded_figures(record)
    shown = ", ".join(figures)
    if args.record:
        args.record_file.parent.mkdir(parents=True, exist_ok=True)
        args.record_file.write_text(json.dumps(record, indent=1) + "\n")
        write_readme(args.readme, figures)
        written = f"{args.record_file}, {args.readme}"
        print(f"recorded {run_dir} ({FIGURES}): {shown} -> {written}")
        return 0
    quoted = readme_figures(args.readme.read_text())
    same = quoted == figures
    print(
        f"this demo run ({run_dir}), {FIGURES}: {shown}; {args.readme} quotes "
        f"{', '.join(quoted)}: {'the same' if same else 'different'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
