"""The real architectures, one real step each, on the CPU: MedGemma 4B and MedSigLIP-448.

  python -m benchmarks real-size                          # full size: ~18 GiB RAM, 2 cores
  python -m benchmarks real-size --reduced --out /tmp/rs  # 6 + 2 layers: checks the code

MedGemma: `google/medgemma-4b-it`'s architecture from the packaged config, random weights in bf16,
nothing downloaded, a stand-in tokenizer with the real vocabulary size and special-token ids. On two
replica images at the real 700 x 460, resized as a run does (longest side `data.image_size` = 896,
then the processor: 896 x 896, 256 soft tokens each) it checks the processor's output and the chat
template, scores the labels, and takes one LoRA training step (the default: LoRA r=8 on the
language model, vision tower under no_grad) with gradient checkpointing, then the same step from
cached vision features. Each is timed, with its peak RSS, FLOPs (torch.utils.flop_counter) and the
bytes autograd saves, beside `estimate_vram` for the same batch (device="cpu"). MedSigLIP-448 (its
vision tower, random, bf16): two images embedded, then one step of the linear probe's head.
Writes real_size_cpu.json and real_size_cpu.md in --out, and the table into --out/README.md
between its `real_size_cpu` markers when they are there.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

from benchmarks.real_size_measure import (
    GIB,
    LayerInputs,
    SavedTensors,
    layer_saved_bytes,
    matmul_flops_per_s,
    phase,
    rate,
    standin_tokenizer,
    static_bytes,
)
from benchmarks.real_size_siglip import siglip_section
from breakhis_ft.config import PeftConfig, PromptConfig, register_configs
from breakhis_ft.data.dataset import resize_longest
from breakhis_ft.data.records import class_names
from breakhis_ft.data.synthetic import STYLE, patient_stain, render_batch
from breakhis_ft.engine.optim import adamw, param_groups
from breakhis_ft.models.gemma_loading import apply_peft, medgemma_4b_config
from breakhis_ft.models.lora import lora_config
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.prompts import make_prompt
from breakhis_ft.vram import estimate_vram

CONF = Path(__file__).resolve().parents[1] / "conf"
IMAGE_SIZE = 896  # data.image_size of a real run (config.py): the cached images' longest side
BATCH = 2
REDUCED = {"text_layers": 6, "vision_layers": 2}  # 6: five sliding-window layers and a global one


def replica_images(n: int = BATCH) -> list:
    """`n` synthetic H&E images at BreakHis's 700 x 460, resized as the run's image cache does."""
    rng = np.random.default_rng(0)
    stain = patient_stain(0, "smoke")
    pixels = render_batch(STYLE["ductal_carcinoma"], stain, 100, (700, 460), n, rng)
    from PIL import Image

    return [resize_longest(Image.fromarray(p), IMAGE_SIZE) for p in pixels]


def medgemma_config(reduced: bool) -> Any:
    """The packaged MedGemma 4B config, or with fewer layers (--reduced)."""
    config = medgemma_4b_config()
    if reduced:
        text = config.text_config
        text.num_hidden_layers = REDUCED["text_layers"]
        text.layer_types = text.layer_types[: REDUCED["text_layers"]]
        config.vision_config.num_hidden_layers = REDUCED["vision_layers"]
    return config


def standin_checkpoint(config: Any, folder: Path) -> Gemma3Processor:
    """The real processor settings with the stand-in tokenizer; saved with the config (no
    weights) in `folder`, so that estimate_vram counts the tokens with it."""
    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_pan_and_scan=False,
    )
    tokenizer = standin_tokenizer()
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=int(config.mm_tokens_per_image),
    )
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return processor


def build_classifier(config: Any, processor: Gemma3Processor) -> MedGemmaClassifier:
    """Random bf16 weights (the projector re-initialised: a fresh one is zero), LoRA as a run."""
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration._from_config(
        config, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
    model = apply_peft(model, lora_config(PeftConfig()))  # r=8, LoRA on the language model
    prompt = make_prompt(PromptConfig(), class_names("subtype8"))
    return MedGemmaClassifier(model, processor, prompt)


def check_batch(clf: MedGemmaClassifier, batch: dict, train: bool) -> dict[str, Any]:
    """The processor's output as a run gets it: 256 soft tokens per image, token types, template."""
    tok = clf.processor.tokenizer
    ids, types = batch["input_ids"], batch["token_type_ids"]
    image_tokens = (ids == tok.image_token_id).sum(1).tolist()
    assert image_tokens == [256] * BATCH, image_tokens
    assert ((ids == tok.boi_token_id).sum(1) == 1).all() and (
        (ids == tok.eoi_token_id).sum(1) == 1
    ).all()
    assert torch.equal(types, (ids == tok.image_token_id).long()), "token_type_ids mark the image"
    assert tuple(batch["pixel_values"].shape) == (BATCH, 3, 896, 896)
    assert ((ids == tok.bos_token_id).sum(1) == 1).all() and (ids[:, 0] == tok.bos_token_id).all()
    assert clf.prompt_text.startswith("<bos><start_of_turn>user\n")
    assert clf.prompt_text.endswith("<end_of_turn>\n<start_of_turn>model\n")
    out = {"image_tokens_per_image": image_tokens, "sequence_tokens": int(ids.shape[1])}
    if train:
        labelled = (batch["labels"] != -100).sum(1).tolist()
        assert labelled == [2] * BATCH, labelled  # the digit + <end_of_turn>
        out["labelled_tokens_per_image"] = labelled
    return out


