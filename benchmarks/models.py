"""The benchmarks' model builders: random Gemma 3 checkpoints with the tiny tokenizer, the
classifier on them, and the "proportional" sizes whose vision : language FLOPs match MedGemma 4B.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

from benchmarks.gpu import TFLOP
from breakhis_ft.config import MedGemmaConfig, PeftConfig
from breakhis_ft.models.gemma_loading import build_medgemma_classifier
from breakhis_ft.models.lora import lora_config
from breakhis_ft.models.medgemma import MedGemmaClassifier
from breakhis_ft.models.precision import Precision
from breakhis_ft.models.tiny import (
    CHAT_TEMPLATE,
    SIZES,
    _corpus_words,
    build_tiny_tokenizer,
    init_learnable_scale,
    tiny_gemma3_config,
)

# MedGemma 4B at 896 px (docs/references.md): vision forward / (LM forward + backward), LoRA on LM
TARGET_RATIO = TFLOP["vision"] / (TFLOP["lm_forward"] + TFLOP["lm_backward"])
# The proportional model: a wider, deeper language model than the tiny one (so CPU time follows
# FLOPs rather than per-op overhead) and a SigLIP tower whose depth is solved for TARGET_RATIO.
PROPORTIONAL = {
    **SIZES,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vision_hidden_size": 256,
    "vision_intermediate_size": 1024,
    "vision_heads": 4,
    "image_size": 224,
    "patch_size": 14,
    "mm_tokens_per_image": 64,
}


# MedGemma 4B (docs/references.md): output layer (= embedding) parameters over the language
# model's other parameters; the peer benchmark's model widens its vocabulary to the same share
HEAD_SHARE = 671_252_480 / (3_880_263_168 - 671_252_480)


def peer_vocab(sizes: dict[str, int]) -> int:
    """The vocabulary that gives a model of `sizes` MedGemma's output-layer share (HEAD_SHARE)."""
    h, i, n = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    q, kv = sizes["num_attention_heads"] * sizes["head_dim"], sizes["num_key_value_heads"]
    body = n * (2 * h * q + 2 * h * kv * sizes["head_dim"] + 3 * h * i)  # attention + MLP
    return round(HEAD_SHARE * body / h)


def build_checkpoint(path: Path, sizes: dict[str, int]) -> Path:
    """A random Gemma 3 checkpoint with the tiny tokenizer and the given sizes (as tiny.py);
    `sizes["vocab_size"]`, when given, widens the vocabulary."""
    tokenizer = build_tiny_tokenizer(_corpus_words())
    side = sizes["image_size"]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": side, "width": side}),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=sizes["mm_tokens_per_image"],
    )
    config = tiny_gemma3_config(tokenizer, sizes)
    # a larger output layer than the tokenizer needs (rows never produced by the tokenizer), so
    # that its cost relative to the transformer layers can match MedGemma's
    config.text_config.vocab_size = max(len(tokenizer), sizes.get("vocab_size", 0))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    init_learnable_scale(model)  # as the tiny model: a projector that passes the image, logits
    # that can grow (tiny.OUTPUT_SCALE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_classifier(path: Path, names: tuple[str, ...]) -> MedGemmaClassifier:
    """LoRA r=16 on the language model (vision frozen), fp32 on the CPU."""
    torch.manual_seed(0)
    model_cfg = MedGemmaConfig(name_or_path=str(path))
    peft_cfg = PeftConfig(r=16, alpha=32, dropout=0.0, target_modules="language_model")
    return build_medgemma_classifier(
        model_cfg,
        str(model_cfg.name_or_path),
        "lora",
        lora_config(peft_cfg),
        peft_cfg.target_modules,
        Precision.of("fp32"),
        names,
    )


def flop_ratio(clf: MedGemmaClassifier, item: dict) -> dict[str, float]:
    """Counted FLOPs of one sample: vision forward vs language-model forward + backward."""
    batch = clf.collate([item], train=True)
    with FlopCounterMode(display=False) as vision:
        features = clf.image_features(batch["pixel_values"])
    with FlopCounterMode(display=False) as lm:
        clf.loss({**batch, "image_features": features}).backward()
    clf.zero_grad(set_to_none=True)
    v, lang = vision.get_total_flops(), lm.get_total_flops()
    return {"vision_gflop": v / 1e9, "lm_fwd_bwd_gflop": lang / 1e9, "ratio": v / lang}


def proportional_sizes(work: Path, names: tuple[str, ...], item: dict) -> tuple[dict, dict]:
    """PROPORTIONAL with the vision depth whose counted FLOP ratio is closest to TARGET_RATIO."""
    counts = []
    for layers in (1, 2):
        sizes = {**PROPORTIONAL, "vision_layers": layers}
        clf = make_classifier(build_checkpoint(work / f"probe_{layers}", sizes), names)
        counts.append(flop_ratio(clf, item))
    per_layer = counts[1]["vision_gflop"] - counts[0]["vision_gflop"]
    fixed = counts[0]["vision_gflop"] - per_layer
    lm = counts[0]["lm_fwd_bwd_gflop"]
    layers = max(1, round((TARGET_RATIO * lm - fixed) / per_layer))
    return {**PROPORTIONAL, "vision_layers": layers}, counts[0]
