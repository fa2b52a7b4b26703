"""Explanation heatmaps of a trained run's predictions: an overlay PNG and a JSON per image.

breakhis-ft-explain outputs/runs/demo/<time> a.png b.tif folder/ --out explanations/
breakhis-ft-explain RUN --split test --n 32 --out explanations/   # with the true classes
breakhis-ft-explain RUN --errors --n 32 --out explanations/  # the most confident test errors
breakhis-ft-explain --model exports/medgemma_merged images/ --out explanations/
breakhis-ft-explain RUN --split test --n 8 --level patches --method integrated_gradients

Each image gets <out>/<NNN>_<name>.png (the image, the image with the map of the predicted class
or of --target, prediction, probability and, with --split, the true class) and a .json beside it
(grid, signed attribution, probabilities); <out>/explanations.csv lists them all, with the run
they explain (`source`); `breakhis-ft-report RUN --gallery --explanations <out>` shows them
beside the run's errors. Method and its sanity checks: breakhis_ft/deploy/explain.py. Runs on the
GPU when there is one; --cpu forces the CPU. Images are preprocessed as in training (the run's
stain normaliser, then resized to data.image_size), as breakhis-ft-predict does.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from breakhis_ft.data.breakhis import BadDataError, load_image, scan_from_config
from breakhis_ft.deploy.explain import LEVELS, METHODS, explain_images
from breakhis_ft.deploy.overlay import save_overlay
from breakhis_ft.deploy.predict import (
    PredictError,
    find_images,
    load_predictor,
    load_run_config,
    resolve_source,
)
from breakhis_ft.errors import ModelLoadError
from breakhis_ft.evaluate.errors import most_confident_errors
from breakhis_ft.tools import add_model_arguments, run_tool, tool_parser

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-explain", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--split", help="explain images of the run's split (train, val, test)")
    parser.add_argument(
        "--errors",
        action="store_true",
        help="explain the run's most confident test errors (predictions_test.csv)",
    )
    parser.add_argument(
        "--n", type=int, default=32, help="with --split (all classes in turn) or --errors: how many"
    )
    parser.add_argument("--seed", type=int, default=0, help="with --split: which images")
    parser.add_argument("--out", default="explanations", help="the folder to write")
    parser.add_argument("--target", help="explain this class (a name) instead of the predicted")
    parser.add_argument("--method", choices=METHODS, default="grad_x_input")
    parser.add_argument("--steps", type=int, default=16, help="integrated gradients' steps")
    parser.add_argument(
        "--level", choices=LEVELS, default="tokens", help="MedGemma: soft tokens or patches"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    return parser


def split_images(
    run_dir: Path, split: str, n: int, seed: int, overrides: list[str]
) -> tuple[list[Path], list[str]]:
    """`n` images of the run's `split` (from its splits.csv), classes in turn; with their labels."""
    table = run_dir / "splits.csv"
    if not table.is_file():
        raise PredictError(f"{run_dir}: no splits.csv; --split needs a run folder")
    with table.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    if not rows:
        raise PredictError(f"{table}: no images in split {split!r}")
    by_class: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["path"]):
        by_class.setdefault(row["label"], []).append(row)
    rng = random.Random(seed)
    for members in by_class.values():
        rng.shuffle(members)
    chosen: list[dict] = []
    while len(chosen) < min(n, len(rows)):  # round robin over the classes
        for members in by_class.values():
            if members and len(chosen) < n:
                chosen.append(members.pop())
    root = data_root(run_dir, overrides)
    return [root / row["path"] for row in chosen], [row["label"] for row in chosen]


def data_root(run_dir: Path, overrides: list[str]) -> Path:
    """The folder the run's image paths are relative to."""
    run_cfg = load_run_config(run_dir, overrides)
    return scan_from_config(run_cfg.data, run_cfg.paths.synthetic).root