def train_step(clf: MedGemmaClassifier, batch: dict, acc: Accelerator, opt: Any) -> dict:
    """One optimizer step: loss, FLOPs, the bytes autograd saves outside the checkpointed layers,
    and the layers' inputs (what checkpointing keeps)."""
    layers = clf.core.model.language_model.layers
    saved, inputs = SavedTensors(clf), LayerInputs(layers)
    counter = FlopCounterMode(display=False)
    with counter:
        with saved.active(), acc.autocast():
            loss = clf.loss(batch)
        loss.backward()
        opt.step()
    inputs.remove()
    assert not clf.vision_trainable and all(
        p.grad is None for p in clf.core.model.vision_tower.parameters()
    ), "the vision tower must stay frozen (no_grad)"
    return {
        "loss": float(loss.detach()),
        "flops": counter.get_total_flops(),
        "saved_outside_layers_bytes": saved.bytes,
        "layer_inputs_bytes": sum(inputs.storages().values()),
        "held_bytes": sum({**inputs.storages(), **saved.seen}.values()),
        "calls": inputs.calls,
    }


def recomputed_bytes(clf: MedGemmaClassifier, calls: list, acc: Accelerator) -> int:
    """The largest saved bytes of one recomputed layer (one of each attention type measured)."""
    layers = clf.core.model.language_model.layers
    kinds = {str(t): i for i, t in enumerate(clf.core.config.text_config.layer_types)}
    return max(layer_saved_bytes(layers[i], calls[i], acc.autocast()) for i in kinds.values())


def estimate(folder: Path, overrides: list[str]) -> Any:
    """estimate_vram for the same run, composed like `breakhis-ft` overrides (CPU flavour)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model.name_or_path={folder}", *overrides])
    return estimate_vram(cfg, device="cpu")


def compare(measured: dict, est: Any) -> dict[str, Any]:
    """Measured static memory and saved activations against the estimator's."""
    acts = est.extra["activations_gc_bytes"]
    return {
        "estimate_static_bytes": est.static_bytes,
        "static_ratio": round(measured["static_bytes"] / est.static_bytes, 4),
        "estimate_activations_bytes": acts,
        "activations_ratio": round(measured["saved_activations_bytes"] / acts, 4),
        "estimate_total_gib": round(est.total_bytes / GIB, 3),
        "estimate_components_gib": {k: round(v / GIB, 4) for k, v in est.components.items()},
    }


def medgemma_section(reduced: bool, peak: float, results: dict) -> dict[str, Any]:
    """Build, check, score and train MedGemma (pixels, then cached features); compare."""
    config = medgemma_config(reduced)
    acc = Accelerator(cpu=True, mixed_precision="bf16")  # the autocast a bf16 run uses
    with tempfile.TemporaryDirectory() as tmp, phase(results, "medgemma build") as entry:
        processor = standin_checkpoint(config, Path(tmp))
        clf = build_classifier(config, processor)
        entry["parameters"] = sum(p.numel() for p in clf.parameters())
        overrides = ["model=medgemma_4b_it", "precision=bf16", f"trainer.batch_size={BATCH}"]
        est = estimate(Path(tmp), [*overrides, "trainer.gradient_checkpointing=true"])
    examples = [
        {"image": im, "label": i, "index": i, "path": f"smoke/{i}.png"}
        for i, im in enumerate(replica_images())
    ]
    with phase(results, "medgemma processor") as entry:
        prompts, batch = clf.collate(examples, train=False), clf.collate(examples, train=True)
        entry.update(check_batch(clf, prompts, train=False))
        entry.update({f"train_{k}": v for k, v in check_batch(clf, batch, train=True).items()})
    clf.eval()
    counter = FlopCounterMode(display=False)
    with phase(results, "medgemma label scoring") as entry, torch.no_grad(), acc.autocast():
        with counter:
            probs = clf.predict_proba(prompts)
    assert torch.isfinite(probs).all() and torch.allclose(
        probs.sum(1), torch.ones(BATCH), atol=1e-5
    )
    entry["probabilities"] = [[round(p, 4) for p in row] for row in probs.tolist()]
    rate(entry, counter.get_total_flops(), peak)
    train_both_ways(clf, batch, acc, est, peak, results)
    return {
        "text_layers": config.text_config.num_hidden_layers,
        "vision_layers": config.vision_config.num_hidden_layers,
        "batch": BATCH,
        "lora": "r=8, alpha 16, dropout 0.05, on the language model (the peft defaults)",
        "gradient_checkpointing": True,
        "estimate_notes": est.notes,
        "estimate_settings": {k: str(v) for k, v in est.settings.items()},
    }


