"""A tiny, randomly initialised Gemma 3 checkpoint (model + processor) built locally.

It is saved like a hub checkpoint, so tests and demos go through the same `from_pretrained` path as
MedGemma 4B.
The tokenizer is a small Gemma-style BPE (byte fallback, "▁" for spaces) whose vocabulary holds the
Gemma special tokens, ASCII characters and the words of every task's prompts.
"""

from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GemmaTokenizer,
    GenerationConfig,
)

from breakhis_ft.config import PromptConfig
from breakhis_ft.data.records import SUBTYPES, TUMOR_CLASSES
from breakhis_ft.models.prompts import STYLES, WORDINGS, make_prompt
from breakhis_ft.models.tiny_checkpoint import (
    RECIPE_FILE,
    ensure_checkpoint,
    recipe_digest,
)

log = logging.getLogger(__name__)

# Gemma's fixed low ids (pad 0, eos 1, bos 2, unk 3, mask 4), then the chat and image markers.
BASE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
CHAT_SPECIALS = (
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
# Gemma 3's chat template: a system turn folds into the first user turn; the assistant is "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
SIZES: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 512,
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "image_size": 112,
    "patch_size": 14,
    "mm_tokens_per_image": 16,
    "seed": 0,
}
# The language model's output scale. Gemma 3 ties its output layer to the token embeddings (frozen
# under LoRA, as is the final norm), and a fresh model has embeddings of std 0.02 and a final norm
# of scale 1, which bound every logit by |h| |e| = sqrt(hidden) x 0.02 sqrt(hidden) (1.3 at hidden
# 64): no answer token could then pass a probability of ~1/200 among 744 tokens (a token loss
# floor of 5.4) whatever LoRA learns, while a pretrained Gemma's logits reach tens. Rows of std
# hidden^-0.5 (norm ~1) enter the model at unit RMS after Gemma's sqrt(hidden) input scale, as the
# projector's image tokens do, and a final norm of scale 2 lets a logit reach ~2 sqrt(hidden) (16
# at hidden 64). docs/benchmarks.md has the measurements behind these choices.
OUTPUT_SCALE = {"embedding_std": "hidden_size ** -0.5", "final_norm_scale": 2.0}


def _corpus_words() -> list[str]:
    """Every word the prompts of every task and style can contain, plus the chat roles."""
    text = ["user model system assistant image images tissue class classes answer"]
    for names in (tuple(SUBTYPES), TUMOR_CLASSES):
        for style in STYLES:
            for wording in WORDINGS:
                cfg = PromptConfig(style=style, class_names=wording)
                text.append(make_prompt(cfg, names).corpus())
    words = re.findall(r"[A-Za-z]+", "\n".join(text))
    return sorted(set(words))


def _vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary: specials, byte fallback, ASCII characters, then words by prefix merges."""
    vocab: dict[str, int] = {}
    for token in (*BASE_SPECIALS, *CHAT_SPECIALS, *(f"<0x{i:02X}>" for i in range(256))):
        vocab[token] = len(vocab)
    for char in ["\n", "▁", *(c for c in string.printable if not c.isspace())]:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    # Words after a space ("▁adenosis") and at a line start ("adenosis"); each merge grows a prefix
    # by one character, so a known word becomes one token and any other text still tokenizes.
    for form in [f"▁{w}" for w in words] + words:
        for end in range(2, len(form) + 1):
            pair = (form[: end - 1], form[end - 1])
            if form[:end] not in vocab:
                vocab[form[:end]] = len(vocab)
                merges.append(pair)
    return vocab, merges


def build_tiny_tokenizer(words: list[str]) -> GemmaTokenizer:
    """A small Gemma tokenizer with the Gemma 3 special tokens and the given words."""
    return gemma_tokenizer(*_vocab_and_merges(words))


def gemma_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> GemmaTokenizer:
    """A Gemma BPE tokenizer of `vocab` (holding the Gemma 3 specials) with the chat template."""
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS], special_tokens=True
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_gemma3_config(tokenizer: GemmaTokenizer, sizes: dict[str, int] = SIZES) -> Gemma3Config:
    """The tiny Gemma 3 configuration matching a tiny tokenizer."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"],
        "head_dim": sizes["head_dim"],
        "query_pre_attn_scalar": sizes["head_dim"],
        "sliding_window": sizes["sliding_window"],
        "layer_types": ["sliding_attention", "full_attention"][: sizes["num_hidden_layers"]]
        + ["full_attention"] * max(0, sizes["num_hidden_layers"] - 2),
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
    }
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": sizes["vision_hidden_size"],
        "intermediate_size": sizes["vision_intermediate_size"],
        "num_hidden_layers": sizes["vision_layers"],
        "num_attention_heads": sizes["vision_heads"],
        "image_size": sizes["image_size"],
        "patch_size": sizes["patch_size"],
        "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=sizes["mm_tokens_per_image"],
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )


def init_learnable_scale(model: Gemma3ForConditionalGeneration) -> None:
    """Re-initialise what a fresh Gemma 3 leaves at scales nothing can learn from: the image
    projector (all zeros), the tied token embeddings and the final norm (OUTPUT_SCALE)."""
    text = model.config.text_config
    vision_hidden = model.config.vision_config.hidden_size
    language = model.model.language_model
    with torch.no_grad():
        # zeros would hide the image from the language model: image features reach the text
        # embedding space at unit scale instead
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(
            0.0, vision_hidden**-0.5
        )
        language.embed_tokens.weight.normal_(0.0, text.hidden_size**-0.5)
        if text.pad_token_id is not None:  # the padding row stays zero, as transformers has it
            language.embed_tokens.weight[text.pad_token_id].zero_()
        # Gemma's RMS norms scale by (1 + weight)
        language.norm.weight.fill_(OUTPUT_SCALE["final_norm_scale"] - 1.0)


def _recipe() -> dict[str, Any]:
    """Everything that determines the tiny checkpoint; its hash decides when to rebuild."""
    import transformers

    return {
        "sizes": SIZES,
        "words": _corpus_words(),
        "chat_template": CHAT_TEMPLATE,
        "output_scale": OUTPUT_SCALE,
        "transformers": transformers.__version__.split(".")[0],
        "version": 2,
    }


def recipe_hash() -> str:
    """Hash of the tiny checkpoint's recipe."""
    return recipe_digest(_recipe())


def build_tiny_gemma3(path: str | Path) -> Path:
    """Build and save a tiny random Gemma 3 model + processor at `path` (overwrites)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(_corpus_words())
    side = SIZES["image_size"]
    image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=SIZES["mm_tokens_per_image"],
    )
    config = tiny_gemma3_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state stays untouched
        torch.manual_seed(SIZES["seed"])
        model = Gemma3ForConditionalGeneration(config)
        init_learnable_scale(model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / RECIPE_FILE).write_text(json.dumps({"hash": recipe_hash()}) + "\n")
    log.info("built tiny Gemma 3 at %s (%d parameters)", path, model.num_parameters())
    return path


def ensure_tiny_gemma3(path: str | Path, cache_root: str | Path) -> Path:
    """Return `path` holding the tiny Gemma 3 checkpoint, building it when missing or outdated."""
    return ensure_checkpoint(path, recipe_hash(), build_tiny_gemma3, cache_root)
