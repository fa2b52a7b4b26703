"""Explanation heatmaps of a trained run's predictions: an overlay PNG and a JSON per image.

python scripts/explain.py outputs/runs/demo/<time> a.png b.tif folder/ --out explanations/
python scripts/explain.py RUN --split test --n 32 --out explanations/   # with the true classes
python scripts/explain.py --model exports/medgemma_merged images/ --out explanations/
python scripts/explain.py RUN --split test --n 8 --level patches --method integrated_gradients

Each image gets <out>/<NNN>_<name>.png (the image, the image with the map of the predicted class
or of --target, prediction, probability and, with --split, the true class) and a .json beside it
(grid, signed attribution, probabilities); <out>/explanations.csv lists them all. Method and its
sanity checks: breakhis_ft/deploy/explain.py. Runs on the GPU when there is one; --cpu forces the
CPU. Images are resized as in training (data.image_size), as predict.py does.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
from pathlib import Path

import torch

from breakhis_ft.data.breakhis import BadDataError, load_image, scan_from_config
from breakhis_ft.data.dataset import resize_longest
from breakhis_ft.deploy.explain import LEVELS, METHODS, explain_images
from breakhis_ft.deploy.overlay import save_overlay

# After the restructure these live in breakhis_ft.deploy.predict.
from breakhis_ft.deploy.predict import PredictError, find_images, load_predictor, load_run_config

log = logging.getLogger("explain")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", nargs="?", help="a run folder (outputs/runs/<experiment>/<time>); or use --model"
    )
    parser.add_argument("inputs", nargs="*", help="image files and folders (searched recursively)")
    parser.add_argument("--model", help="an exported model folder (scripts/export_model.py)")
    parser.add_argument("--split", help="explain images of the run's split (train, val, test)")
    parser.add_argument("--n", type=int, default=32, help="with --split: how many, all classes")
    parser.add_argument("--seed", type=int, default=0, help="with --split: which images")
    parser.add_argument("--out", default="explanations", help="the folder to write")
    parser.add_argument("--target", help="explain this class (a name) instead of the predicted")
    parser.add_argument("--method", choices=METHODS, default="grad_x_input")
    parser.add_argument("--steps", type=int, default=16, help="integrated gradients' steps")
    parser.add_argument(
        "--level", choices=LEVELS, default="tokens", help="MedGemma: soft tokens or patches"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument("--precision", choices=("bf16", "fp32", "fp16"), help="default: the run's")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the run's config, e.g. model.name_or_path=/local/medgemma-4b-it",
    )
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
    run_cfg = load_run_config(run_dir, overrides)
    root = scan_from_config(run_cfg.data, run_cfg.paths.synthetic).root
    return [root / row["path"] for row in chosen], [row["label"] for row in chosen]


def main(argv: list[str] | None = None) -> int:
    """Explain the images and write the overlays, their JSON records and explanations.csv."""
    args = build_parser().parse_args(argv)
    inputs = list(args.inputs)
    run_dir = args.source
    if args.model and run_dir is not None:  # with --model, the first positional is an input
        inputs, run_dir = [run_dir, *inputs], None
    if run_dir is None and not args.model:
        raise PredictError("give a run folder, or an exported model with --model")
    if args.split and (run_dir is None or inputs):
        raise PredictError("--split takes a run folder and no image arguments")
    predictor = load_predictor(run_dir, args.model, args.set, args.precision)
    names = list(predictor.class_names)
    if args.split:
        paths, labels = split_images(Path(run_dir), args.split, args.n, args.seed, args.set)
        truth: list[int | None] = [names.index(label) for label in labels]
    else:
        paths = find_images(inputs)
        truth = [None] * len(paths)
    if args.target is not None and args.target not in names:
        raise PredictError(f"--target {args.target!r}: not a class of this run ({names})")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    classifier = predictor.classifier.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for start in range(0, len(paths), args.batch_size):
        batch_paths, images, batch_truth = [], [], []
        chunk = slice(start, start + args.batch_size)
        for path, true_class in zip(paths[chunk], truth[chunk], strict=True):
            try:
                images.append(resize_longest(load_image(path), predictor.image_size))
            except BadDataError as err:  # unreadable: reported, the others go on
                log.warning("skipped %s", err)
                continue
            batch_paths.append(path)
            batch_truth.append(true_class)
        if not images:
            continue
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
        for offset, (path, image, explanation, true_class) in enumerate(
            zip(batch_paths, images, explanations, batch_truth, strict=True)
        ):
            number = start + offset
            picture = out / f"{number:03d}_{Path(path).stem}.png"
            save_overlay(image, explanation, names, picture, true_class)
            index.append(
                {
                    "path": str(path),
                    "overlay": picture.name,
                    "pred": names[explanation.predicted],
                    "prob": f"{explanation.probs[explanation.predicted]:.4f}",
                    "true": "" if true_class is None else names[true_class],
                    "target": names[explanation.target],
                }
            )
        log.info("%d of %d images explained", len(index), len(paths))
    if not index:
        raise PredictError("no image could be read")
    with (out / "explanations.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(index[0]))
        writer.writeheader()
        writer.writerows(index)
    print(f"{len(index)} explanations -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main())
    except (PredictError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