def error_images(run_dir: Path, n: int, overrides: list[str]) -> tuple[list[Path], list[str]]:
    """The run's `n` most confident test errors (predictions_test.csv); with their true labels."""
    table = run_dir / "predictions_test.csv"
    if not table.is_file():
        raise PredictError(f"{run_dir}: no predictions_test.csv; --errors needs a finished run")
    errors = most_confident_errors(table, n)
    if not errors:
        raise PredictError(f"{table}: the run classified every test image correctly")
    root = data_root(run_dir, overrides)
    return [root / e.path for e in errors], [e.true for e in errors]


def choose_images(
    args: argparse.Namespace, run_dir: str | None, inputs: list[str], names: list[str]
) -> tuple[list[Path], list[int | None]]:
    """The images to explain and their true classes (None where unknown)."""
    if args.errors:
        paths, labels = error_images(Path(run_dir), args.n, args.set)
    elif args.split:
        paths, labels = split_images(Path(run_dir), args.split, args.n, args.seed, args.set)
    else:
        paths = find_images(inputs)
        return paths, [None] * len(paths)
    return paths, [names.index(label) for label in labels]


def explain_to_folder(
    args: argparse.Namespace, predictor: Any, paths: list[Path], truth: list[int | None]
) -> list[dict[str, str]]:
    """Explain the images in batches; write each overlay and its JSON; return the index rows."""
    names = list(predictor.class_names)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    classifier = predictor.classifier.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = str(Path(predictor.source).resolve())
    index: list[dict[str, str]] = []
    for start in range(0, len(paths), args.batch_size):
        batch: list[tuple[int, Path, Image.Image, int | None]] = []
        for number in range(start, min(start + args.batch_size, len(paths))):
            try:
                image = predictor.prepare(load_image(paths[number]))
            except BadDataError as err:  # unreadable: reported, the others go on
                log.warning("skipped %s", err)
                continue
            batch.append((number, paths[number], image, truth[number]))
        if not batch:
            continue
        images = [image for _, _, image, _ in batch]
        target = None if args.target is None else [names.index(args.target)] * len(images)
        explanations = explain_images(
            classifier,
            images,
            target,
            method=args.method,
            steps=args.steps,
            level=args.level,
            batch_size=args.batch_size,
        )
        for (number, path, image, true_class), explanation in zip(batch, explanations, strict=True):
            picture = out / f"{number:03d}_{path.stem}.png"
            save_overlay(image, explanation, names, picture, true_class)
            index.append(
                {
                    "path": str(path),
                    "overlay": picture.name,
                    "pred": names[explanation.predicted],
                    "prob": f"{explanation.probs[explanation.predicted]:.4f}",
                    "true": "" if true_class is None else names[true_class],
                    "target": names[explanation.target],
                    "source": source,
                }
            )
        log.info("%d of %d images explained", len(index), len(paths))
    return index


def main(argv: list[str] | None = None) -> int:
    """Explain the images and write the overlays, their JSON records and explanations.csv."""
    errors = (PredictError, ModelLoadError, ValueError, FileNotFoundError)
    return run_tool(build_parser(), explain, argv, errors, log=True)


def explain(args: argparse.Namespace) -> int:
    """Load the run or export, choose the images, explain them and index them in a CSV."""
    run_dir, inputs = resolve_source(args.source, args.inputs, args.model)
    if (args.split or args.errors) and (run_dir is None or inputs):
        raise PredictError("--split and --errors take a run folder and no image arguments")
    predictor = load_predictor(run_dir, args.model, args.set, args.precision)
    names = list(predictor.class_names)
    if args.target is not None and args.target not in names:
        raise PredictError(f"--target {args.target!r}: not a class of this run ({names})")
    paths, truth = choose_images(args, run_dir, inputs, names)
    index = explain_to_folder(args, predictor, paths, truth)
    if not index:
        raise PredictError("no image could be read")
    out = Path(args.out)
    with (out / "explanations.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(index[0]))
        writer.writeheader()
        writer.writerows(index)
    print(f"{len(index)} explanations -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
