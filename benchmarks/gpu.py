"""The GPU section of `python -m benchmarks bench`: MedGemma 4B's architecture, random bf16, LoRA.

Measures training images/s, model FLOP utilisation, peak memory with and without the vision
feature cache and gradient checkpointing, beside the VRAM estimator's prediction. No tokenizer or
weights are downloaded: batches are built by hand with MedGemma's token layout (80 prompt tokens
around <start_of_image> 256 x <image> <end_of_image>, 3 answer tokens), and the step is the
classifier's own `loss` (breakhis_ft.models.medgemma), so the measured code is the training code.
`on_cpu=True` runs the same code on the tiny Gemma 3 config in fp32 (to test this path without a
GPU; its numbers mean nothing).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch import nn
from transformers import Gemma3ForConditionalGeneration

from breakhis_ft.config import PeftConfig, register_configs
from breakhis_ft.models.gemma_loading import apply_peft, medgemma_4b_config
from breakhis_ft.models.lora import lora_config
from breakhis_ft.models.medgemma import MedGemmaClassifier

CONF = Path(__file__).resolve().parents[1] / "conf"
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s (NVIDIA H200 SXM datasheet, without sparsity)
# MedGemma 4B per training sample at 896 px, 339 tokens, LoRA r=16 on the language model
# (docs/references.md)
TFLOP = {"vision": 5.46, "lm_forward": 2.67, "lm_backward": 2.73, "recompute": 2.24}
PROMPT_TOKENS, ANSWER_TOKENS = 80, 3


def sample_flops(cached: bool, checkpointing: bool) -> float:
    """Model FLOPs of one training sample (the FLOP model of docs/references.md)."""
    total = TFLOP["lm_forward"] + TFLOP["lm_backward"]
    total += 0.0 if cached else TFLOP["vision"]
    total += TFLOP["recompute"] if checkpointing else 0.0
    return total * 1e12


def bare_classifier(model: nn.Module) -> MedGemmaClassifier:
    """The classifier's forward/loss code around a model, without a processor (none offline)."""
    clf = MedGemmaClassifier.__new__(MedGemmaClassifier)
    nn.Module.__init__(clf)
    clf.model = model
    clf.loss_on = "answer"
    return clf


def hand_batch(config: Any, batch: int, image_size: int, device: str) -> dict[str, torch.Tensor]:
    """A right-aligned training batch with MedGemma's layout: prompt, image block, answer."""
    mm = int(config.mm_tokens_per_image)
    vocab = int(config.text_config.vocab_size)
    special = {config.image_token_index, config.boi_token_index, config.eoi_token_index}
    gen = torch.Generator().manual_seed(0)
    text = PROMPT_TOKENS - 2  # <boi> and <eoi> count as prompt tokens
    shape = (batch, text + mm + 2 + ANSWER_TOKENS)
    ids = torch.randint(10, min(vocab, 250_000) - 1, shape, generator=gen)
    ids[torch.isin(ids, torch.tensor(sorted(special)))] = 10  # no stray image markers
    start = 6  # <bos> + "<start_of_turn>user\n" ... then the image block
    ids[:, 0] = 2
    ids[:, start] = config.boi_token_index
    ids[:, start + 1 : start + 1 + mm] = config.image_token_index
    ids[:, start + 1 + mm] = config.eoi_token_index
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": (ids == config.image_token_index).long().to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=gen).to(device),
    }


def vram_estimate(on_cpu: bool, batch: int, checkpointing: bool, tiny_path: str | None) -> int:
    """The VRAM estimator's total for the same run (composed like `breakhis-ft` overrides)."""
    from breakhis_ft.vram import estimate_vram

    overrides = [
        "peft.r=16",
        "peft.alpha=32",
        "peft.dropout=0.05",
        "task=subtype8",
        f"trainer.batch_size={batch}",
        f"trainer.gradient_checkpointing={str(checkpointing).lower()}",
    ]
    if on_cpu:
        overrides += ["model=tiny_gemma3", f"model.name_or_path={tiny_path}", "precision=fp32"]
    else:
        overrides += ["model=medgemma_4b_it", "precision=bf16"]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return int(estimate_vram(cfg, device="cpu" if on_cpu else "cuda").total_bytes)


def run_gpu_section(
    on_cpu: bool = False,
    batch: int = 8,
    steps: int = 5,
    warmup: int = 2,
    tiny_path: str | None = None,
) -> dict[str, Any]:
    """images/s, MFU, peak memory and the VRAM estimate for cache x checkpointing."""
    if on_cpu:
        from breakhis_ft.models.tiny import _corpus_words, build_tiny_tokenizer, tiny_gemma3_config

        config = tiny_gemma3_config(build_tiny_tokenizer(_corpus_words()))
        device, dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("--gpu needs CUDA; use --gpu-section-on-cpu to test the code path")
        config = medgemma_4b_config()
        device, dtype = "cuda", torch.bfloat16
    image_size = int(config.vision_config.image_size)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    with torch.no_grad():  # a zero projector would hide the image; any scale will do for timing
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
    model = apply_peft(model, lora_config(PeftConfig(r=16, alpha=32, dropout=0.05)))
    clf = bare_classifier(model).train()
    build_s = time.perf_counter() - t0
    data = hand_batch(config, batch, image_size, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=not on_cpu)
    with torch.no_grad(), autocast:
        features = clf.image_features(data["pixel_values"])  # what the cache would hold
    cached_batch = {k: v for k, v in data.items() if k != "pixel_values"}
    cached_batch["image_features"] = features
    params = [p for p in clf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            clf.enable_gradient_checkpointing()
        for cached in (False, True):
            step_batch = cached_batch if cached else data
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for i in range(warmup + steps):
                if i == warmup:
                    sync()
                    start = time.perf_counter()
                with autocast:
                    loss = clf.loss(step_batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            seconds = time.perf_counter() - start
            ips = batch * steps / seconds
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            estimate = None if cached else vram_estimate(on_cpu, batch, checkpointing, tiny_path)
            rows.append(
                {
                    "cached_features": cached,
                    "gradient_checkpointing": checkpointing,
                    "images_per_s": ips,
                    "step_s": seconds / steps,
                    "model_tflop_per_sample": sample_flops(cached, checkpointing) / 1e12,
                    "mfu": ips * sample_flops(cached, checkpointing) / H200_BF16_PEAK,
                    "peak_allocated_gib": None if peak is None else peak / 2**30,
                    "vram_estimate_gib": None if estimate is None else estimate / 2**30,
                    "loss": float(loss.detach()),
                }
            )
    by = {(r["cached_features"], r["gradient_checkpointing"]): r["images_per_s"] for r in rows}
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (code-path test)",
        "architecture": "tiny Gemma 3 (code-path test)" if on_cpu else "MedGemma 4B (random)",
        "dtype": str(dtype),
        "batch_size": batch,
        "sequence_tokens": int(data["input_ids"].shape[1]),
        "image_size": image_size,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "build_s": build_s,
        "peak_flops": H200_BF16_PEAK,
        "rows": rows,
        "speedup_cached": {
            "no_gc": by[(True, False)] / by[(False, False)],
            "gc": by[(True, True)] / by[(False, True)],
        },
    }
