"""Classify new images with a trained run (or an exported model); write a CSV of probabilities.

breakhis-ft-predict outputs/runs/demo/<time> /path/to/images --out preds.csv
breakhis-ft-predict RUN a.png b.tif --list more_files.txt --cpu
breakhis-ft-predict --model exports/medgemma_merged /path/to/images --out preds.csv
breakhis-ft-predict RUN images/ --set model.name_or_path=/models/medgemma-4b-it

breakhis-ft-predict RUN patient_17/ --patient --out patient_17.csv   # one fused diagnosis

Folders are searched recursively for png/jpg/tif. The CSV has `path`, `pred`, `prob_<class>` per
image and an `error` column: an unreadable image gets its error there and no prediction. Runs on
the GPU when there is one (accelerate); --cpu forces the CPU. Probabilities are scaled by the
temperature the run fitted on its validation split (--no-temperature: the model's own). With
--patient all the images are one patient's: --out gets one fused row (the run's fusion method,
or --fusion), and the per-image rows go to <out>_images.csv.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from breakhis_ft.deploy.predict import (
    PredictError,
    find_images,
    load_predictor,
    predict_patient,
    predict_to_csv,
    resolve_source,
)
from breakhis_ft.errors import ModelLoadError
from breakhis_ft.evaluate.fusion import METHODS
from breakhis_ft.tools import add_model_arguments, run_tool, tool_parser

# a slide's magnification folder in BreakHis' tree (<patient>/100X/): it names no patient
MAGNIFICATION_FOLDER = re.compile(r"^\d+[xX]$")


def default_patient_id(first_input: str | Path) -> str:
    """--patient without an ID: the input folder's name (a file's stem), its parent's for a
    magnification folder (SOB_B_A_14-22549AB/100X/ names the patient SOB_B_A_14-22549AB)."""
    path = Path(first_input).expanduser().absolute()
    if path.is_dir() and MAGNIFICATION_FOLDER.match(path.name) and path.parent.name:
        return path.parent.name
    return path.name if path.is_dir() else path.stem


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-predict", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--list", action="append", default=[], help="a text file, one path a line")
    parser.add_argument("--out", default="predictions.csv", help="the CSV to write")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-temperature",
        action="store_true",
        help="the model's own probabilities, not scaled by the run's fitted temperature",
    )
    parser.add_argument(
        "--patient",
        nargs="?",
        const="",
        metavar="ID",
        help="the images are one patient's: write one fused diagnosis (ID: default the input "
        "folder's name; a magnification folder's parent: SOB_B_A_14-22549AB/100X/)",
    )
    parser.add_argument(
        "--fusion",
        choices=METHODS,
        help="how --patient fuses the images (default: the run's evaluate.patient_fusion)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Classify the images and write the CSV; 0 on success (unreadable images are in the CSV)."""
    errors = (PredictError, ModelLoadError, ValueError, FileNotFoundError)
    return run_tool(build_parser(), predict, argv, errors, log=True)


def predict(args: argparse.Namespace) -> int:
    """Load the run or export, classify every image (or fuse one patient's) and write the CSV."""
    run_dir, inputs = resolve_source(args.source, args.inputs, args.model)
    predictor = load_predictor(
        run_dir, args.model, args.set, args.precision, temperature=not args.no_temperature
    )
    paths = find_images(inputs, args.list)
    kw = {
        "batch_size": args.batch_size,
        "cpu": args.cpu,
        "num_workers": args.workers,
        "progress": not args.no_progress,
    }
    if args.patient is not None:
        patient = args.patient or default_patient_id(inputs[0] if inputs else args.list[0])
        row = predict_patient(predictor, paths, args.out, patient, args.fusion, **kw)
        print(
            f"{patient}: {row['pred']} from {row['n_images']} images ({row['fusion']}; "
            f"{row['n_unreadable']} unreadable) -> {Path(args.out)}",
            file=sys.stderr,
        )
        return 0
    done, failed = predict_to_csv(predictor, paths, args.out, **kw)
    print(f"{done} predicted, {failed} unreadable -> {Path(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
