"""Typed schema of the Hydra config: every group's keys, types and allowed values.

The dataclasses are registered in Hydra's ConfigStore as the base of `train.yaml`, so a wrong
type or an unknown key fails at compose time. Allowed values and cross-group combinations are
checked by `validate_config`, called by the entrypoint before any data or model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key and the fix."""


@dataclass
class AugmentConfig:
    flips: bool = True  # horizontal and vertical flips
    rot90: bool = True  # rotations by multiples of 90 degrees
    stain_jitter: float = 0.0  # strength of H&E stain jitter; 0 turns it off
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | breakhis
    root: str | None = None  # BreakHis tree (source=breakhis) or where the replica is built
    cache_dir: str = "${oc.env:BREAKHIS_FT_CACHE,${oc.env:HOME}/.cache/breakhis_ft}"
    synthetic_fraction: float = 1.0  # share of the 7,909 real images the replica holds
    synthetic_size: list[int] = field(default_factory=lambda: [700, 460])  # width, height
    synthetic_seed: int = 0
    duplicate_keep: str = "ductal_carcinoma"  # which copy of slide 13412 stays
    on_bad_file: str = "error"  # error | skip (skipped files are listed in the run folder)
    verify_images: bool = False  # decode every image up front
    image_size: int = 448  # longest side of the cached, resized images
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SplitConfig:
    kind: str = "patient"  # patient | official_fold | eva
    group_by: str = "stem"  # stem (safe: sibling slides together) | patient (folder id)
    ratios: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train, val, test
    seed: int = 0
    n_folds: int = 0  # >1: k-fold cross-validation by group, `fold` picks the test fold
    fold: int = 1  # official_fold: Folds.csv fold 1-5; patient k-fold: test fold index 1..n_folds
    val_fraction: float = 0.15  # official_fold: share of train groups carved out for validation
    balance_binary: float | None = None  # undersample benign:malignant to 1:this (blog: 1.0)
    balance_splits: list[str] = field(default_factory=lambda: ["train"])


@dataclass
class MagnificationConfig:
    name: str = "all"
    factors: list[int] = field(default_factory=lambda: [40, 100, 200, 400])


@dataclass
class TaskConfig:
    name: str = "subtype8"  # subtype8 | binary | eva4


@dataclass
class PromptConfig:
    style: str = "numbered"  # numbered (blog: answer 0-7) | letters (Google's notebook: A-H)
    instruction: str = "Analyze this breast tissue histopathology image and classify it."
    system: str | None = None


@dataclass
class ModelConfig:
    kind: str = MISSING  # medgemma | siglip
    name_or_path: str = MISSING  # hub id or local folder
    build_tiny: bool = False  # build a tiny random checkpoint at name_or_path when missing
    attn_implementation: str = "sdpa"  # sdpa | eager
    loss_on: str = "answer"  # answer (answer + end of turn) | all_text (the blog's masking)
    # auto (where valid) | true | false; Any keeps a YAML `true` a bool instead of the string "True"
    cache_vision_features: Any = "auto"
    freeze_vision: bool = True  # keep vision tower + projector frozen (unless LoRA targets them)
    freeze_encoder: bool = False  # siglip: frozen encoder + linear head (linear probe)
    resize: str = "pad"  # siglip: pad (to square) | stretch
    # siglip: classify by image-text similarity to class-name prompts (needs the text tower), no
    # training; run with train=false
    zero_shot: bool = False
    zero_shot_templates: list[str] = field(
        default_factory=lambda: ["H&E histopathology image of breast {}"]
    )
    prompt: PromptConfig = field(default_factory=PromptConfig)
    max_new_tokens: int = 40  # medgemma generation path (greedy, answer parsed); the blog used 40


@dataclass
class PeftConfig:
    method: str = "lora"  # lora | qlora | none
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Any = "language_model"  # language_model | all-linear | list of module names
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class PrecisionConfig:
    name: str = "bf16"  # bf16 | fp32 | fp16
    allow_fp16: bool = False  # fp16 overflows to NaN on Gemma 3; refused unless set


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: int = -1  # >0 overrides epochs
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"  # any name of transformers.get_scheduler
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    eval_every_steps: int = 0  # 0: evaluate at the end of each epoch
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of each epoch
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0  # evaluations without improvement; 0 turns it off
    monitor: str = "val/balanced_accuracy"
    monitor_mode: str = "max"  # max | min
    class_weighting: str = "none"  # none | inverse_frequency
    sampler: str = "shuffle"  # shuffle | balanced
    num_workers: int = 0
    log_every_steps: int = 10
    cpu: bool = False  # force CPU even where a GPU is present


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    mode: str = "offline"  # online | offline | disabled
    project: str = "breakhis-ft"
    entity: str | None = None
    group: str | None = None  # default: experiment name, or the sweep folder in multirun
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"


