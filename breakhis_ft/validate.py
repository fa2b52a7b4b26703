"""Compose-time checks of the combinations a typed schema cannot express.

`validate_config` runs in the entrypoint before any data or model loads; each failure is one line,
`config error: <key>: <what is wrong and the fix>`. Types, unknown keys (a key of another model
family among them) and the values of Enum keys are already checked by the schema (`config.py`) when
Hydra composes. The ConfigError of a bad config is raised here and nowhere else: what only the
device, the checkpoint or the data can tell is checked as the run is set up, with its own errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from breakhis_ft.config import MAGNIFICATIONS
from breakhis_ft.errors import ConfigError
from breakhis_ft.third_party import bitsandbytes_installed

# The scalar keys of a split's metrics (evaluate.metrics.compute_metrics; a test keeps them equal)
SCALAR_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "auroc_macro",
    "patient_recognition_rate",
)
BINARY_METRICS = ("accuracy", "f1", "auroc")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
# model_type of a checkpoint's config.json for each model.kind
CHECKPOINT_TYPES = {"medgemma": ("gemma3",), "siglip": ("siglip", "siglip_vision_model")}
# the classes a MedGemma prompt style can offer: digits 0-9, letters A-Z
PROMPT_CLASS_LIMITS = {"numbered": 10, "letters": 26}
# model.cache_vision_features, by its lower-cased value
CACHE_SETTINGS: dict[str, str | bool] = {"auto": "auto", "true": True, "false": False}
CACHE_OPTIONS = (
    "choose one: cached sweeps without pixel augmentation (data.augment.flips=false "
    "data.augment.rot90=false data.augment.stain_jitter=0, LoRA on the language model only: "
    "peft.target_modules=language_model), or augmentation / vision training without the cache "
    "(model.cache_vision_features=false)"
)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: {message}")


def monitorable(cfg: DictConfig) -> list[str]:
    """The validation metrics a run of this config logs, by the names `trainer.monitor` takes."""
    names = [f"val/{key}" for key in SCALAR_METRICS]
    names.append("val/class_nll")  # the true class's NLL under predict_proba (monitor_mode=min)
    names += [f"val/binary/{key}" for key in BINARY_METRICS]
    names += [f"val/per_class/{c}/{m}" for c in cfg.task.classes for m in ("f1", "recall")]
    return names


def _check_data(cfg: DictConfig) -> None:
    _check(cfg.data.image_size >= 1, "data.image_size", f"must be >= 1, got {cfg.data.image_size}")
    _check(
        cfg.data.source == "synthetic" or cfg.data.root is not None,
        "data.root",
        "data=breakhis needs data.root=/path/to/BreaKHis_v1 (see breakhis-ft-download-breakhis)",
    )
    for factor in cfg.magnification.factors:
        _check(
            factor in MAGNIFICATIONS,
            "magnification.factors",
            f"{factor} is not one of {MAGNIFICATIONS} (magnification=all|40x|100x|200x|400x)",
        )


def _check_stain(cfg: DictConfig) -> None:
    data = cfg.data
    if data.stain_norm == "none":
        return
    reference = str(data.stain_reference)
    _check(
        reference == "train" or Path(reference).expanduser().is_file(),
        "data.stain_reference",
        f"{reference!r} is neither `train` nor an image file; give an H&E image showing tissue, "
        "or `train` to estimate the reference from training images",
    )
    _check(
        data.stain_reference_images >= 1,
        "data.stain_reference_images",
        f"must be >= 1 (train images the reference is estimated from), got "
        f"{data.stain_reference_images}",
    )


def _check_split(cfg: DictConfig) -> None:
    ratios = list(cfg.split.ratios)
    _check(
        len(ratios) == 3 and all(r >= 0 for r in ratios) and abs(sum(ratios) - 1) < 1e-6,
        "split.ratios",
        f"needs three non-negative shares (train, val, test) summing to 1, got {ratios}",
    )
    if cfg.split.kind == "eva":
        _check(
            cfg.task.name == "eva4",
            "task",
            "split=eva is defined for task=eva4 (TA, MC, F, DC); set task=eva4",
        )
        _check(
            list(cfg.magnification.factors) == [40],
            "magnification",
            "split=eva is defined at 40X only; set magnification=40x",
        )
    if cfg.split.kind == "official_fold":
        _check(1 <= cfg.split.fold <= 5, "split.fold", "Folds.csv has folds 1-5")
    _check(
        cfg.split.get("balance_draw", "seeded") != "pandas" or cfg.split.kind == "official_fold",
        "split.balance_draw",
        "pandas draws over the rows of Folds.csv, as the blog notebook did: it needs "
        "split=official_fold (or split.balance_draw=seeded)",
    )
    if cfg.split.n_folds > 1:
        _check(
            1 <= cfg.split.fold <= cfg.split.n_folds,
            "split.fold",
            f"must be in 1..{cfg.split.n_folds} for k-fold cross-validation",
        )


def _check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    _check(t.lr > 0, "trainer.lr", f"must be positive, got {t.lr}")
    _check_batch_size(t)
    _check(
        t.grad_accum > 0 and t.eval_batch_size > 0,
        "trainer.grad_accum",
        "eval_batch_size and grad_accum must be positive",
    )
    minutes = t.checkpoint_every_minutes
    _check(
        minutes is None or minutes > 0,
        "trainer.checkpoint_every_minutes",
        f"must be positive (or null: off), got {minutes}",
    )
    _check(
        t.scheduler in SCHEDULERS,
        "trainer.scheduler",
        f"{t.scheduler!r} is not a transformers scheduler; one of {', '.join(SCHEDULERS)}",
    )
    if cfg.train:
        _check(
            t.max_steps > 0 or (t.max_steps < 0 and t.epochs > 0),
            "trainer.epochs",
            f"epochs={t.epochs}, max_steps={t.max_steps} train nothing; set trainer.epochs>0 "
            "(or trainer.max_steps>0), or train=false to only evaluate",
        )
    target = str(t.optimizer.get("_target_", ""))
    _check(
        not target.startswith("bitsandbytes.") or bitsandbytes_installed(),
        "trainer.optimizer",
        f"{target} needs bitsandbytes: pip install 'breakhis-ft[quant]' "
        "(or trainer/optimizer=adamw)",
    )
    for key in ("limit_train_batches", "limit_eval_batches", "overfit_batches", "profile_steps"):
        _check(t[key] >= 0, f"trainer.{key}", f"must be >= 0 (0 turns it off), got {t[key]}")
    allowed = monitorable(cfg)
    _check(
        not str(t.monitor).endswith("patient_accuracy"),
        "trainer.monitor",
        f"{t.monitor!r}: Spanhol's per-patient image accuracy is now named "
        "patient_recognition_rate (val/patient_recognition_rate)",
    )
    _check(
        t.monitor != "val/loss",
        "trainer.monitor",
        "'val/loss': the validation loss is the class NLL, named val/class_nll (train/loss is the "
        "training objective: MedGemma's token loss); set trainer.monitor=val/class_nll "
        "trainer.monitor_mode=min (also on a rerun= or resume= of a run that monitored val/loss)",
    )
    _check(
        t.monitor in allowed,
        "trainer.monitor",
        f"{t.monitor!r} is not a validation metric this run logs; e.g. {', '.join(allowed[:7])}",
    )


def _check_batch_size(t: DictConfig) -> None:
    """A positive batch_size, or auto with what it needs (trainer.effective_batch_size, and a
    memory budget where no GPU can be asked)."""
    size, effective, budget = t.batch_size, t.effective_batch_size, t.memory_budget_gib
    _check(budget is None or budget > 0, "trainer.memory_budget_gib", f"must be > 0, got {budget}")
    if size != "auto":
        _check(
            isinstance(size, int) and not isinstance(size, bool) and size > 0,
            "trainer.batch_size",
            f"a positive integer or auto, got {size!r}",
        )
        _check(
            effective is None,
            "trainer.effective_batch_size",
            f"is read with trainer.batch_size=auto only (here batch_size={size}: the effective "
            "batch is batch_size x trainer.grad_accum); drop it or set trainer.batch_size=auto",
        )
        return
    _check(
        isinstance(effective, int) and effective > 0,
        "trainer.effective_batch_size",
        f"trainer.batch_size=auto keeps this effective batch (micro-batch x grad_accum per "
        f"process): set it, e.g. trainer.effective_batch_size=16 (got {effective})",
    )
    _check(
        t.grad_accum == 1,
        "trainer.grad_accum",
        f"trainer.batch_size=auto chooses it (effective_batch_size / the micro-batch): drop "
        f"trainer.grad_accum={t.grad_accum} (set trainer.grad_accum=1)",
    )
    if budget is None:
        import torch  # only here: the budget of auto is the GPU's free memory

        _check(
            torch.cuda.is_available() and not t.cpu,
            "trainer.memory_budget_gib",
            "trainer.batch_size=auto measures a GPU's free memory and this run has none "
            "(a CPU run, or trainer.cpu=true): give the budget, e.g. trainer.memory_budget_gib=8",
        )
        _check(
            int(os.environ.get("WORLD_SIZE", "1")) == 1,
            "trainer.memory_budget_gib",
            "trainer.batch_size=auto with several processes: give the budget "
            "(trainer.memory_budget_gib) so that every process chooses the same micro-batch",
        )


def _check_model(cfg: DictConfig) -> None:
    kind = str(cfg.model.kind)
    target = str(cfg.model.builder.get("_target_", ""))
    _check(
        f"_{kind}_" in target.rpartition(".")[2],  # build_medgemma_classifier, build_siglip_...
        "model.kind",
        f"model.kind={kind} but the model group builds with {target}: choose the model group "
        "(model=medgemma_4b_it | medsiglip_448 | tiny_gemma3 | tiny_siglip) instead of model.kind",
    )
    config_file = Path(str(cfg.model.name_or_path)).expanduser() / "config.json"
    if config_file.is_file():  # a local checkpoint says what it is: check it before loading
        model_type = json.loads(config_file.read_text()).get("model_type")
        _check(
            model_type in CHECKPOINT_TYPES[kind],
            "model.kind",
            f"{config_file} is a {model_type!r} checkpoint, not a {kind} one; choose the model "
            "group that matches it",
        )
    FAMILY_CHECKS[kind](cfg)


def _check_medgemma(cfg: DictConfig) -> None:
    """The combinations of MedGemma's keys (MedGemmaConfig) with the other groups."""
    m = cfg.model
    if cfg.precision.name == "fp16":
        _check(
            cfg.precision.allow_fp16,
            "precision",
            "fp16 overflows to NaN on Gemma 3 (activations exceed 65,504); use precision=bf16, "
            "or set precision.allow_fp16=true to try anyway",
        )
    _check(m.max_new_tokens >= 1, "model.max_new_tokens", f"must be >= 1, got {m.max_new_tokens}")
    if m.merge_for_eval:
        _check(
            cfg.peft.method == "lora",
            "model.merge_for_eval",
            "merges a LoRA adapter into MedGemma's weights: needs peft=lora (4-bit qlora weights "
            "would be re-quantized); set model.merge_for_eval=false",
        )
    _check(
        m.prompt.parse != "blog_regex" or m.prompt.style == "numbered",
        "model.prompt.parse",
        "blog_regex reads the answer's digit: it needs model.prompt.style=numbered",
    )
    limit = PROMPT_CLASS_LIMITS[str(m.prompt.style)]
    _check(
        2 <= len(cfg.task.classes) <= limit,
        "model.prompt.style",
        f"{m.prompt.style} handles 2-{limit} classes, task={cfg.task.name} has "
        f"{len(cfg.task.classes)}",
    )
    _check_feature_cache(cfg)


