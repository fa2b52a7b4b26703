"""Export a trained run: the LoRA adapter merged into the base weights, or the adapter alone.

Merged (default): a standard transformers checkpoint (safetensors + processor). MedGemma:
`AutoModelForImageTextToText.from_pretrained(dir)` + `AutoProcessor.from_pretrained(dir)`, no
peft needed. SigLIP: the (merged) vision encoder, `SiglipVisionModel.from_pretrained(dir)` +
`AutoImageProcessor`, beside the linear head (`head.safetensors`). The merge runs in float32 (the
base upcast exactly, W + BA added once) and the result is cast to the run's precision. A QLoRA
run's base is its NF4 weights dequantized (what its adapter learned on), not the 16-bit checkpoint.
Adapter only: the run's `best/` folder as it is (MedGemma: `PeftModel.from_pretrained(base, dir)`).
Either way `export_info.json` records what classification needs besides the weights: class names,
the prompt, the preprocessing (with the run's stain normaliser, whose `stain_normalizer.json` is
copied beside it), the source run and its resolved config; `predict.py --model DIR` classifies
with it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from breakhis_ft.data.stain import NORMALIZER_FILE, load_normalizer
from breakhis_ft.deploy.loading import (
    EXPORT_INFO,
    classifier_from_run,
    load_run_config,
    preprocess_size,
)
from breakhis_ft.deploy.model_card import describe, model_card
from breakhis_ft.evaluate.calibration import read_temperature
from breakhis_ft.models.factory import classifier_type
from breakhis_ft.models.precision import DTYPES

log = logging.getLogger(__name__)

FULL_WEIGHT_FILES = ("trainable.safetensors", "encoder.safetensors")  # full fine-tunes' best/


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message says why and what to do instead."""