@dataclass
class TrainRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    magnification: MagnificationConfig = field(default_factory=MagnificationConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment_name: str = "default"
    seed: int = 42
    train: bool = True
    test: bool = True
    optimized_metric: str = "val/balanced_accuracy"
    resume: str | None = None  # a run folder to continue from its last checkpoint
    output_dir: str = "outputs"


ALLOWED: dict[str, tuple[Any, ...]] = {
    "data.source": ("synthetic", "breakhis"),
    "data.on_bad_file": ("error", "skip"),
    "data.duplicate_keep": ("ductal_carcinoma", "lobular_carcinoma"),
    "split.kind": ("patient", "official_fold", "eva"),
    "split.group_by": ("stem", "patient"),
    "task.name": ("subtype8", "binary", "eva4"),
    "model.kind": ("medgemma", "siglip"),
    "model.attn_implementation": ("sdpa", "eager"),
    "model.loss_on": ("answer", "all_text"),
    "model.cache_vision_features": ("auto", True, False),
    "model.resize": ("pad", "stretch"),
    "model.prompt.style": ("numbered", "letters"),
    "peft.method": ("lora", "qlora", "none"),
    "precision.name": ("bf16", "fp32", "fp16"),
    "trainer.monitor_mode": ("max", "min"),
    "trainer.class_weighting": ("none", "inverse_frequency"),
    "trainer.sampler": ("shuffle", "balanced"),
    "logger.kind": ("wandb", "none"),
    "logger.mode": ("online", "offline", "disabled"),
}
MAGNIFICATIONS = (40, 100, 200, 400)


def register_configs() -> None:
    """Register the schema as the base config `train_schema` in Hydra's ConfigStore."""
    ConfigStore.instance().store(name="train_schema", node=TrainRunConfig)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: {message}")


def validate_config(cfg: DictConfig) -> None:
    """Check allowed values and combinations; raise ConfigError naming the key and the fix."""
    for key, allowed in ALLOWED.items():
        value = OmegaConf.select(cfg, key)
        _check(value in allowed, key, f"got {value!r}, allowed: {', '.join(map(str, allowed))}")
    for factor in cfg.magnification.factors:
        _check(
            factor in MAGNIFICATIONS,
            "magnification.factors",
            f"{factor} is not one of "
            f"{MAGNIFICATIONS} (choose magnification=all|40x|100x|200x|400x)",
        )
    _check(cfg.peft.r > 0, "peft.r", f"must be a positive integer, got {cfg.peft.r}")
    _check(cfg.peft.alpha > 0, "peft.alpha", f"must be positive, got {cfg.peft.alpha}")
    _check(0.0 <= cfg.peft.dropout < 1.0, "peft.dropout", "must be in [0, 1)")
    ratios = list(cfg.split.ratios)
    _check(
        len(ratios) == 3 and all(r >= 0 for r in ratios) and abs(sum(ratios) - 1) < 1e-6,
        "split.ratios",
        f"needs three non-negative shares (train, val, test) summing to 1, got {ratios}",
    )
    _check(cfg.trainer.lr > 0, "trainer.lr", "must be positive")
    _check(
        cfg.trainer.batch_size > 0 and cfg.trainer.grad_accum > 0,
        "trainer.batch_size",
        "batch_size and grad_accum must be positive",
    )
    _check(
        cfg.data.source == "synthetic" or cfg.data.root is not None,
        "data.root",
        "data=breakhis needs data.root=/path/to/BreaKHis_v1 (see scripts/download_breakhis.py)",
    )
    if cfg.split.kind == "eva":
        _check(
            cfg.task.name == "eva4",
            "task.name",
            "split=eva is defined for task=eva4 (TA, MC, F, DC); set task=eva4",
        )
        _check(
            list(cfg.magnification.factors) == [40],
            "magnification",
            "split=eva is defined at 40X only; set magnification=40x",
        )
    if cfg.split.kind == "official_fold":
        _check(1 <= cfg.split.fold <= 5, "split.fold", "Folds.csv has folds 1-5")
    if cfg.split.n_folds > 1:
        _check(
            1 <= cfg.split.fold <= cfg.split.n_folds,
            "split.fold",
            f"must be in 1..{cfg.split.n_folds} for k-fold cross-validation",
        )
    if cfg.precision.name == "fp16" and cfg.model.kind == "medgemma":
        _check(
            cfg.precision.allow_fp16,
            "precision",
            "fp16 overflows to NaN on Gemma 3 (activations exceed 65,504); use precision=bf16, "
            "or set precision.allow_fp16=true to try anyway",
        )
    if cfg.peft.method == "qlora":
        _check(
            cfg.precision.name != "fp32",
            "peft.method",
            "qlora computes in 16-bit; use precision=bf16 (and a CUDA GPU with bitsandbytes)",
        )
        _check(not cfg.trainer.cpu, "peft.method", "qlora needs a CUDA GPU (bitsandbytes 4-bit)")
    if cfg.model.zero_shot:
        _check(
            cfg.model.kind == "siglip",
            "model.zero_shot",
            "zero-shot needs a SigLIP checkpoint with its text tower (model=medsiglip_448)",
        )
        _check(
            not cfg.train,
            "model.zero_shot",
            "a zero-shot run has nothing to train; set train=false",
        )
    if cfg.model.kind == "siglip":
        _check(cfg.peft.method != "qlora", "peft.method", "qlora is for model=medgemma_4b_it")