def _check_siglip(cfg: DictConfig) -> None:
    """The combinations of SigLIP's keys (SiglipConfig) with the other groups."""
    m = cfg.model
    _check(cfg.peft.method != "qlora", "peft", "qlora is for MedGemma (model=medgemma_4b_it)")
    if m.freeze_encoder:
        _check(
            cfg.peft.method == "none",
            "model.freeze_encoder",
            "true freezes the encoder for a linear probe (use peft=none); with peft=lora set "
            "model.freeze_encoder=false",
        )
        _check(
            cfg.data.stain_norm == "none",
            "data.stain_norm",
            "a SigLIP linear probe embeds the original image files (embedding cache), not the "
            "stain-normalised image cache; use data.stain_norm=none, or fine-tune the encoder "
            "(model.freeze_encoder=false with peft=lora)",
        )
    if m.zero_shot:
        _check(not cfg.train, "model.zero_shot", "a zero-shot run trains nothing; set train=false")
        templates = list(m.zero_shot_templates)
        _check(
            bool(templates) and all("{}" in t for t in templates),
            "model.zero_shot_templates",
            "needs at least one template and each needs a '{}' where the class name goes, got "
            f"{templates}",
        )


FAMILY_CHECKS: dict[str, Callable[[DictConfig], None]] = {
    "medgemma": _check_medgemma,
    "siglip": _check_siglip,
}


