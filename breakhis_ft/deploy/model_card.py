"""What an export says about itself: the exact prompt, answers, preprocessing and temperature
(`export_info.json`), and a model card (README.md) with a usage snippet in plain transformers/peft.

The card follows the Hugging Face Hub's conventions (`huggingface_hub.ModelCardData`): base model
and its licence, datasets, pipeline tag, tags and a `model-index` with the run's test metrics and
their intervals, so `upload_folder` publishes a complete page. It holds no path of the machine that
exported it: the snippet loads the folder it sits in (or the hub id it is uploaded to). The snippet
is generated with the export's literal values (messages, answers, image size, pad colour), so it
reproduces the run's probabilities without this package; a test runs it.
"""

from __future__ import annotations

import csv
import json
import pprint
from collections import Counter
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from omegaconf import DictConfig

from breakhis_ft.data.dataset import RESAMPLE
from breakhis_ft.evaluate.bootstrap import ci_key
from breakhis_ft.models.factory import classifier_type

# metrics.json key -> the name the card shows
CARD_METRICS = {
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "f1_macro": "Macro F1",
    "auroc_macro": "Macro AUROC",
    "patient_recognition_rate": "Patient recognition rate",
}
# MedGemma and MedSigLIP are published under Google's Health AI Developer Foundations terms: their
# hub pages (google/medgemma-4b-it, google/medsiglip-448) declare this licence, which binds the
# models derived from them
HAI_DEF_BASES = ("google/medgemma-", "google/medsiglip-")
HAI_DEF_LICENSE = {
    "license": "other",
    "license_name": "health-ai-developer-foundations",
    "license_link": "https://developers.google.com/health-ai-developer-foundations/terms",
}
# the hub's task of each model kind: a MedGemma export is an image-text-to-text model (it answers
# a prompt; classification scores each class's answer), a SigLIP export an image encoder whose
# linear head classifies
PIPELINE_TAGS = {"medgemma": "image-text-to-text", "siglip": "image-classification"}
# BreakHis has no dataset repository of its authors on the hub: these ids name the data
DATASETS = {"breakhis": "breakhis", "synthetic": "breakhis-synthetic-replica"}
DATASET_NAMES = {
    "breakhis": "BreakHis (BreaKHis_v1, Spanhol et al. 2016)",
    "synthetic": "synthetic BreakHis replica",
}
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def preprocessing(cfg: DictConfig, image_size: int | None) -> dict[str, Any]:
    """How an image becomes model input: RGB, longest side resized (or not), then the processor."""
    steps: dict[str, Any] = {
        "convert": "RGB",
        "resize": None if image_size is None else "longest_side",
        "size": image_size,
        # the processor's square: the longest side is also no larger than keeps the shorter side
        # at it (data.dataset.cached_longest_side)
        "model_side": None,
        "resample": RESAMPLE.name.lower(),
        # none, or the H&E normaliser (stain_normalizer.json, applied before the resize)
        "stain_norm": str(cfg.data.stain_norm),
    }
    steps.update(classifier_type(cfg.model).preprocessing_steps(cfg.model, image_size))
    steps["then"] = "the checkpoint's own processor (in this folder, or the base model's)"
    return steps


def describe(cfg: DictConfig, image_size: int | None) -> dict[str, Any]:
    """The self-describing part of export_info.json (beside its temperature)."""
    info: dict[str, Any] = {"preprocessing": preprocessing(cfg, image_size)}
    family = classifier_type(cfg.model)
    info.update(family.answer_details(cfg.model, tuple(cfg.task.classes)))
    return info


# ---- the usage snippet --------------------------------------------------------------------------

_RESIZE = """image = Image.open(IMAGE).convert("RGB")
longest = SIZE  # the longest side, as training's image cache: at most SIZE, and no larger than
if SIZE is not None and MODEL_SIDE is not None:  # keeps the shorter side at the model's square
    longest = min(SIZE, max(1, round(max(image.size) * MODEL_SIDE / min(image.size))))
if longest is not None and max(image.size) != longest:
    scale = longest / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
"""

_GEMMA_PREDICT = """\
prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
inputs = processor(text=[prompt], images=[[image]], return_tensors="pt", add_special_tokens=False)
inputs = inputs.to(model.device)
inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
first = [processor.tokenizer(a, add_special_tokens=False).input_ids[0] for a in ANSWERS]
assert len(set(first)) == len(first), "the answers must start with distinct tokens"
with torch.no_grad():
    logits = model(**inputs, logits_to_keep=1).logits[0, -1].float()
probs = (logits[first] / TEMPERATURE).softmax(-1)
print(CLASSES[int(probs.argmax())], dict(zip(CLASSES, probs.tolist())))
"""