def train_both_ways(
    clf: MedGemmaClassifier, batch: dict, acc: Accelerator, est: Any, peak: float, results: dict
) -> None:
    """One training step from pixels, then one from the soft tokens the feature cache holds."""
    clf.train()
    clf.enable_gradient_checkpointing()
    opt = adamw(param_groups(clf, 0.0), lr=1e-4)
    with torch.no_grad(), acc.autocast():
        features = clf.image_features(batch["pixel_values"])
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    cached["image_features"] = features
    for name, step_batch in (("pixels", batch), ("cached features", cached)):
        with phase(results, f"medgemma train step, {name}") as entry:
            out = train_step(clf, step_batch, acc, opt)
        calls, flops = out.pop("calls"), out.pop("flops")
        entry.update(out)
        assert np.isfinite(entry["loss"]), entry["loss"]
        entry["recomputed_layer_bytes"] = recomputed_bytes(clf, calls, acc)
        entry["saved_activations_bytes"] = entry["held_bytes"] + entry["recomputed_layer_bytes"]
        entry.update(static_bytes(clf, opt))
        entry.update(compare(entry, est))
        rate(entry, flops, peak)
        opt.zero_grad(set_to_none=False)


def table(report: dict) -> str:
    """The markdown table of a report: one row per phase."""
    rows = [
        "| phase | wall s | peak RSS GiB | GFLOP | CPU MFU | static: measured / estimate "
        "| saved activations: measured / estimate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in report["phases"].items():
        flops = f"{e['flops'] / 1e9:,.0f}" if "flops" in e else "-"
        mfu = f"{100 * e['cpu_mfu']:.1f}%" if "cpu_mfu" in e else "-"
        static = acts = "-"
        if "estimate_static_bytes" in e:
            static = (
                f"{e['static_bytes'] / GIB:.3f} / {e['estimate_static_bytes'] / GIB:.3f} GiB "
                f"({100 * (e['static_ratio'] - 1):+.2f}%)"
            )
            acts = (
                f"{e['saved_activations_bytes'] / 2**20:,.3f} / "
                f"{e['estimate_activations_bytes'] / 2**20:,.3f} MiB "
                f"({100 * (e['activations_ratio'] - 1):+.1f}%)"
            )
        cells = [name, e["wall_s"], e["peak_rss_gib"], flops, mfu, static, acts]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def write(report: dict, out: Path) -> None:
    """real_size_cpu.json, real_size_cpu.md, and the table between README.md's markers."""
    name = "real_size_cpu_reduced" if report["reduced"] else "real_size_cpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(report)
    (out / f"{name}.md").write_text(text)
    readme = out / "README.md"
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    if readme.is_file() and begin in readme.read_text():
        head, rest = readme.read_text().split(begin, 1)
        readme.write_text(f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}")
    print(text)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run both sections, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reduced", action="store_true", help="6 LM + 2 vision layers (a check)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    peak = matmul_flops_per_s()
    print(f"bf16 matmul 4096^3: {peak / 1e12:.2f} TFLOP/s on {args.threads} threads", flush=True)
    phases: dict[str, Any] = {}
    medgemma = medgemma_section(args.reduced, peak, phases)
    siglip = siglip_section(
        replica_images(), REDUCED["vision_layers"] if args.reduced else None, peak, phases, estimate
    )
    report = {
        "reduced": args.reduced,
        "machine": {
            "cpu": _cpu_name(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "bf16_matmul_flop_per_s": peak,
        },
        "medgemma": medgemma,
        "medsiglip": siglip,
        "phases": phases,
        "total_wall_s": round(time.perf_counter() - start, 1),
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
    }
    write(report, args.out)
    return 0


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
