"""What an export says about itself: the exact prompt, answers, preprocessing and temperature
(`export_info.json`), and a model card (README.md) with a usage snippet in plain transformers/peft.

The snippet is generated with the export's literal values (messages, answers, image size, pad
colour), so it reproduces the run's probabilities without this package; a test runs it.
"""

from __future__ import annotations

import csv
import json
import pprint
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from breakhis_ft.data.dataset import RESAMPLE
from breakhis_ft.models.factory import classifier_type

CARD_METRICS = (
    "balanced_accuracy",
    "accuracy",
    "f1_macro",
    "auroc_macro",
    "patient_recognition_rate",
)
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# the Hub's pipeline tag of each model family (export_info.json's model_kind)
PIPELINE_TAGS = {"medgemma": "image-text-to-text", "siglip": "image-classification"}


def preprocessing(cfg: DictConfig, image_size: int | None) -> dict[str, Any]:
    """How an image becomes model input: RGB, longest side resized (or not), then the processor."""
    steps: dict[str, Any] = {
        "convert": "RGB",
        "resize": None if image_size is None else "longest_side",
        "size": image_size,
        "resample": RESAMPLE.name.lower(),
        # none, or the H&E normaliser (stain_normalizer.json, applied before the resize)
        "stain_norm": str(cfg.data.stain_norm),
    }
    steps.update(classifier_type(cfg.model).preprocessing_steps(cfg.model))
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
if SIZE is not None and max(image.size) != SIZE:  # the longest side, as training's image cache
    scale = SIZE / max(image.size)
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


def _constants(info: dict[str, Any], out_dir: Path) -> list[str]:
    size = (info.get("preprocessing") or {}).get("size")
    return [
        f'MODEL = "{Path(out_dir).resolve()}"  # this folder (or its hub id once uploaded)',
        'IMAGE = "path/to/image.png"',
        f"CLASSES = {info['class_names']!r}",
        f"SIZE = {size!r}  # longest side before the processor (None: as it is)",
        f"TEMPERATURE = {info.get('temperature') or 1.0!r}  # fitted on validation (calibration)",
    ]


