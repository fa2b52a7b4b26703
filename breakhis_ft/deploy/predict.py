"""Classify new images with a trained run or an exported model: a CSV of classes and probabilities.

The classifier is rebuilt from the run's saved config (`.hydra/config.yaml`) and its best weights
(`best/`), or from a folder written by `export.py` (its `export_info.json`). Images get the
training's preprocessing: decoded as RGB by the function training uses (16-bit greyscale scaled
by its range, images above data.max_image_pixels refused), stain-normalised with the run's fitted
normaliser when it used one (`stain_normalizer.json` in the run or export folder;
data.stain_norm), resized as the image cache does (longest side at most `data.image_size`, shorter
side kept at the model's input side), then the model's own processor. A
SigLIP linear probe trained on embeddings of the original files, so its images are not resized
first, and its embeddings of new images are computed with the encoder here. Unreadable images
become rows with an `error` and no prediction. The probabilities are temperature-scaled with the
temperature the run fitted on its validation split (`calibration.json`; `export_info.json` of an
export) unless that is turned off, and the images of one patient can be fused into one diagnosis
(`predict_patient`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from breakhis_ft.data.dataset import preprocess_image
from breakhis_ft.data.png import MAX_IMAGE_PIXELS, load_image
from breakhis_ft.data.stain import NORMALIZER_FILE, StainNormalizer, load_normalizer
from breakhis_ft.deploy.loading import (
    PredictError,
    classifier_from_run,
    load_exported_classifier,
    load_run_config,
    preprocess_size,
    read_export_info,
)
from breakhis_ft.errors import BadDataError
from breakhis_ft.evaluate.calibration import apply_temperature, read_temperature
from breakhis_ft.evaluate.fusion import fuse_by_patient
from breakhis_ft.models.base import Classifier

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class Predictor:
    """A classifier ready for new images and the preprocessing its training used."""

    classifier: Classifier
    image_size: int | None  # longest side before the model's processor; None: images as they are
    source: str  # the run folder or exported model it came from
    precision: str = "fp32"  # bf16 | fp16 | fp32: accelerate's mixed precision while predicting
    stain: StainNormalizer | None = None  # the run's stain normaliser (data.stain_norm)
    temperature: float | None = None  # probabilities are softmax(log p / T); None: as the model
    fusion: str = "mean_log_prob"  # how predict_patient fuses images (the run's setting)
    model_side: int | None = None  # the square the model reads: caps the resize, as in training
    max_pixels: int | None = MAX_IMAGE_PIXELS  # larger images are refused (data.max_image_pixels)

    def prepare(self, image: Image.Image) -> Image.Image:
        """An RGB image preprocessed as in training: stain-normalised, then resized."""
        out, reason = preprocess_image(image, self.image_size, self.stain, self.model_side)
        if reason is not None:
            name = getattr(image, "filename", "") or "an image"
            log.warning("stain normalisation left %s unchanged: %s", name, reason)
        return out

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes, in the order of the probability columns."""
        return tuple(self.classifier.class_names)

    @property
    def embeds_images(self) -> bool:
        """A SigLIP probe: its batches are embeddings computed here with the frozen encoder."""
        return not self.classifier.needs_images


# ---- loading ------------------------------------------------------------------------------------


def run_stain(folder: Path, cfg: Any) -> StainNormalizer | None:
    """The stain normaliser saved in a run or export folder, checked against data.stain_norm."""
    method = str(cfg.data.stain_norm)
    if method == "none":
        return None
    try:
        stain = load_normalizer(folder)
    except ValueError as err:
        raise PredictError(str(err)) from err
    if stain is None or stain.method != method:
        found = "none" if stain is None else stain.method
        raise PredictError(
            f"{folder}: the run used data.stain_norm={method}, but its {NORMALIZER_FILE} holds "
            f"{found}; predictions without the run's normaliser would not match its training. "
            "Copy the file from the run folder (export_model.py does)"
        )
    return stain


