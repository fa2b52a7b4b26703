"""The demo's figures: compare a `make demo` run with the recorded ones, or record them.

python scripts/demo_metrics.py                     # newest completed outputs/runs/demo/* vs record
python scripts/demo_metrics.py RUN_DIR             # a given demo run folder
python scripts/demo_metrics.py --record            # write benchmarks/demo_metrics.json and the
                                                   # README's figure from the newest demo run

The README quotes the demo's test and validation balanced accuracy; a test checks that the quote
equals benchmarks/demo_metrics.json, which only `--record` (make demo-record) writes, from a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECORD = REPO / "benchmarks" / "demo_metrics.json"
README = REPO / "README.md"
# the README's sentence: "... a test balanced accuracy of 0.350 (validation 0.477) ..."
README_FIGURE = re.compile(r"test balanced accuracy of (\d\.\d{3}) \(validation (\d\.\d{3})\)")


def readme_figures(text: str) -> tuple[str, str]:
    """(test, validation) balanced accuracy as the README quotes them, three decimals."""
    found = README_FIGURE.findall(text)
    if len(found) != 1:
        raise ValueError(
            f"README: expected one 'test balanced accuracy of X.XXX (validation Y.YYY)', "
            f"found {len(found)}"
        )
    return found[0]


def recorded_figures(record: dict[str, Any]) -> tuple[str, str]:
    """(test, validation) balanced accuracy of a record, formatted as the README quotes them."""
    return f"{record['test_balanced_accuracy']:.3f}", f"{record['val_balanced_accuracy']:.3f}"


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
    return {
        "test_balanced_accuracy": metrics["test"]["balanced_accuracy"],
        "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
        "command": "make demo (breakhis-ft experiment=demo)",
        "run": run_dir.name,
        "git": info.get("git"),
        "versions": info.get("versions"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
    }


def write_readme(readme: Path, test: str, val: str) -> None:
    """Put the figures into the README's sentence."""
    text = readme.read_text()
    readme_figures(text)  # exactly one sentence to change
    new = README_FIGURE.sub(f"test balanced accuracy of {test} (validation {val})", text)
    readme.write_text(new)


def main(argv: list[str] | None = None) -> int:
    """Compare (0: same figures, 1: different) or, with --record, write record and README."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, help="a demo run folder (default: newest)")
    parser.add_argument("--outputs", type=Path, default=REPO / "outputs")
    parser.add_argument("--record", action="store_true", help="write the record and the README")
    args = parser.parse_args(argv)
    run_dir = args.run or newest_demo_run(args.outputs)
    record = record_of(run_dir)
    test, val = recorded_figures(record)
    if args.record:
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        write_readme(README, test, val)
        print(f"recorded {run_dir}: test {test}, validation {val} -> {RECORD}, {README}")
        return 0
    quoted = readme_figures(README.read_text())
    same = quoted == (test, val)
    print(
        f"this demo run ({run_dir}): test balanced accuracy {test}, validation {val}; "
        f"the README quotes {quoted[0]} / {quoted[1]}: {'the same' if same else 'different'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, KeyError) as err:
        sys.exit(f"error: {err}")
