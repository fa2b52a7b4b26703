"""Load a trained classifier back: from a run folder (`.hydra/config.yaml` + `best/`) or an
exported model folder (`export_info.json`). Shared by predict, export and explain.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from breakhis_ft.config import family_keys_only, schema_of
from breakhis_ft.errors import ConfigError
from breakhis_ft.models.base import Classifier
from breakhis_ft.models.factory import build_classifier, classifier_type
from breakhis_ft.models.precision import Precision
from breakhis_ft.run.saved_config import check_saved_config, load_saved_config

EXPORT_INFO = "export_info.json"


class PredictError(ValueError):
    """A run folder, exported model or input that cannot be used; the message says why and how."""


def classifier_of(cfg: DictConfig, names: Sequence[str]) -> Classifier:
    """The classifier a config describes (checkpoint, adapter, dtype), untrained."""
    precision = Precision.of(cfg.precision.name)
    return build_classifier(cfg.model, cfg.peft, precision, names, cfg.paths)


def _set_struct_everywhere(cfg: DictConfig, flag: bool) -> None:
    """Open (False) or close (True) `cfg` and every config node below it to new keys."""
    OmegaConf.set_struct(cfg, flag)
    for _key, value in cfg.items_ex(resolve=False):
        if isinstance(value, DictConfig):
            _set_struct_everywhere(value, flag)


def on_schema(saved: Any, overrides: Sequence[str] = ()) -> DictConfig:
    """A saved run config (checked data) on the current schema, its model on its family's, with
    `key=value` overrides (`config.family_keys_only`: another family's keys are dropped).

    Keys a run added with `+key=value` (a masked `+hf_token=***`, say) are kept: the schema is
    opened to them for the merge, then closed, so an override naming an unknown key still fails.
    """
    values = family_keys_only(saved)
    cfg = schema_of(values)
    _set_struct_everywhere(cfg, False)
    cfg = OmegaConf.merge(cfg, values)
    _set_struct_everywhere(cfg, True)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg  # type: ignore[return-value]


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """A run's saved config on the current schema, with `key=value` overrides applied; a config
    naming targets that are not the project's own is refused before anything is built."""
    saved = Path(run_dir) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise PredictError(
            f"{run_dir}: no saved config at {saved}; give a run folder written by breakhis-ft "
            "(outputs/runs/<experiment>/<time>) or an exported model with --model"
        )
    try:
        load_saved_config(saved)
    except ConfigError as err:
        raise PredictError(str(err)) from None
    return on_schema(OmegaConf.load(saved), overrides)


def classifier_from_run(cfg: DictConfig, run_dir: str | Path) -> Classifier:
    """The run's classifier with its best weights (`best/`) loaded, on the CPU."""
    classifier = classifier_of(cfg, tuple(cfg.task.classes))
    best = Path(run_dir) / "best"
    if best.is_dir():
        classifier.load_trained(best)
    elif classifier_type(cfg.model).trains_weights(cfg.model):
        raise PredictError(
            f"{run_dir}: no best/ folder (trained weights); the run did not train or has not "
            "finished its first evaluation. Train it (breakhis-ft resume=<run folder>) or pick "
            "another run"
        )
    return classifier


def preprocess_size(cfg: DictConfig, classifier: Classifier) -> int | None:
    """The longest side images had in training: data.image_size, or None for a SigLIP probe.

    A probe's embeddings were computed from the original files (embedding_cache.py), not resized.
    """
    return int(cfg.data.image_size) if classifier.needs_images else None


def read_export_info(model_dir: Path) -> dict[str, Any]:
    """The `export_info.json` of an exported model folder."""
    path = model_dir / EXPORT_INFO
    if not path.is_file():
        raise PredictError(
            f"{model_dir}: no {EXPORT_INFO}; export the run with breakhis-ft-export (it "
            "records the class names and the prompt that classification needs)"
        )
    return json.loads(path.read_text())


# ---- inputs -------------------------------------------------------------------------------------


def load_exported_classifier(
    model_dir: Path, info: dict[str, Any], overrides: Sequence[str] = ()
) -> tuple[Classifier, DictConfig]:
    """The classifier of an exported folder (merged or adapter) and the config it was built from."""
    try:
        check_saved_config(info.get("config"), model_dir / EXPORT_INFO)
    except ConfigError as err:
        raise PredictError(str(err)) from None
    cfg = on_schema(info["config"], overrides)
    names = tuple(info["class_names"])
    if tuple(cfg.task.classes) != names:
        raise PredictError(f"{model_dir}: export_info.json class names disagree with its task")
    if info["format"] == "adapter":
        classifier = classifier_of(cfg, names)
        classifier.load_trained(model_dir)
        return classifier, cfg
    if info["format"] != "merged":
        raise PredictError(f"{model_dir}: unknown export format {info['format']!r}")
    # A merged folder is a plain checkpoint: no adapter, nothing built, the head (SigLIP) beside it.
    cfg.model.name_or_path = str(model_dir)
    cfg.model.build_tiny = False
    cfg.peft.method = "none"
    cfg.model.merge_with(classifier_type(cfg.model).merged_overrides())
    classifier = classifier_of(cfg, names)
    classifier.load_merged(model_dir)
    return classifier, cfg
