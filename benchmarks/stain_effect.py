"""Measure what stain normalisation does to the demo: test balanced accuracy with and without it.

python -m benchmarks stain-effect                 # none vs macenko, seeds 1 2 3: 6 demo runs
python -m benchmarks stain-effect --methods none macenko reinhard --seeds 1 2 3 4 5
python -m benchmarks stain-effect --quick         # tiny runs: checks the code, not stain

Each run is `breakhis-ft experiment=demo seed=S data.stain_norm=M logger=none` in its own
process, in <work>/<method>_seed<S> (default work folder: outputs/stain_effect/<time>). The
replica varies stain colour per patient, and the split holds patients out, so the test images'
stains are ones training never saw: what normalisation is for. The same seeds serve every
method, so each seed also gives a paired difference against `none`. Printed: a Markdown table
of mean +- std (sample std, n - 1) of test/balanced_accuracy per method and the per-seed values;
written: benchmarks/results/stain_effect.json (every run's metrics, wall time, the command, the
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

METRIC = "balanced_accuracy"  # of the test split
# --quick: a small replica, 2 steps; says only that the runs, the table and the JSON work
QUICK = [
    "data.synthetic_fraction=0.03",
    "data.synthetic_size=[48,32]",
    "data.image_size=32",
    "trainer.max_steps=2",
    "data.stain_reference_images=8",
]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["none", "macenko"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: outputs/...)")
    parser.add_argument(
        "--json", type=Path, help="results file (default: benchmarks/results/stain_effect.json)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny runs, results in --work only")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="another override"
    )
    return parser


def machine() -> dict[str, Any]:
    """Where the runs ran: CPU, cores, load when they started, torch."""
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "torch": torch_version,
        "host_platform": platform.platform(),
    }


def run_one(overrides: list[str], folder: Path) -> dict[str, Any]:
    """One entrypoint run in `folder`; its test metrics, wall time and status."""
    argv = [sys.executable, "-m", "breakhis_ft", *overrides, f"hydra.run.dir={folder}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {
        "folder": str(folder),
        "wall_s": round(wall, 1),
        "overrides": overrides,
    }
    metrics_file = folder / "metrics.json"
    if done.returncode != 0 or not metrics_file.is_file():
        result.update(status="failed", log_tail=(done.stdout + done.stderr)[-2000:])
        return result
    test = json.loads(metrics_file.read_text()).get("test") or {}
    scalars = ("balanced_accuracy", "accuracy", "f1_macro", "auroc_macro", "patient_accuracy")
    result.update(status="completed", test={k: test.get(k) for k in scalars})
    stats = json.loads((folder / "data_stats.json").read_text()).get("stain_normalization")
    if stats:
        result["stain"] = {k: stats[k] for k in ("identity", "reference_images", "passed_through")}
    return result


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: dict[str, dict[int, dict]], methods: list[str], seeds: list[int]) -> dict:
    """Per method: the metric per seed, mean, std; and the paired difference against `none`."""
    out: dict[str, Any] = {}
    for method in methods:
        values = {s: runs[method][s].get("test", {}).get(METRIC) for s in seeds}
        got = [v for v in values.values() if v is not None]
        mean, std = mean_std(got)
        out[method] = {"per_seed": values, "mean": mean, "std": std, "n": len(got)}
        if method != "none" and "none" in runs:
            base = {s: runs["none"][s].get("test", {}).get(METRIC) for s in seeds}
            diffs = [values[s] - base[s] for s in seeds if None not in (values[s], base[s])]
            d_mean, d_std = mean_std(diffs)
            out[method]["paired_difference_vs_none"] = {"mean": d_mean, "std": d_std}
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(summary: dict[str, Any], seeds: list[int]) -> str:
    """Markdown: method, mean +- std, difference vs none, per-seed values."""
    lines = [
        f"| stain_norm | test {METRIC} (mean +- std) | vs none (paired) | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " |",
        "|---|---|---|" + "---|" * len(seeds),
    ]
    for method, s in summary.items():
        diff = s.get("paired_difference_vs_none")
        vs = "-" if not diff else f"{diff['mean']:+.3f} +- {_fmt(diff['std'])}"
        cells = [method, f"{_fmt(s['mean'])} +- {_fmt(s['std'])} (n={s['n']})", vs]
        cells += [_fmt(s["per_seed"][seed]) for seed in seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every method x seed, print the table, write the JSON; 1 if a run failed."""
    args = build_parser().parse_args(argv)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    work = args.work or Path("outputs") / "stain_effect" / stamp
    out_json = args.json or (work / "stain_effect_quick.json" if args.quick else None)
    out_json = out_json or Path("benchmarks/results/stain_effect.json")
    extra = [*(QUICK if args.quick else []), "logger=none", *args.set]
    info = {"started": stamp, "machine": machine(), "argv": sys.argv, "extra_overrides": extra}
    runs: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    for seed in args.seeds:  # seed-major: an interrupted measurement has complete pairs
        for method in args.methods:
            overrides = [f"experiment={args.experiment}", f"seed={seed}"]
            overrides += [f"data.stain_norm={method}", *extra]
            result = run_one(overrides, work / f"{method}_seed{seed}")
            runs[method][seed] = result
            value = (result.get("test") or {}).get(METRIC)
            print(
                f"{method} seed {seed}: {result['status']}, test {METRIC} {_fmt(value)}, "
                f"{result['wall_s']} s",
                file=sys.stderr,
            )
    summary = summarise(runs, args.methods, args.seeds)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    payload = {**info, "metric": f"test/{METRIC}", "summary": summary, "runs": runs}
    out_json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(table(summary, args.seeds))
    print(f"wrote {out_json}", file=sys.stderr)
    failed = [
        r for by_seed in runs.values() for r in by_seed.values() if r["status"] != "completed"
    ]
    for r in failed:
        print(f"FAILED {r['folder']}:\n{r['log_tail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