_SIGLIP_PREDICT = """\
if SQUARE == "pad" and image.width != image.height:  # centred on the processor's mean colour
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), FILL)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    image = canvas
pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    out = encoder(pixel_values=pixel_values.to(encoder.device, encoder.dtype))
    pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)
    logits = torch.nn.functional.linear(pooled.float().cpu(), head["weight"], head["bias"])[0]
probs = (logits / TEMPERATURE).softmax(-1)
print(CLASSES[int(probs.argmax())], dict(zip(CLASSES, probs.tolist())))
"""


def hub_id(name: str) -> str | None:
    """`name` if it is a hub repository id, None if it is a local folder (which means nothing on
    the hub and must not leak the exporting machine's paths into a card)."""
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _constants(info: dict[str, Any]) -> list[str]:
    size = (info.get("preprocessing") or {}).get("size")
    return [
        'MODEL = "."  # this folder (run the snippet in it), or its hub id once uploaded',
        'IMAGE = "path/to/image.png"',
        f"CLASSES = {info['class_names']!r}",
        f"SIZE = {size!r}  # longest side before the processor (None: as it is)",
        f"MODEL_SIDE = {(info.get('preprocessing') or {}).get('model_side')!r}  # its square",
        f"TEMPERATURE = {info.get('temperature') or 1.0!r}  # fitted on validation (calibration)",
    ]


def _base_line(info: dict[str, Any]) -> str:
    """The snippet's BASE: the hub id, or (a local base) read from export_info.json beside it."""
    base = hub_id(str(info["base_model"]))
    if base is not None:
        return f'BASE = "{base}"'
    return (
        'BASE = json.load(open(f"{MODEL}/export_info.json"))["base_model"]  # a local folder '
        "when exported: your copy of it"
    )


def _snippet_imports(info: dict[str, Any], *modules: str) -> list[str]:
    """json (a local base is read from export_info.json), then the given import lines."""
    local = info["format"] == "adapter" and hub_id(str(info["base_model"])) is None
    return (["import json"] if local else []) + list(modules)


def _gemma_snippet(info: dict[str, Any]) -> str:
    dtype = _DTYPES[str(info["precision"])]
    adapter = info["format"] == "adapter"
    lines = _snippet_imports(info, "import torch", "from PIL import Image")
    if adapter:
        lines.append("from peft import PeftModel")
    lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor", ""]
    lines += _constants(info)
    lines.append(f"ANSWERS = {[a['answer'] for a in info['answers']]!r}  # in class order")
    lines.append("MESSAGES = " + pprint.pformat(info["messages"], width=88, sort_dicts=False))
    lines.append("")
    if adapter:
        lines += [
            _base_line(info),
            f"model = AutoModelForImageTextToText.from_pretrained(BASE, dtype=torch.{dtype})",
            "model = PeftModel.from_pretrained(model, MODEL).eval()",
            "processor = AutoProcessor.from_pretrained(BASE)",
        ]
    else:
        lines += [
            f"model = AutoModelForImageTextToText.from_pretrained(MODEL, dtype=torch.{dtype})",
            "model = model.eval()",
            "processor = AutoProcessor.from_pretrained(MODEL)",
        ]
    return "\n".join(lines) + "\n\n" + _RESIZE + _GEMMA_PREDICT


def _siglip_snippet(info: dict[str, Any]) -> str:
    dtype = _DTYPES[str(info["precision"])]
    adapter = info["format"] == "adapter"
    lines = _snippet_imports(
        info, "import torch", "from PIL import Image", "from safetensors.torch import load_file"
    )
    if adapter:
        lines.append("from peft import PeftModel")
    lines += ["from transformers import AutoImageProcessor, SiglipVisionModel", ""]
    lines += _constants(info)
    lines.append(f"SQUARE = {info['preprocessing'].get('square')!r}  # pad | stretch")
    lines.append(f"FILL = {tuple(info['preprocessing'].get('fill') or (128, 128, 128))!r}")
    lines.append("")
    source = "BASE" if adapter else "MODEL"
    if adapter:
        lines.append(_base_line(info))
    lines.append(f"encoder = SiglipVisionModel.from_pretrained({source}, dtype=torch.{dtype})")
    if adapter:
        lines.append('encoder = PeftModel.from_pretrained(encoder, f"{MODEL}/adapter")')
    lines += [
        "encoder = encoder.eval()",
        f"processor = AutoImageProcessor.from_pretrained({source})",
        'head = load_file(f"{MODEL}/head.safetensors")  # the linear head: weight (C, D), bias (C)',
    ]
    return "\n".join(lines) + "\n\n" + _RESIZE + _SIGLIP_PREDICT


