"""How many resamples `breakhis-ft-report --compare` needs for a verdict that does not depend on
its seed: the Monte-Carlo spread of the paired interval's bounds over bootstrap seeds.

    OMP_NUM_THREADS=1 python -m benchmarks compare-resamples
    # -> benchmarks/results/compare_resamples.json

Two splits, two runs A and B on each whose balanced accuracies differ by about nothing (the case
where the verdict, "does the interval of A - B hold 0?", is closest to flipping):
- `demo`: the demo's test split as `make demo` draws it (15 stems: 8 ductal, 2 mucinous, one of
  each of 5 other classes; 274 images);
- `200_images`: 8 classes of 3 to 8 stems (33 stems, 224 images; the peer benchmark's size).
Each image's class probabilities come from a per-stem skill (images of one stem are right or
wrong together, as real slides are) plus per-image noise; the two runs share part of each stem's
skill (some stems are hard for both) and differ in the rest and in the noise.
For each number of resamples the paired bootstrap (`paired_bootstrap`, balanced accuracy) runs
with `--seeds` bootstrap seeds; the spread (standard deviation) of the lower and upper bound
over the seeds is the Monte-Carlo error of the printed interval; `flip_band_95` (1.96 times the
larger spread) is how close to 0 a bound must be for its verdict to change between seeds, and
`verdict_flips` the share of seeds whose verdict differs from the most common one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stain_effect import machine
from breakhis_ft.evaluate.bootstrap import balanced_accuracy
from breakhis_ft.evaluate.compare import paired_bootstrap

RESULTS = Path("benchmarks/results")
RESAMPLES = (1000, 2000, 5000, 10000)
# images per stem of each class in the demo's test split (make demo, split seed 0)
DEMO_SPLIT = {
    1: [16],
    2: [15],
    3: [16],
    4: [9, 16, 15, 10, 34, 19, 11, 22],
    5: [26],
    6: [15, 32],
    7: [18],
}
# 8 classes of 3 to 8 stems, 3 to 12 images a stem: 224 images (a seeded draw, fixed here)
SPLIT_200 = {
    0: [3, 9, 5],
    1: [12, 4, 7, 6, 3],
    2: [8, 5, 10],
    3: [6, 11, 4, 9],
    4: [7, 3, 12, 5, 8, 10, 4, 6],
    5: [9, 6, 4],
    6: [5, 10, 7, 3],
    7: [11, 4, 8],
}

# each split with the seed (of 0-5) whose two simulated runs differ least in balanced accuracy
SPLITS = {"demo": (DEMO_SPLIT, 5), "200_images": (SPLIT_200, 4)}


def simulate(split: dict[int, list[int]], seed: int) -> tuple[np.ndarray, ...]:
    """(probs_a, probs_b, labels, stems) of two runs of about equal skill on a split's stems."""
    rng = np.random.default_rng(seed)
    labels, stems, skill_a, skill_b = [], [], [], []
    for c, sizes in split.items():
        for k, n in enumerate(sizes):
            shared = rng.normal(0.0, 1.5)  # some stems easy, some hard for both runs
            labels += [c] * n
            stems += [f"{c}-{k}"] * n
            skill_a += [shared + rng.normal(0.0, 0.75)] * n  # each run its own stems
            skill_b += [shared + rng.normal(0.0, 0.75)] * n
    target = np.asarray(labels)
    probs = []
    for skill in (skill_a, skill_b):
        logits = rng.normal(0.0, 1.0, (len(target), 8))
        logits[np.arange(len(target)), target] += 1.0 + np.asarray(skill)
        probs.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return probs[0], probs[1], target, np.asarray(stems)


def spread(split: dict[int, list[int]], seeds: int, data_seed: int) -> dict[str, Any]:
    """Bounds of the paired interval of balanced accuracy over bootstrap seeds, per resamples."""
    probs_a, probs_b, labels, stems = simulate(split, data_seed)
    rows: dict[str, Any] = {}
    for n in RESAMPLES:
        start = time.perf_counter()
        runs = [
            paired_bootstrap(balanced_accuracy, probs_a, probs_b, labels, stems, n, seed)
            for seed in range(seeds)
        ]
        seconds = (time.perf_counter() - start) / seeds
        lo = [r["ci95"][0] for r in runs]
        hi = [r["ci95"][1] for r in runs]
        verdicts = [a <= 0.0 <= b for a, b in zip(lo, hi, strict=True)]
        common = max(set(verdicts), key=verdicts.count)
        rows[str(n)] = {
            "lo_mean": round(statistics.fmean(lo), 4),
            "hi_mean": round(statistics.fmean(hi), 4),
            "lo_sd": round(statistics.stdev(lo), 5),
            "hi_sd": round(statistics.stdev(hi), 5),
            "verdict_flips": round(sum(v != common for v in verdicts) / seeds, 3),
            # a bound this close to 0 may land on either side of it from one seed to another
            "flip_band_95": round(1.96 * max(statistics.stdev(lo), statistics.stdev(hi)), 4),
            "seconds_per_comparison": round(seconds, 3),
        }
    difference = balanced_accuracy(probs_a, labels) - balanced_accuracy(probs_b, labels)
    return {
        "images": len(labels),
        "stems": len(set(stems.tolist())),
        "difference": round(float(difference), 4),
        "by_resamples": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure both splits and write benchmarks/results/compare_resamples.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="bootstrap seeds per setting")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_resamples.json")
    args = parser.parse_args(argv)
    result = {
        "metric": "balanced_accuracy",
        "command": "OMP_NUM_THREADS=1 python -m benchmarks compare-resamples",
        "seeds": args.seeds,
        "machine": machine(),
        "splits": {
            name: spread(split, args.seeds, data_seed)
            for name, (split, data_seed) in SPLITS.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["splits"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