def load_predictor(
    run_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    precision: str | None = None,
    temperature: bool = True,
) -> Predictor:
    """A Predictor from a run folder, or from an exported model folder (`export.py`).

    `overrides` (`key=value`) change the run's saved config, e.g. `model.name_or_path=/local/copy`;
    `precision` (bf16 | fp32 | fp16) replaces the run's precision; `temperature=False` keeps the
    model's own probabilities instead of the temperature-scaled ones.
    """
    if (run_dir is None) == (model_dir is None):
        raise PredictError("give either a run folder or an exported model folder (--model)")
    overrides = [*overrides, *([f"precision.name={precision}"] if precision else [])]
    if model_dir is not None:
        info = read_export_info(Path(model_dir))
        classifier, cfg = load_exported_classifier(Path(model_dir), info, overrides)
        size = info.get("image_size")
        fitted = info.get("temperature")
        size = None if size is None else int(size)
        source = str(model_dir)
    else:
        cfg = load_run_config(run_dir, overrides)
        classifier = classifier_from_run(cfg, run_dir)
        fitted = read_temperature(run_dir)  # calibration.json: fitted on the run's val split
        size, source = preprocess_size(cfg, classifier), str(run_dir)
    return Predictor(
        classifier,
        size,
        source,
        str(cfg.precision.name),
        stain=run_stain(Path(source), cfg),
        temperature=float(fitted) if temperature and fitted is not None else None,
        fusion=str(cfg.evaluate.patient_fusion),
        model_side=None if size is None else classifier.input_side,
        max_pixels=int(cfg.data.max_image_pixels),
    )


def resolve_source(
    source: str | None, inputs: Sequence[str], model: str | None
) -> tuple[str | None, list[str]]:
    """(run folder or None, image inputs) from a script's positionals: with --model (an exported
    model) the first positional is an image input, not a run folder; one of the two is needed."""
    inputs = list(inputs)
    if model and source is not None:
        inputs, source = [source, *inputs], None
    if source is None and not model:
        raise PredictError("give a run folder, or an exported model with --model")
    return source, inputs


def find_images(inputs: Sequence[str | Path], list_files: Sequence[str | Path] = ()) -> list[Path]:
    """Image files: folders searched recursively (png/jpg/tif), files and list-file lines as given.

    A file named explicitly is kept whatever it holds, so an unreadable one is reported, not lost.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            found.append(path)
    for list_file in list_files:
        lines = Path(list_file).read_text().splitlines()
        found += [Path(line.strip()) for line in lines if line.strip()]
    if not found:
        raise PredictError(
            f"no images found in {[str(i) for i in inputs] + [str(f) for f in list_files]} "
            f"(folders are searched recursively for {', '.join(IMAGE_SUFFIXES)})"
        )
    return list(dict.fromkeys(found))


class ImageFiles(torch.utils.data.Dataset):
    """Items {"path", "index", "image" (PIL RGB, preprocessed) or None, "error" (str or None)}.

    Decoded and preprocessed as in training: stain-normalised with `stain` (when given), then
    resized by `image_size` and `model_side`; an unreadable, corrupt or oversized (above
    `max_pixels`) file becomes an item with its error.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        image_size: int | None,
        stain: StainNormalizer | None = None,
        model_side: int | None = None,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.stain = stain
        self.model_side = model_side
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        item: dict[str, Any] = {"path": str(path), "index": index, "image": None, "error": None}
        if not path.is_file():
            item["error"] = f"{path}: file not found"
            return item
        try:
            image, reason = preprocess_image(
                load_image(path, self.max_pixels), self.image_size, self.stain, self.model_side
            )
            item["image"] = image
            if reason is not None:  # no stain to estimate: classified as it is, with a warning
                log.warning("stain normalisation left %s unchanged: %s", path, reason)
        except BadDataError as err:
            item["error"] = str(err)
        return item


# ---- prediction ---------------------------------------------------------------------------------


def _batch(predictor: Predictor, items: list[dict[str, Any]]) -> dict[str, Any]:
    examples = [{**it, "label": 0} for it in items]  # no labels for new images
    if predictor.embeds_images:
        clf: Any = predictor.classifier
        return {"embeddings": clf.embed_images([it["image"] for it in items])}
    return predictor.classifier.collate(examples, train=False)


def _scaled(probs: np.ndarray, temperature: float | None) -> list[list[float]]:
    """Rows of probabilities, temperature-scaled when a temperature is given."""
    if temperature is None:
        return probs.tolist()
    return apply_temperature(probs, temperature).tolist()