def _gemma_snippet(info: dict[str, Any], out_dir: Path) -> str:
    dtype = _DTYPES[str(info["precision"])]
    adapter = info["format"] == "adapter"
    lines = ["import torch", "from PIL import Image"]
    if adapter:
        lines.append("from peft import PeftModel")
    lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor", ""]
    lines += _constants(info, out_dir)
    lines.append(f"ANSWERS = {[a['answer'] for a in info['answers']]!r}  # in class order")
    lines.append("MESSAGES = " + pprint.pformat(info["messages"], width=88, sort_dicts=False))
    lines.append("")
    if adapter:
        lines += [
            f'BASE = "{info["base_model"]}"',
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


def _siglip_snippet(info: dict[str, Any], out_dir: Path) -> str:
    dtype = _DTYPES[str(info["precision"])]
    adapter = info["format"] == "adapter"
    lines = ["import torch", "from PIL import Image", "from safetensors.torch import load_file"]
    if adapter:
        lines.append("from peft import PeftModel")
    lines += ["from transformers import AutoImageProcessor, SiglipVisionModel", ""]
    lines += _constants(info, out_dir)
    lines.append(f"SQUARE = {info['preprocessing'].get('square')!r}  # pad | stretch")
    lines.append(f"FILL = {tuple(info['preprocessing'].get('fill') or (128, 128, 128))!r}")
    lines.append("")
    source = "BASE" if adapter else "MODEL"
    if adapter:
        lines.append(f'BASE = "{info["base_model"]}"')
    lines.append(f"encoder = SiglipVisionModel.from_pretrained({source}, dtype=torch.{dtype})")
    if adapter:
        lines.append('encoder = PeftModel.from_pretrained(encoder, f"{MODEL}/adapter")')
    lines += [
        "encoder = encoder.eval()",
        f"processor = AutoImageProcessor.from_pretrained({source})",
        'head = load_file(f"{MODEL}/head.safetensors")  # the linear head: weight (C, D), bias (C)',
    ]
    return "\n".join(lines) + "\n\n" + _RESIZE + _SIGLIP_PREDICT


def usage_snippet(info: dict[str, Any], out_dir: Path) -> str:
    """Python that classifies one image with this export: transformers (+ peft for an adapter)."""
    snippets = {"medgemma": _gemma_snippet, "siglip": _siglip_snippet}
    return snippets[info["model_kind"]](info, out_dir)


# ---- the card -----------------------------------------------------------------------------------


def _split_counts(run_dir: Path) -> dict[str, int]:
    path = Path(run_dir) / "splits.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return dict(Counter(row["split"] for row in csv.DictReader(f)))


def _metrics_rows(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    rows = []
    for split, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for name in CARD_METRICS:
            value = values.get(name)
            if not isinstance(value, int | float):
                continue
            ci = values.get(f"{name}_ci95")
            shown = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else "-"
            rows.append(f"| {split} (n={values.get('n', '?')}) | {name} | {value:.4f} | {shown} |")
    return rows


def _front_matter(info: dict[str, Any]) -> list[str]:
    base = str(info["base_model"])
    lines = ["---"]
    if not base.startswith(("/", ".", "~")):  # a hub id (a local path means nothing on the hub)
        lines.append(f"base_model: {base}")
    lines.append(f"library_name: {'peft' if info['format'] == 'adapter' else 'transformers'}")
    lines.append(f"pipeline_tag: {PIPELINE_TAGS[info['model_kind']]}")
    lines += ["tags:", "- histopathology", "- breakhis", "- breast-cancer", "- medical"]
    if info["peft"]["method"] != "none":
        lines.append("- lora")
    return lines + ["---", ""]


def _data_section(cfg: dict[str, Any], run_dir: Path) -> list[str]:
    data, split = cfg["data"], cfg["split"]
    source = (
        f"BreakHis (BreaKHis_v1) at `{data.get('root')}`"
        if data["source"] == "breakhis"
        else "the synthetic BreakHis replica (random images with BreakHis's folder layout: a "
        "pipeline check, not a medical model)"
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(_split_counts(run_dir).items()))
    protocol = {
        "patient": f"by patient group ({split['group_by']}; train/val/test ratios "
        f"{split['ratios']}, seed {split['seed']})",
        "official_fold": f"Folds.csv fold {split['fold']}, validation carved from train by patient",
        "eva": "kaiko-ai/eva's protocol (fixed validation patients)",
    }.get(split["kind"], split["kind"])
    return [
        "## Data and split",
        "",
        f"- Data: {source}; magnifications {cfg['magnification']['factors']}.",
        f"- Split: {protocol}; no patient is in two splits. Images: {counts or 'see splits.csv'}.",
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
        "`python scripts/predict.py --model THIS_FOLDER IMAGES` applies it.",
        "",
    ]


def model_card(info: dict[str, Any], run_dir: Path, out_dir: Path) -> str:
    """README.md of an export: metadata, classes, data, split, metrics (with intervals), usage."""
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
    title = f"{cfg.get('experiment_name', 'run')}: {info['model_kind']} for {info['task']}"
    lines = [*_front_matter(info), f"# {title}", ""]
    lines += [
        f"`{info['base_model']}` fine-tuned with {method} to classify breast histopathology images "
        f"into {len(info['class_names'])} classes; exported {info['format']} in "
        f"{info['precision']}. Source run: `{info['source_run']}` (best step {best.get('step')}, "
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
        "## Results (the best checkpoint; 95% intervals where the run computed them)",
        "",
        "| split | metric | value | 95% CI |",
        "|---|---|---|---|",
        *(_metrics_rows(run_dir) or ["| - | no metrics.json in the run | - | - |"]),
        "",
        "## Usage",
        "",
        "Plain transformers"
        + (" and peft" if info["format"] == "adapter" else "")
        + "; the values are this export's own (export_info.json holds them too).",
        "",
        *_stain_note(info),
        "```python",
        usage_snippet(info, out_dir).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
