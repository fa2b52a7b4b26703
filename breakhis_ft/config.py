"""Typed schema of the Hydra config: every group's keys, types, defaults and allowed values.

The dataclasses are the one source of defaults: a group file under `conf/` states only what its
choice changes. They are registered in Hydra's ConfigStore as the base of `train.yaml`, so a wrong
type, an unknown key or a value outside an Enum fails at compose time. Cross-key combinations are
checked by `validate.py`, called by the entrypoint before any data or model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from breakhis_ft.errors import ConfigError


class DataSource(StrEnum):
    synthetic = "synthetic"  # the embedded replica, built into paths.cache_dir
    breakhis = "breakhis"  # a real BreaKHis_v1 tree at data.root


class OnBadFile(StrEnum):
    error = "error"  # stop before any model loads, naming the files
    skip = "skip"  # list them in the run folder's bad_files.csv and go on


class DuplicateKeep(StrEnum):
    ductal_carcinoma = "ductal_carcinoma"
    lobular_carcinoma = "lobular_carcinoma"
    # both copies, as the blog notebook kept them: Folds.csv fold 1 then puts identical images in
    # train and test under different labels (the count is in data_stats.json)
    both = "both"


class StainNorm(StrEnum):
    none = "none"  # the images' own colours
    # H and E stain vectors and concentrations matched to the reference's (Macenko et al., 2009)
    macenko = "macenko"
    # CIE-LAB channel means and deviations matched (Reinhard et al., 2001): cheaper, cruder
    reinhard = "reinhard"


class SplitKind(StrEnum):
    patient = "patient"
    official_fold = "official_fold"
    eva = "eva"


class GroupBy(StrEnum):
    stem = "stem"
    patient = "patient"


class BalanceDraw(StrEnum):
    seeded = "seeded"  # numpy's generator, seeded by split.seed and the split
    # the blog notebook's draw: pandas' DataFrame.sample(n=k, random_state=split.seed) of the
    # benign and of the malignant images, each in their Folds.csv row order (split=official_fold)
    pandas = "pandas"


class LabelField(StrEnum):
    subtype = "subtype"  # the subtype folder name (8 classes, eva's 4)
    tumor_class = "tumor_class"  # benign | malignant


class ModelKind(StrEnum):
    medgemma = "medgemma"
    siglip = "siglip"


class Attention(StrEnum):
    sdpa = "sdpa"
    eager = "eager"


class LossOn(StrEnum):
    answer = "answer"
    all_text = "all_text"


class Resize(StrEnum):
    pad = "pad"  # pad to a centred square with the processor's mean colour
    stretch = "stretch"  # the processor resizes to its square, aspect not kept
    shorter_side_crop = "shorter_side_crop"  # eva: shorter side to the input size, centre crop


class PromptStyle(StrEnum):
    numbered = "numbered"
    letters = "letters"


class ClassWording(StrEnum):
    plain = "plain"  # `0: ductal carcinoma`
    blog = "blog"  # the blog notebook's `4: malignant_ductal_carcinoma` (folder names + type)


class AnswerParser(StrEnum):
    # the option key (a number or letter) first in the answer, else exactly one class named in words
    key_or_name = "key_or_name"
    # the blog notebook's `re.search(r"\b([0-7])\b", answer)`, nothing else (numbered style only)
    blog_regex = "blog_regex"


class EvalMode(StrEnum):
    score = "score"  # the likelihood of each class's answer: probabilities, one forward pass
    generate = "generate"  # greedy generation, the answer parsed; unparseable counts as wrong
    both = "both"  # scoring is the run's metrics; generation's beside them, with the agreement


class PeftMethod(StrEnum):
    lora = "lora"
    qlora = "qlora"
    none = "none"


class PrecisionName(StrEnum):
    bf16 = "bf16"
    fp32 = "fp32"
    fp16 = "fp16"


class MonitorMode(StrEnum):
    max = "max"
    min = "min"


class EvalSplit(StrEnum):
    val = "val"
    test = "test"  # the blog notebook's; only to log it: never selects (validate.py)


class Select(StrEnum):
    best = "best"  # the best evaluation by trainer.monitor on validation
    last = "last"  # the final model


class ClassWeighting(StrEnum):
    none = "none"
    inverse_frequency = "inverse_frequency"


class Sampler(StrEnum):
    shuffle = "shuffle"
    balanced = "balanced"


class Fusion(StrEnum):
    mean_log_prob = "mean_log_prob"  # softmax of the mean log-probability (geometric mean)
    mean_prob = "mean_prob"  # the mean probability
    majority_vote = "majority_vote"  # each image votes its argmax class; ties by mean probability


class LoggerKind(StrEnum):
    wandb = "wandb"
    none = "none"


class LoggerMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class LogModel(StrEnum):
    best = "best"  # the best model (best/) of the run
    last = "last"  # the model at the end of training
    none = "none"  # no model artifact


@dataclass
class PathsConfig:
    output_dir: str = "outputs"  # run and sweep folders go under it
    # every cache of the project (replica, resized images, features, tiny models) lives below
    cache_dir: str = "${oc.env:BREAKHIS_FT_CACHE,${oc.env:HOME}/.cache/breakhis_ft}"
    synthetic: str = "${.cache_dir}/synthetic"  # the built replicas
    images: str = "${.cache_dir}/data"  # resized-image caches (datasets)
    vision_features: str = "${.cache_dir}/vision_features"  # MedGemma soft tokens
    embeddings: str = "${.cache_dir}/embeddings"  # SigLIP linear-probe embeddings
    models: str = "${.cache_dir}/models"  # tiny checkpoints built here


@dataclass
class AugmentConfig:
    flips: bool = True  # horizontal and vertical flips
    rot90: bool = True  # rotations by multiples of 90 degrees
    stain_jitter: float = 0.0  # strength of H&E stain jitter; 0 turns it off
    seed: int = 0


@dataclass
class DataConfig:
    source: DataSource = DataSource.synthetic
    root: str | None = None  # BreakHis tree (source=breakhis) or where the replica is built
    synthetic_fraction: float = 1.0  # share of the 7,909 real images the replica holds
    synthetic_size: list[int] = field(default_factory=lambda: [700, 460])  # width, height
    synthetic_seed: int = 0
    duplicate_keep: DuplicateKeep = DuplicateKeep.ductal_carcinoma  # which copy of 13412 stays
    on_bad_file: OnBadFile = OnBadFile.error
    verify_images: bool = False  # decode every image up front
    # images above this many pixels are bad files (on_bad_file), never decoded: BreakHis images
    # are 0.32 megapixels, whole-slide tiles up to ~16; at most 178956970 (PIL's bomb limit)
    max_image_pixels: int = 25_000_000
    image_size: int = 896  # longest side of the cached, resized images (MedGemma's input size)
    # H&E stain normalisation (data/stain.py), applied to the full-size image before it is resized
    # into the image cache (its identity is part of the cache key) and again at prediction; the
    # fitted normaliser is saved as stain_normalizer.json in the run folder and in exports. Only
    # tissue pixels change. An image with no stain to estimate (blank, one flat colour, too little
    # tissue) or whose result fails a check (stains not H&E's, saturation collapsed) is kept as it
    # is, counted in data_stats.json (stain_normalization) and listed in stain_fallbacks.csv.
    stain_norm: StainNorm = StainNorm.none
    # the reference the stains are mapped to: an image file, or `train`: the median of per-image
    # fits over stain_reference_images images of the TRAINING split (round robin over its
    # patients), never validation or test
    stain_reference: str = "train"
    stain_reference_images: int = 64
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SplitConfig:
    kind: SplitKind = SplitKind.patient
    group_by: GroupBy = GroupBy.stem  # stem: sibling slides together; patient: folder id
    ratios: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train, val, test
    seed: int = 0
    n_folds: int = 0  # >1: k-fold cross-validation by group, `fold` picks the test fold
    fold: int = 1  # official_fold: Folds.csv fold 1-5; patient k-fold: test fold index 1..n_folds
    val_fraction: float = 0.15  # official_fold, patient k-fold: share of train moved to validation
    balance_binary: float | None = None  # undersample benign:malignant to 1:this (blog: 1.0)
    balance_splits: list[str] = field(default_factory=lambda: ["train"])
    balance_draw: BalanceDraw = BalanceDraw.seeded  # which images the undersampling keeps
    # a split that lacks a class of the task (a class with no training image, or too few patient
    # groups to reach val or test): false warns at the start and records it in data_stats.json;
    # true refuses to run, naming the split and the classes
    require_all_classes: bool = False


@dataclass
class MagnificationConfig:
    name: str = "all"
    factors: list[int] = field(default_factory=lambda: [40, 100, 200, 400])


@dataclass
class TaskConfig:
    name: str = MISSING  # names the task in reports (subtype8, binary, eva4)
    label_field: LabelField = LabelField.subtype  # the record field that carries the class
    classes: list[str] = MISSING  # the classes, in the order of the probability columns


@dataclass
class PromptConfig:
    style: PromptStyle = PromptStyle.numbered  # numbered (blog: 0-7) | letters (Google: A-H)
    class_names: ClassWording = ClassWording.plain  # how the options name the classes
    parse: AnswerParser = AnswerParser.key_or_name  # how a generated answer maps to a class
    instruction: str = "Analyze this breast tissue histopathology image and classify it."
    system: str | None = None


@dataclass
class ModelConfig:
    """The keys every model family has; a family's schema (MedGemmaConfig, SiglipConfig) adds its
    own, so a key of another family fails at compose time."""

    kind: ModelKind = MISSING  # the family, checked against the checkpoint before loading
    # the builder of the Classifier (hydra.utils.instantiate, _partial_): set by the model group
    builder: Any = MISSING
    name_or_path: str = MISSING  # hub id or local folder
    build_tiny: bool = False  # build a tiny random checkpoint (only under paths.models)


@dataclass
class MedGemmaConfig(ModelConfig):
    """MedGemma (Gemma 3 image-text), classified generatively: prompt -> answer."""

    kind: ModelKind = ModelKind.medgemma
    attn_implementation: Attention = Attention.sdpa
    loss_on: LossOn = LossOn.answer  # answer (answer + end of turn) | all_text (the blog's)
    # the processor's add_special_tokens on the chat-templated text. false: the
    # template's one <bos>; true: the tokenizer adds its own too, as the blog notebook's
    # `processor(text=...)` did (two <bos> with MedGemma's tokenizer, which adds one)
    add_special_tokens: bool = False
    # auto (where valid) | true | false; Any keeps a YAML `true` a bool instead of the string "True"
    cache_vision_features: Any = "auto"
    freeze_vision: bool = True  # keep vision tower + projector frozen (unless LoRA targets them)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # how the run's final evaluation classifies (generate/both: raw answers in
    # predictions_<split>.csv, parse failures in metrics.json)
    eval_mode: EvalMode = EvalMode.score
    max_new_tokens: int = 40  # generation's limit (greedy, answer parsed); the blog used 40
    # with peft=lora: merge the adapter into the weights before the final evaluation (the blog's
    # merge_and_unload); the saved adapter is unchanged
    merge_for_eval: bool = False


@dataclass
class SiglipConfig(ModelConfig):
    """A SigLIP image encoder (MedSigLIP) + a linear head, or zero-shot by its text tower."""

    kind: ModelKind = ModelKind.siglip
    freeze_encoder: bool = False  # frozen encoder + linear head (linear probe, with peft=none)
    resize: Resize = Resize.pad  # pad (to square) | stretch | shorter_side_crop (eva's)
    # classify by image-text similarity to class-name prompts (needs the text tower), no
    # training; run with train=false
    zero_shot: bool = False
    zero_shot_templates: list[str] = field(
        default_factory=lambda: ["H&E histopathology image of breast {}"]
    )


# the schema of each model family, by `model.kind`; the model group's files name theirs in their
# defaults list (`/medgemma_schema@_here_`)
MODEL_SCHEMAS: dict[str, type[ModelConfig]] = {
    ModelKind.medgemma: MedGemmaConfig,
    ModelKind.siglip: SiglipConfig,
}


@dataclass
class PeftConfig:
    method: PeftMethod = PeftMethod.lora
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Any = "language_model"  # language_model | all-linear | list of module names
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class PrecisionConfig:
    name: PrecisionName = PrecisionName.bf16
    allow_fp16: bool = False  # fp16 overflows to NaN on Gemma 3; refused unless set


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: int = -1  # >0 overrides epochs
    # per process micro-batch; auto: the largest divisor of effective_batch_size whose estimated
    # memory (estimate_vram) + headroom fits memory_budget_gib or the GPU's free memory
    batch_size: Any = 8
    eval_batch_size: int = 16
    grad_accum: int = 1  # effective batch = batch_size x grad_accum x processes
    # with batch_size=auto (only): micro-batch x grad_accum per process, kept whatever is chosen
    effective_batch_size: int | None = None
    # GiB batch_size=auto may fill (the only budget on a CPU); null: the GPU's free memory
    memory_budget_gib: float | None = None
    # the optimizer (hydra.utils.instantiate, _partial_; params and lr are given by the recipe)
    optimizer: Any = MISSING
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"  # a transformers.get_scheduler name: linear, cosine, constant ...
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    eval_every_steps: int = 0  # 0: evaluate at the end of each epoch
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of each epoch (Ctrl-C also saves)
    # a checkpoint at the first update this many minutes after the last one, besides those by
    # steps or epochs: a SIGKILL (a grace period overrun, a lost machine) loses at most this much
    # training; null: off
    checkpoint_every_minutes: float | None = None
    keep_checkpoints: int = 2  # older resume checkpoints are pruned; the best one is kept apart
    early_stopping_patience: int = 0  # evaluations without improvement; 0 turns it off
    # the split evaluated during training: val, or test only to log it (with select=last)
    eval_split: EvalSplit = EvalSplit.val
    select: Select = Select.best  # the model of the final evaluation: best on val | the last one
    monitor: str = "val/balanced_accuracy"  # picks the best checkpoint, used for the test split
    monitor_mode: MonitorMode = MonitorMode.max
    class_weighting: ClassWeighting = ClassWeighting.none  # loss weights
    sampler: Sampler = Sampler.shuffle  # balanced: each class drawn equally often
    num_workers: int = 0
    log_every_steps: int = 10
    cpu: bool = False  # force CPU even where a GPU is present
    # debug presets (conf/debug/): 0 turns each off
    limit_train_batches: int = 0  # >0: an epoch ends after this many training batches
    limit_eval_batches: int = 0  # >0: evaluations (val and test) predict only this many batches
    # >0: train and validate on the same batch_size x this many training images (can it learn?)
    overfit_batches: int = 0
    profile_steps: int = 0  # >0: the PyTorch profiler records this many updates (run/profile/)


@dataclass
class EvaluateConfig:
    """The statistics of the final evaluation (val and test after training), not of the
    per-epoch validation, which stays cheap. Intervals resample the split's patient groups
    (split.group_by: stems or patient folders) within each class, not images."""

    bootstrap_resamples: int = 1000  # group-bootstrap resamples of each interval; 0: none
    ci_level: float = 0.95  # interval coverage; the keys carry it: balanced_accuracy_ci95
    seed: int = 0  # the resamples depend on the test groups, their classes and this seed only
    calibration_bins: int = 15  # equal-width confidence bins of ECE, MCE and reliability plots
    # one temperature fitted on val (NLL), applied to test and reported before/after; saved in
    # calibration.json and used by predict and exports
    temperature_scaling: bool = True
    # how the images of one patient make the patient's diagnosis (metrics.json `patient_level`)
    patient_fusion: Fusion = Fusion.mean_log_prob


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.wandb
    mode: LoggerMode = LoggerMode.offline  # WANDB_MODE in the environment takes precedence
    project: str = "breakhis-ft"
    entity: str | None = None
    group: str | None = None  # default: experiment name, or <experiment>/<sweep folder> in multirun
    # added to the tags every run gets: sweep:<sweep folder>, optuna:<study>, rerun
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    # seconds mode=online waits for the W&B server before the run goes on offline (W&B: 90)
    init_timeout: float = 20.0
    # at the end, the exported adapter of this model + metrics.json + config.yaml as a versioned W&B
    # `model` artifact (model-<run id>, aliases best|last and the run id); the demo sets none
    log_model: LogModel = LogModel.best


@dataclass
class TrainRunConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    magnification: MagnificationConfig = field(default_factory=MagnificationConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment_name: str = "default"  # names the run folder and the W&B group
    seed: int = 42  # model init and data order; split seeds are split.seed
    train: bool = True  # false: skip training (evaluate resume's best model, or the base model)
    test: bool = True  # false: skip the final evaluation
    # what a sweep optimises: the entrypoint returns it; a validation metric, so tuning never
    # sees test
    optimized_metric: str = "val/balanced_accuracy"
    resume: str | None = None  # a run folder to continue from its last checkpoint
    # the run folder this run reruns (set by `rerun=`, which composes that folder's saved config)
    rerun_of: str | None = None


MAGNIFICATIONS = (40, 100, 200, 400)


def is_folder_name(name: str) -> bool:
    """Whether `name` names one entry of a folder: not empty, `.` or `..`, no separator."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def folder_name(value: Any) -> str:
    """experiment_name as the folder it names under paths.output_dir (the `folder_name` resolver
    of train.yaml's run and sweep folders): one folder name, never a path that leaves it."""
    name = str(value)
    if not is_folder_name(name):
        raise ConfigError(
            f"experiment_name={name!r}: it names the run's folder under "
            "paths.output_dir, so it must be one folder name (not empty, `.` or `..`, no / or \\); "
            "e.g. experiment_name=lora_r8. Choose where runs go with paths.output_dir"
        )
    return name


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore: the base config `train_schema` and each model
    family's schema (`medgemma_schema`, `siglip_schema`, for the model group's files); and the
    `folder_name` resolver the run folders' paths use."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainRunConfig)
    for kind, schema in MODEL_SCHEMAS.items():
        store.store(name=f"{kind}_schema", node=schema)
    if not OmegaConf.has_resolver("folder_name"):
        OmegaConf.register_new_resolver("folder_name", folder_name)


def family_keys_only(saved: Any) -> dict[str, Any]:
    """A saved run config as a plain dict whose model holds its family's keys only: a config saved
    with one flat model schema holds every family's, and the others are dropped."""
    values: dict[str, Any] = OmegaConf.to_container(OmegaConf.create(saved))  # type: ignore[assignment]
    model = values.get("model") or {}
    known = {f.name for f in fields(MODEL_SCHEMAS[str(model["kind"])])}
    values["model"] = {k: v for k, v in model.items() if k in known}
    return values


def schema_of(saved: Any) -> DictConfig:
    """The schema a saved run config goes onto: TrainRunConfig, its model on the schema of the
    config's family (`model.kind`)."""
    cfg = OmegaConf.structured(TrainRunConfig)
    cfg.model = OmegaConf.structured(MODEL_SCHEMAS[str(saved["model"]["kind"])])
    return cfg