def usage_snippet(info: dict[str, Any]) -> str:
    """Python that classifies one image with this export: transformers (+ peft for an adapter)."""
    snippets = {"medgemma": _gemma_snippet, "siglip": _siglip_snippet}
    return snippets[info["model_kind"]](info)


# ---- the card -----------------------------------------------------------------------------------


def _split_counts(run_dir: Path) -> dict[str, int]:
    path = Path(run_dir) / "splits.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return dict(Counter(row["split"] for row in csv.DictReader(f)))


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _scheme(values: dict[str, Any]) -> dict[str, Any]:
    """How a split's intervals were made (`interval`; `bootstrap` in runs written before it)."""
    return values.get("interval") or values.get("bootstrap") or {}


def _interval(values: dict[str, Any], name: str) -> list[float] | None:
    """The metric's stored interval (at the run's level, evaluate.ci_level), if it has one."""
    level = float(_scheme(values).get("level", 0.95))
    ci = values.get(ci_key(name, level))
    return [float(ci[0]), float(ci[1])] if isinstance(ci, list) and len(ci) == 2 else None


def _metrics_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for split, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for name in CARD_METRICS:
            value = values.get(name)
            if not isinstance(value, int | float):
                continue
            ci = _interval(values, name)
            shown = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
            rows.append(f"| {split} (n={values.get('n', '?')}) | {name} | {value:.4f} | {shown} |")
    return rows


def _protocol(cfg: dict[str, Any]) -> str:
    split = cfg["split"]
    return {
        "patient": f"split by patient group ({split['group_by']}; train/val/test ratios "
        f"{split['ratios']}, seed {split['seed']})",
        "official_fold": f"Folds.csv fold {split['fold']}, validation carved from train by patient",
        "eva": "kaiko-ai/eva's protocol (fixed validation patients)",
    }.get(split["kind"], str(split["kind"]))


def _eval_results(info: dict[str, Any], metrics: dict[str, Any]) -> list[EvalResult]:
    """The model-index: each card metric of the test split (eva's protocol: validation, it has no
    test) with its interval in the shown name and in metric_args."""
    cfg = info["config"]
    split = "test" if isinstance(metrics.get("test"), dict) else "val"
    values = metrics.get(split) or {}
    boot = _scheme(values)
    source = str(cfg["data"]["source"])
    dataset = (
        f"{DATASET_NAMES.get(source, source)}, {cfg['magnification']['factors']} magnification, "
        f"{_protocol(cfg)}"
    )
    results = []
    for name, shown in CARD_METRICS.items():
        value = values.get(name)
        if not isinstance(value, int | float):
            continue
        ci = _interval(values, name)
        args = None
        if ci:
            level = float(boot.get("level", 0.95))
            shown += f" ({level:.0%} CI {ci[0]:.3f}-{ci[1]:.3f}, {boot.get('unit', '')} bootstrap"
            shown += ", stratified by class)" if boot.get("stratified_by") else ")"
            args = {"interval": ci, "level": level, "resampled_unit": boot.get("unit")}
            args["resamples"] = boot.get("resamples")
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name=f"{info['task']} ({len(info['class_names'])} classes)",
                dataset_type=DATASETS.get(source, source),
                dataset_name=dataset,
                dataset_split="test" if split == "test" else "validation",
                metric_type=name,
                metric_value=round(float(value), 4),
                metric_name=shown,
                metric_args=args,
            )
        )
    return results