@torch.no_grad()
def predict_files(
    predictor: Predictor,
    paths: Sequence[Path],
    batch_size: int = 16,
    cpu: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield one row per image, in order: path, pred, prob_<class> ... (or error)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from breakhis_ft.models.precision import MIXED_PRECISION

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by accelerate launch / torchrun
        raise PredictError(
            "predict runs in one process (each rank would write the whole CSV): start it with "
            "breakhis-ft-predict, not accelerate launch"
        )
    accelerator = Accelerator(cpu=cpu, mixed_precision=MIXED_PRECISION[predictor.precision])
    classifier = predictor.classifier
    classifier.to(accelerator.device)
    classifier.eval()
    loader = torch.utils.data.DataLoader(
        ImageFiles(
            paths,
            predictor.image_size,
            predictor.stain,
            predictor.model_side,
            predictor.max_pixels,
        ),
        batch_size=batch_size,
        collate_fn=list,
        num_workers=num_workers,
    )
    names = predictor.class_names
    try:
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
            for items in loader:
                good = [it for it in items if it["error"] is None]
                probs: dict[int, list[float]] = {}
                if good:
                    with accelerator.autocast():
                        out = classifier.predict_proba(_batch(predictor, good))
                    rows = _scaled(out.float().cpu().numpy(), predictor.temperature)
                    probs = {it["index"]: row for it, row in zip(good, rows, strict=True)}
                for it in items:
                    row: dict[str, Any] = {"path": it["path"], "pred": "", "error": it["error"]}
                    if it["index"] in probs:
                        p = probs[it["index"]]
                        row["pred"] = names[max(range(len(p)), key=p.__getitem__)]
                        row.update({f"prob_{n}": v for n, v in zip(names, p, strict=True)})
                    yield row
                bar.update(len(items))
    finally:
        if accelerator.num_processes == 1:  # a later Accelerator in this process starts afresh
            AcceleratorState._reset_state(reset_partial_state=True)


def csv_columns(class_names: Sequence[str]) -> list[str]:
    """The output columns: path, pred, prob_<class> for each class, error."""
    return ["path", "pred", *[f"prob_{n}" for n in class_names], "error"]


def write_predictions_csv(
    rows: Iterator[dict[str, Any]], class_names: Sequence[str], out: str | Path
) -> tuple[int, int]:
    """Write rows as they come (a long job keeps what it did); return (predicted, failed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = failed = 0
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(class_names), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "error": row.get("error") or ""})
            failed += bool(row.get("error"))
            done += not row.get("error")
    return done, failed


def predict_to_csv(
    predictor: Predictor,
    paths: Sequence[Path],
    out: str | Path,
    batch_size: int = 16,
    cpu: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[int, int]:
    """Classify `paths` and write the CSV at `out`; return (predicted, unreadable) counts."""
    rows = predict_files(predictor, paths, batch_size, cpu, num_workers, progress)
    done, failed = write_predictions_csv(rows, predictor.class_names, out)
    if failed:
        log.warning("%d of %d images could not be read (see the error column)", failed, len(paths))
    return done, failed


def fuse_rows(
    rows: Sequence[dict[str, Any]], class_names: Sequence[str], method: str, patient: str
) -> dict[str, Any]:
    """One row for a patient from its images' rows: pred, prob_<class> (fused), counts."""
    good = [r for r in rows if not r.get("error")]
    row: dict[str, Any] = {
        "patient": patient,
        "n_images": len(good),
        "n_unreadable": len(rows) - len(good),
        "fusion": method,
        "pred": "",
    }
    if good:
        probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in good])
        _, fused = fuse_by_patient(probs, [patient] * len(good), method)  # type: ignore[arg-type]
        row["pred"] = class_names[int(fused[0].argmax())]
        row.update({f"prob_{c}": float(v) for c, v in zip(class_names, fused[0], strict=True)})
    return row


def predict_patient(
    predictor: Predictor,
    paths: Sequence[Path],
    out: str | Path,
    patient: str,
    method: str | None = None,
    **predict_kw: Any,
) -> dict[str, Any]:
    """Classify one patient's images and write ONE fused row to `out` (the per-image rows go to
    `<out>_images.csv` beside it); `method` defaults to the run's `evaluate.patient_fusion`."""
    out = Path(out)
    method = method or predictor.fusion
    images_out = out.with_name(f"{out.stem}_images{out.suffix or '.csv'}")
    kept: list[dict[str, Any]] = []

    def keep(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            kept.append(row)
            yield row

    rows = keep(predict_files(predictor, paths, **predict_kw))
    write_predictions_csv(rows, predictor.class_names, images_out)
    fused = fuse_rows(kept, predictor.class_names, method, patient)
    if not fused["n_images"]:
        raise PredictError(f"none of the {len(paths)} images of {patient} could be read")
    columns = ["patient", "n_images", "n_unreadable", "fusion", "pred"]
    columns += [f"prob_{c}" for c in predictor.class_names]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerow(fused)
    return fused