def vision_trains_by_config(model_cfg: Any, peft_cfg: Any) -> bool | None:
    """Whether the config trains MedGemma's vision tower, where it says so without building the
    model (None for a custom list of target modules: known once the adapter is applied)."""
    if str(peft_cfg.method) == "none":
        return not bool(model_cfg.freeze_vision)
    targets = peft_cfg.target_modules
    if isinstance(targets, str) and targets in ("language_model", "all-linear"):
        return targets == "all-linear"
    return None


def _augment_obstacle(augment: Any) -> str | None:
    changed = [
        name
        for name, on in (
            ("flips", augment.flips),
            ("rot90", augment.rot90),
            (f"stain_jitter={augment.stain_jitter}", augment.stain_jitter > 0),
        )
        if on
    ]
    if not changed:
        return None
    return (
        f"data.augment changes pixels every epoch ({', '.join(changed)}), so an image's vision "
        "features are not fixed"
    )


def _vision_obstacle(peft_cfg: Any, vision_trains: bool) -> str | None:
    if not vision_trains:
        return None
    if str(peft_cfg.method) == "none":
        return (
            "peft=none with model.freeze_vision=false fine-tunes the vision tower and projector, "
            "so their features change every step"
        )
    return (
        f"peft.target_modules={peft_cfg.target_modules} puts LoRA adapters on the vision tower "
        "(all-linear adapts it too), so its features change every step"
    )