def _export_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The run's config (a QLoRA run's too: its adapter goes with the 4-bit base it learned on)."""
    cfg = load_run_config(run_dir, overrides)
    if not classifier_type(cfg.model).trains_weights(cfg.model):
        raise ExportError(f"{run_dir}: a zero-shot run trained nothing; there is nothing to export")
    return cfg


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} is not empty; choose another folder or --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)


def export_info(
    cfg: DictConfig,
    run_dir: Path,
    fmt: str,
    precision: str,
    image_size: int | None,
    weights: str = "best",
) -> dict[str, Any]:
    """What `export_info.json` holds: format, classes, the exact prompt (user text, chat messages,
    each class's answer), preprocessing, temperature, source run, config; `weights`: the run's
    folder the weights come from (best, or last: the end of training)."""
    best = Path(run_dir) / weights / "best.json"
    best_info = json.loads(best.read_text()) if best.is_file() else {}
    config = OmegaConf.to_container(cfg, resolve=True)
    config["precision"]["name"] = precision
    stain = load_normalizer(run_dir)
    prompt = cfg.model.get("prompt")  # MedGemma's (model.prompt); a SigLIP classifier has none
    return {
        "format": fmt,  # merged | adapter
        "model_kind": str(cfg.model.kind),
        "task": str(cfg.task.name),
        "class_names": list(cfg.task.classes),
        "prompt": None if prompt is None else OmegaConf.to_container(prompt, resolve=True),
        "image_size": image_size,  # longest side before the processor; null: not resized
        # data.stain_norm's fitted normaliser (also stain_normalizer.json), applied before resizing
        "stain_normalizer": None if stain is None else stain.to_dict(),
        "precision": precision,
        "base_model": str(cfg.model.name_or_path),
        "peft": OmegaConf.to_container(cfg.peft, resolve=True),
        "source_run": str(Path(run_dir).resolve()),
        "weights": weights,  # best: the run's best model; last: the end of its training
        "best": {k: best_info.get(k) for k in ("step", "monitor", "value")},
        # fitted on the run's validation split; predict divides log-probabilities by it
        "temperature": read_temperature(run_dir),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **describe(cfg, image_size),
        "config": config,
    }


def _write_info(out_dir: Path, info: dict[str, Any], run_dir: Path) -> None:
    """export_info.json, the model card (README.md; replaces peft's blank template), and the run's
    stain normaliser beside them (predict.py applies it)."""
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
    model_card(info, run_dir).save(out_dir / "README.md")
    if (run_dir / NORMALIZER_FILE).is_file():
        shutil.copy2(run_dir / NORMALIZER_FILE, out_dir / NORMALIZER_FILE)


def export_adapter(
    run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, weights: str = "best"
) -> Path:
    """Copy the run's adapter (and SigLIP head) with `export_info.json`: a small artefact.
    `weights`: the run's folder to copy: best/, or last/ (logger.log_model=last)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = _export_config(run_dir, ())
    best = run_dir / weights
    if not best.is_dir():
        raise ExportError(
            f"{run_dir}: no {weights}/ folder; the run has no trained weights to export"
        )
    full = [f for f in FULL_WEIGHT_FILES if (best / f).is_file()]
    if full:
        raise ExportError(
            f"{run_dir}: the run trained every weight (peft=none, {full[0]}): there is no adapter; "
            "export it merged (without --adapter-only)"
        )
    _prepare_out(out_dir, overwrite)
    shutil.copytree(best, out_dir, dirs_exist_ok=True)
    resized = classifier_type(cfg.model).reads_resized_images(cfg.model, str(cfg.peft.method))
    size = int(cfg.data.image_size) if resized else None
    info = export_info(cfg, run_dir, "adapter", str(cfg.precision.name), size, weights)
    _write_info(out_dir, info, run_dir)
    log.info("adapter of %s exported to %s", run_dir, out_dir)
    return out_dir


def export_merged(
    run_dir: str | Path,
    out_dir: str | Path,
    precision: str | None = None,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Merge the run's adapter into its base and save a from_pretrained checkpoint + export_info.

    `precision` (bf16 | fp32 | fp16): the saved weights' dtype; default the run's precision.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = _export_config(run_dir, overrides)
    precision = precision or str(cfg.precision.name)
    if precision not in DTYPES:
        raise ExportError(f"precision: got {precision!r}, allowed: {', '.join(DTYPES)}")
    if cfg.peft.method != "qlora":  # QLoRA loads its 4-bit base as trained; it merges in fp32
        cfg.precision.name = "fp32"  # merge in float32: one rounding, at the final cast
    classifier = classifier_from_run(cfg, run_dir)
    size = preprocess_size(cfg, classifier)
    _prepare_out(out_dir, overwrite)
    classifier.save_merged(out_dir, DTYPES[precision])
    _write_info(out_dir, export_info(cfg, run_dir, "merged", precision, size), run_dir)
    log.info("merged model of %s exported to %s (%s)", run_dir, out_dir, precision)
    return out_dir


def artifact_name(info: dict[str, Any]) -> str:
    """A W&B artifact name from the experiment and the model: letters, digits, - _ . only."""
    experiment = info["config"].get("experiment_name", "run")
    name = f"{experiment}-{info['model_kind']}-{info['task']}-adapter"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def upload_adapter_artifact(
    run_dir: str | Path,
    name: str | None = None,
    project: str | None = None,
    entity: str | None = None,
    mode: str | None = None,
) -> str:
    """Log the run's adapter (adapter-only export) as a W&B `model` artifact; return its name.

    `mode`: online | offline; default WANDB_MODE from the environment, else the run's
    `logger.mode` when online or offline. Offline keeps the artifact local, in the offline run's
    files under WANDB_DIR (`wandb sync` uploads it later). The API key comes from the
    environment (WANDB_API_KEY) or `wandb login`, never from a file here.
    """
    import wandb

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_adapter(run_dir, Path(tmp) / "adapter")
        info = json.loads((folder / EXPORT_INFO).read_text())
        logger = info["config"]["logger"]
        if mode is None:
            mode = os.environ.get("WANDB_MODE") or None
        if mode is None and logger.get("mode") in ("online", "offline"):
            mode = logger["mode"]
        if mode == "disabled":
            raise ExportError(
                "W&B is disabled (WANDB_MODE=disabled): the artifact would go nowhere; keep it "
                "local with --wandb-mode offline (or WANDB_MODE=offline)"
            )
        run = wandb.init(
            project=project or logger.get("project") or "breakhis-ft",
            entity=entity or logger.get("entity"),
            job_type="export",
            mode=mode,
            config={"source_run": info["source_run"]},
        )
        logged = name or artifact_name(info)
        try:
            meta = {k: info[k] for k in ("model_kind", "task", "class_names", "base_model", "best")}
            artifact = wandb.Artifact(logged, type="model", metadata=meta)
            artifact.add_dir(str(folder))  # copied to W&B's staging area, online or offline
            run.log_artifact(artifact)
            if not run.offline:
                artifact.wait()  # uploaded before the temporary folder goes
                logged = artifact.name  # with its version (name:v3)
        finally:
            run.finish()
    return logged
