"""After the final evaluation: temperature scaling fitted on val, reliability diagrams, and the
temperature saved with the run (`calibration.json` in the run folder and in `best/`, which an
adapter export copies; predict and exports read it).

Works from the predictions files the evaluation wrote (main process), so every figure it adds can
be recomputed from `predictions_<split>.csv`.

A temperature the search ended at a bound of (T_BOUNDS) is not applied: it says that val could not
fix T (too few images, or every one of them right, whose NLL keeps falling as T -> 0), and applied
it would make predict's probabilities near-uniform or near-one-hot. calibration.json then records
it as `fitted_temperature` with the reason, and `temperature` is null (the model's probabilities).
The run warns at its start when val looks too small for the fit (`temperature_fit_warning`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from breakhis_ft.config import EvaluateConfig
from breakhis_ft.evaluate.calibration import (
    CALIBRATION_FILE,
    T_BOUNDS,
    apply_temperature,
    calibration_metrics,
    plot_reliability,
    reliability_bins,
)
from breakhis_ft.evaluate.final import fit_split_temperature
from breakhis_ft.evaluate.metrics import read_predictions
from breakhis_ft.run.run_folder import write_json

log = logging.getLogger(__name__)

# Below this many validation images the fitted temperature is mostly noise (its NLL is a handful
# of confident errors, or none): the run warns at its start.
MIN_TEMPERATURE_IMAGES = 50


def temperature_fit_warning(val: dict[str, Any] | None, scaling: bool) -> str | None:
    """The start-of-run warning about fitting the temperature on `val` (its split_coverage entry:
    images, missing_classes), or None when the fit looks sound or is off."""
    if not scaling or not val or not val["images"]:
        return None
    problems = []
    if val["images"] < MIN_TEMPERATURE_IMAGES:
        problems.append(f"{val['images']} images (fewer than {MIN_TEMPERATURE_IMAGES})")
    if val["missing_classes"]:
        problems.append(f"no image of {', '.join(val['missing_classes'])}")
    if not problems:
        return None
    return (
        f"evaluate.temperature_scaling: val has {' and '.join(problems)}, too little to fit the "
        "temperature: expect it to be unreliable (one that ends at its search bound is not "
        "applied). Give val more patients (split.ratios) or set evaluate.temperature_scaling=false"
    )


def _at_bound(temperature: float) -> bool:
    """Whether the search ended at (within 1% of) a bound of T_BOUNDS."""
    return not T_BOUNDS[0] * 1.01 < temperature < T_BOUNDS[1] / 1.01


def _split_predictions(run_dir: Path, splits: list[str]) -> dict[str, dict[str, Any]]:
    """Each split's predictions file read back, where it has class probabilities."""
    found = {}
    for split in splits:
        path = run_dir / f"predictions_{split}.csv"
        if path.is_file():
            pred = read_predictions(path)
            if pred["classes"] and len(pred["labels"]):
                found[split] = pred
    return found


def _fit(
    metrics: dict[str, dict], preds: dict[str, dict], settings: EvaluateConfig
) -> dict[str, Any]:
    """Fit T on val, add `temperature` and `after` to each split's calibration; the file's body."""
    if not settings.temperature_scaling:
        return {"temperature": None, "reason": "evaluate.temperature_scaling=false"}
    if "val" not in preds:
        return {"temperature": None, "reason": "no validation split to fit it on"}
    pairs = {split: (p["probs"], p["labels"]) for split, p in preds.items()}
    temperature, after = fit_split_temperature(pairs["val"], pairs, settings.calibration_bins)
    n_val = len(preds["val"]["labels"])
    if _at_bound(temperature):
        reason = (
            f"the temperature fitted on val ({temperature:g}, {n_val} images) sits at its search "
            f"bound {T_BOUNDS}: val cannot fix it (too few images, or all of them right); not "
            "applied, the probabilities are the model's"
        )
        log.warning(reason)
        return {"temperature": None, "fitted_temperature": temperature, "reason": reason}
    for split, block in after.items():
        calibration = metrics.get(split, {}).get("calibration")
        if isinstance(calibration, dict):
            calibration["temperature"] = temperature
            calibration["after"] = block
    log.info(
        "temperature %.3f fitted on val: NLL %s",
        temperature,
        ", ".join(
            f"{s} {metrics[s]['calibration']['before']['nll']:.3f} -> {a['nll']:.3f}"
            for s, a in after.items()
            if "calibration" in metrics.get(s, {})
        ),
    )
    return {
        "temperature": temperature,
        "fitted_on": "val",
        "n_images": n_val,
        "n_patients": len(set(preds["val"]["patients"])),
        "objective": "NLL of softmax(log p / T) on the validation split",
        "after": after,
    }


def _plot(run_dir: Path, preds: dict[str, dict], n_bins: int, temperature: float | None) -> None:
    """reliability_<split>.png per split, and reliability_test_scaled.png after scaling."""
    try:
        for split, pred in preds.items():
            probs, labels = pred["probs"].double().numpy(), pred["labels"].numpy()
            panels = [("", probs)]
            if temperature is not None and split == "test":
                panels.append(("_scaled", apply_temperature(probs, temperature)))
            for suffix, p in panels:
                bins = reliability_bins(p, labels, n_bins)
                ece = calibration_metrics(p, labels, n_bins)["ece"]
                scaled = f", T={temperature:.2f}" if suffix else ""
                title = f"{split}: ECE {ece:.3f} ({len(labels)} images{scaled})"
                plot_reliability(bins, run_dir / f"reliability_{split}{suffix}.png", title)
    except ImportError as err:
        log.warning("no reliability diagrams (%s)", err)


def calibrate_run(
    metrics: dict[str, dict], run_dir: Path, settings: EvaluateConfig
) -> dict[str, Any]:
    """Temperature scaling and reliability diagrams of a finished evaluation (main process).

    Updates `metrics` in place and writes `calibration.json` into the run folder and its `best/`
    (when there is one), so that the model and its temperature travel together.
    """
    preds = _split_predictions(run_dir, [s for s in ("val", "test") if s in metrics])
    info = {**_fit(metrics, preds, settings), "n_bins": settings.calibration_bins}
    write_json(run_dir / CALIBRATION_FILE, info)
    if (run_dir / "best").is_dir():
        (run_dir / "best" / CALIBRATION_FILE).write_text(json.dumps(info, indent=1))
    _plot(run_dir, preds, settings.calibration_bins, info["temperature"])
    return info