def card_data(info: dict[str, Any], metrics: dict[str, Any]) -> ModelCardData:
    """The card's metadata as the hub reads it (base model, licence, data, task, results)."""
    base = hub_id(str(info["base_model"]))
    adapter = info["format"] == "adapter"
    tags = ["histopathology", "breakhis", "breast-cancer", "medical", str(info["model_kind"])]
    if info["peft"]["method"] != "none":
        tags.append("lora")
    extra: dict[str, Any] = {}
    if base is not None:
        # how the hub files this model under its base: an adapter, or weights trained from it
        extra["base_model_relation"] = "adapter" if adapter else "finetune"
        if base.startswith(HAI_DEF_BASES):
            extra.update(HAI_DEF_LICENSE)
    source = str(info["config"]["data"]["source"])
    return ModelCardData(
        model_name=_title(info),
        base_model=base,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=PIPELINE_TAGS[str(info["model_kind"])],
        tags=tags,
        datasets=[DATASETS.get(source, source)],
        metrics=list(CARD_METRICS),
        eval_results=_eval_results(info, metrics) or None,
        **extra,
    )


def _title(info: dict[str, Any]) -> str:
    experiment = info["config"].get("experiment_name", "run")
    return f"{experiment}: {info['model_kind']} for {info['task']}"


def _data_section(cfg: dict[str, Any], run_dir: Path) -> list[str]:
    data = cfg["data"]
    source = (
        "BreakHis (BreaKHis_v1; Spanhol et al. 2016, "
        "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/)"
        if data["source"] == "breakhis"
        else "the synthetic BreakHis replica (random images with BreakHis's folder layout: a "
        "pipeline check, not a medical model)"
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(_split_counts(run_dir).items()))
    return [
        "## Data and split",
        "",
        f"- Data: {source}; magnifications {cfg['magnification']['factors']}.",
        f"- Split: {_protocol(cfg)}; no patient is in two splits. Images: "
        f"{counts or 'see splits.csv'}.",
        "- Model selection used the validation split only; test was evaluated once at the end.",
        "",
    ]


def _stain_note(info: dict[str, Any]) -> list[str]:
    stain = (info.get("preprocessing") or {}).get("stain_norm", "none")
    if stain in ("none", None):
        return []
    return [
        f"The run normalised H&E stains ({stain}, `stain_normalizer.json` here) before resizing; "
        "this snippet does not, so its probabilities differ from the run's. "
        "`breakhis-ft-predict --model THIS_FOLDER IMAGES` applies it.",
        "",
    ]


def _base_sentence(info: dict[str, Any]) -> str:
    base = hub_id(str(info["base_model"]))
    if base is not None:
        return f"`{base}`"
    return (
        "A local base checkpoint (`base_model` in export_info.json; set the card's `base_model` "
        "and its licence before publishing)"
    )


def model_card(info: dict[str, Any], run_dir: Path) -> ModelCard:
    """The export's card: hub metadata, classes, data, split, metrics (with intervals), usage."""
    cfg, best = info["config"], info.get("best") or {}
    peft = info["peft"]
    method = (
        "full fine-tuning"
        if peft["method"] == "none"
        else (
            f"{peft['method']} (r={peft['r']}, alpha={peft['alpha']}, dropout={peft['dropout']}, "
            f"targets {peft['target_modules']})"
        )
    )
    metrics = _read_metrics(run_dir)
    run_name = f"{cfg.get('experiment_name', 'run')}/{Path(info['source_run']).name}"
    lines = [
        f"# {_title(info)}",
        "",
        f"{_base_sentence(info)} fine-tuned with {method} to classify breast histopathology "
        f"images into {len(info['class_names'])} classes; exported {info['format']} in "
        f"{info['precision']}. Source run: `{run_name}` (best step {best.get('step')}, "
        f"{best.get('monitor')} = {best.get('value')}).",
        "",
        "## Classes",
        "",
        "| index | class | answer |",
        "|---|---|---|",
        *(
            f"| {i} | {a['class']} | {a.get('answer', '')!r} |"
            for i, a in enumerate(info["answers"])
        ),
        "",
        *_data_section(cfg, run_dir),
        "## Results (the best checkpoint; intervals by a bootstrap of the split's patient groups, "
        "stratified by class, where the run computed them)",
        "",
        "| split | metric | value | interval |",
        "|---|---|---|---|",
        *(_metrics_rows(metrics) or ["| - | no metrics.json in the run | - | - |"]),
        "",
        "## Usage",
        "",
        "Plain transformers"
        + (" and peft" if info["format"] == "adapter" else "")
        + "; the values are this export's own (export_info.json holds them too).",
        "",
        *_stain_note(info),
        "```python",
        usage_snippet(info).rstrip(),
        "```",
        "",
    ]
    data = card_data(info, metrics)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