def feature_cache_obstacles(peft_cfg: Any, augment: Any, vision_trains: bool) -> list[str]:
    """Why MedGemma's vision features cannot be cached: a vision tower or projector that trains,
    augmentation that changes pixels; empty where they can."""
    found = (_vision_obstacle(peft_cfg, vision_trains), _augment_obstacle(augment))
    return [reason for reason in found if reason]


def feature_cache_setting(setting: Any) -> str | bool:
    """`model.cache_vision_features` as auto, True or False (a command line `true` arrives as the
    string "True" in its str-typed key)."""
    value = str(setting).lower()
    if value not in CACHE_SETTINGS:
        raise ValueError(f"model.cache_vision_features: got {value!r}, allowed: auto, true, false")
    return CACHE_SETTINGS[value]


def _check_feature_cache(cfg: DictConfig) -> None:
    setting = str(cfg.model.cache_vision_features).lower()
    _check(
        setting in CACHE_SETTINGS,
        "model.cache_vision_features",
        f"got {setting!r}, allowed: auto, true, false",
    )
    if CACHE_SETTINGS[setting] is not True:
        return
    trains = bool(vision_trains_by_config(cfg.model, cfg.peft))
    obstacles = feature_cache_obstacles(cfg.peft, cfg.data.augment, trains)
    _check(
        not obstacles,
        "model.cache_vision_features",
        f"true needs a frozen vision tower and no pixel augmentation, but "
        f"{'; '.join(obstacles)}. {CACHE_OPTIONS}",
    )


def _check_peft(cfg: DictConfig) -> None:
    p = cfg.peft
    _check(p.r > 0, "peft.r", f"must be a positive integer, got {p.r}")
    _check(p.alpha > 0, "peft.alpha", f"must be positive, got {p.alpha}")
    _check(0.0 <= p.dropout < 1.0, "peft.dropout", f"must be in [0, 1), got {p.dropout}")
    targets = p.target_modules
    _check(
        isinstance(targets, str) or len(targets) > 0,
        "peft.target_modules",
        "the list is empty; name modules, or language_model | all-linear",
    )
    if p.method == "qlora":
        _check(
            cfg.precision.name == "bf16",
            "precision",
            "qlora computes in bfloat16 (bnb_4bit_compute_dtype); use precision=bf16",
        )
        _check(
            bitsandbytes_installed(),
            "peft",
            "peft=qlora needs bitsandbytes: pip install 'breakhis-ft[quant]' (or use peft=lora)",
        )


def _check_logger(cfg: DictConfig) -> None:
    timeout = cfg.logger.init_timeout
    _check(timeout > 0, "logger.init_timeout", f"must be positive (seconds), got {timeout}")


def _check_evaluate(cfg: DictConfig) -> None:
    e = cfg.evaluate
    _check(
        e.bootstrap_resamples >= 0,
        "evaluate.bootstrap_resamples",
        f"must be >= 0 (0 turns intervals off), got {e.bootstrap_resamples}",
    )
    _check(0 < e.ci_level < 1, "evaluate.ci_level", f"must be in (0, 1), got {e.ci_level}")
    _check(
        e.calibration_bins >= 1,
        "evaluate.calibration_bins",
        f"must be >= 1, got {e.calibration_bins}",
    )


def _check_evaluation(cfg: DictConfig) -> None:
    """No selection ever looks at test."""
    t = cfg.trainer
    _check(
        not str(cfg.optimized_metric).startswith("test/"),
        "optimized_metric",
        f"{cfg.optimized_metric!r} is a test metric; no selection ever looks at test: name a "
        "validation metric (val/...)",
    )
    if t.eval_split == "test":
        _check(
            t.select == "last" and t.early_stopping_patience == 0,
            "trainer.eval_split",
            "test is evaluated during training only to log it, as the blog notebook did; no "
            "selection ever looks at test: set trainer.select=last and "
            "trainer.early_stopping_patience=0 (or trainer.eval_split=val)",
        )


CHECKS: tuple[Callable[[DictConfig], None], ...] = (
    _check_data,
    _check_stain,
    _check_split,
    _check_trainer,
    _check_evaluate,
    _check_model,
    _check_peft,
    _check_evaluation,
    _check_logger,
)


def validate_config(cfg: DictConfig) -> None:
    """Check cross-key combinations; raise ConfigError naming the key and the fix."""
    for check in CHECKS:
        check(cfg)
