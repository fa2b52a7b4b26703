"""What stain normalisation costs per image: CPU seconds per 700x460 image, per method.

    OMP_NUM_THREADS=1 python -m benchmarks stain-cost     # 24 replica images, both methods
    python -m benchmarks stain-cost --images 48           # results: benchmarks/results/stain_cost.*

The images are the replica's (every subtype, one slide's stain each) rendered at 700x460, BreakHis'
size; the normalisers are fitted on 8 others. Timed: `StainNormalizer.normalize` (the mask, the
checks and the transfer: what building a stain-normalised cache or predicting adds per image),
with `time.process_time` (CPU seconds of the whole process: all threads count) and wall time; and,
for comparison, torchstain's own transfer of the whole image, without mask or checks
(`torchstain_whole_image`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from benchmarks.stain_effect import machine
from breakhis_ft.data.stain import ALPHA, IO, METHODS, StainNormalizer, fit_stain_normalizer
from breakhis_ft.data.synthetic import STYLE, _rng, patient_stain, render_batch

SIZE = (700, 460)  # BreakHis' image size
RESULTS = Path("benchmarks/results")


def replica_images(n: int, seed: int = 0, size: tuple[int, int] = SIZE) -> list[Image.Image]:
    """`n` replica images: subtypes in turn, each with a slide stain of its own."""
    subtypes = list(STYLE)
    out = []
    for i in range(n):
        subtype = subtypes[i % len(subtypes)]
        stain = patient_stain(seed, f"cost-{i}")
        rgb = render_batch(STYLE[subtype], stain, 100, size, 1, _rng(seed, "cost", str(i)))[0]
        out.append(Image.fromarray(rgb))
    return out


def _whole_image(normalizer: StainNormalizer) -> Callable[[Image.Image], Any]:
    """torchstain's transfer of a whole image with a normaliser's parameters (no mask, no check)."""
    p = normalizer.params
    if normalizer.method == "macenko":
        n = NumpyMacenkoNormalizer()
        n.HERef = np.asarray(p["stain_matrix"]).T
        n.maxCRef = np.asarray(p["max_concentrations"])
        return lambda im: n.normalize(np.asarray(im), Io=IO, alpha=ALPHA, beta=0.15, stains=False)
    n = NumpyReinhardNormalizer()
    n.target_means = np.asarray(p["lab_mean"], np.float32)
    n.target_stds = np.asarray(p["lab_std"], np.float32)
    return lambda im: n.normalize(np.asarray(im))


def _time(run: Callable[[Image.Image], Any], images: Sequence[Image.Image]) -> dict[str, float]:
    """Per image: median and mean CPU seconds, mean wall seconds."""
    cpu, wall = [], []
    for image in images:
        c, w = time.process_time(), time.perf_counter()
        run(image)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {
        "cpu_s_median": round(statistics.median(cpu), 4),
        "cpu_s_mean": round(statistics.fmean(cpu), 4),
        "wall_s_mean": round(statistics.fmean(wall), 4),
    }


def measure_cost(
    n_images: int = 24, seed: int = 0, size: tuple[int, int] = SIZE, n_reference: int = 8
) -> dict[str, Any]:
    """Time each method on `n_images` replica images (see the module docstring)."""
    reference = replica_images(n_reference, seed + 1, size)
    images = replica_images(n_images, seed, size)
    results: dict[str, Any] = {}
    for method in METHODS:
        normalizer = fit_stain_normalizer(method, reference)
        normalizer.normalize(images[0])  # warm up
        results[method] = {
            "normalize": _time(normalizer.normalize, images),
            "torchstain_whole_image": _time(_whole_image(normalizer), images),
            "kept_as_they_were": sum(normalizer.normalize(im)[1] is not None for im in images),
        }
    where = {**machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return {"images": n_images, "size": list(size), "machine": where, "methods": results}


def table(result: dict[str, Any]) -> str:
    """Markdown: per method, CPU seconds per image (median, mean) and wall seconds."""
    where = result["machine"]
    load = [round(x, 2) for x in where["load_average_at_start"]]
    lines = [
        f"CPU seconds per {result['size'][0]}x{result['size'][1]} image, {result['images']} "
        f"replica images; {where['cpu']}, {where['cpus']} cores, load {load}, OMP_NUM_THREADS="
        f"{where['omp_num_threads']}",
        "",
        "| method | what | CPU s (median) | CPU s (mean) | wall s (mean) |",
        "|---|---|---|---|---|",
    ]
    for method, r in result["methods"].items():
        for what in ("normalize", "torchstain_whole_image"):
            t = r[what]
            lines.append(
                f"| {method} | {what} | {t['cpu_s_median']:.3f} | {t['cpu_s_mean']:.3f} | "
                f"{t['wall_s_mean']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write the JSON and Markdown results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--json", type=Path, default=RESULTS / "stain_cost.json")
    p.add_argument("--md", type=Path, default=RESULTS / "stain_cost.md")
    args = p.parse_args(argv)
    result = measure_cost(args.images)
    text = table(result)
    print(text)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.md.write_text(text + "\n")
    return 0
