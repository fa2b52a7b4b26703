"""A tiny, randomly initialised SigLIP checkpoint (vision + text + processor) built locally.

It is saved like `google/medsiglip-448` (a full `SiglipModel`, a SigLIP image processor with
pixels scaled to [-1, 1], a tokenizer), so tests and the demo go through the same `from_pretrained`
path as the real model. The tokenizer is a word-level one whose vocabulary holds every task's
class-name words and the words of the default zero-shot templates.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from breakhis_ft.data.records import SUBTYPES, TUMOR_CLASSES
from breakhis_ft.models.tiny_checkpoint import (
    RECIPE_FILE,
    ensure_checkpoint,
    recipe_digest,
    stored_digest,
)

log = logging.getLogger(__name__)

SPECIALS = (
    "<pad>",
    "<unk>",
    "</s>",
)  # SigLIP pads with its end-of-text token; ours has its own pad
# Words of the default templates and of common prompt phrasings; class-name words are added below.
PROMPT_WORDS = (
    "a an the of with in and or photo image images picture slide tissue histology histopathology "
    "histopathological microscopy micrograph stained h&e h & e breast tumor tumour cancer "
    "carcinoma benign malignant section patch . , : -"
)
SIZES: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 8,
    "text_max_length": 16,
    "seed": 0,
}


def _vocabulary() -> list[str]:
    """Specials, then every word of the prompts and of every task's class names, lower case."""
    words = set(PROMPT_WORDS.split())
    for names in (tuple(SUBTYPES), TUMOR_CLASSES):
        for name in names:
            words.update(name.lower().split("_"))
    return [*SPECIALS, *sorted(words)]


def build_tiny_tokenizer(max_length: int = SIZES["text_max_length"]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower case, split on spaces and punctuation, `</s>` appended)."""
    vocab = {word: i for i, word in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    # SigLIP's text tower pools the last position: as the real tokenizer, end every text with </s>.
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=max_length,
        model_input_names=["input_ids"],  # SigLIP's text tower takes no attention mask
    )


def build_tiny_image_processor(size: int = SIZES["image_size"]) -> SiglipImageProcessorPil:
    """The SigLIP image processor at a small size, pixels scaled to [-1, 1] as MedSigLIP's."""
    return SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def tiny_siglip_config(
    tokenizer: PreTrainedTokenizerFast, sizes: dict[str, int] = SIZES
) -> SiglipConfig:
    """The tiny SigLIP configuration (vision with its attention-pooling head, and text)."""
    common = {
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": sizes["num_attention_heads"],
    }
    text_config = {
        **common,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": sizes["text_max_length"],
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_config = {
        **common,
        "image_size": sizes["image_size"],
        "patch_size": sizes["patch_size"],
        "vision_use_head": True,  # as MedSigLIP: the pooling head's output is our embedding
    }
    return SiglipConfig(text_config=text_config, vision_config=vision_config)


def _recipe() -> dict[str, Any]:
    """Everything that determines the tiny checkpoint; its hash decides when to rebuild."""
    import transformers

    return {
        "sizes": SIZES,
        "vocabulary": _vocabulary(),
        "transformers": transformers.__version__.split(".")[0],
        "version": 1,
    }


def recipe_hash() -> str:
    """Hash of the tiny checkpoint's recipe."""
    return recipe_digest(_recipe())


def build_tiny_siglip(path: str | Path) -> Path:
    """Build and save the tiny SigLIP model and processor at `path` (overwriting it)."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = tiny_siglip_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state stays untouched
        torch.manual_seed(SIZES["seed"])
        model = SiglipModel(config)
        with torch.no_grad():
            # SigLIP's published initialisation (big_vision): temperature 10, bias -10.
            model.logit_scale.fill_(torch.log(torch.tensor(10.0)).item())
            model.logit_bias.fill_(-10.0)
    model.save_pretrained(path)
    SiglipProcessor(
        image_processor=build_tiny_image_processor(), tokenizer=tokenizer
    ).save_pretrained(path)
    (path / RECIPE_FILE).write_text(json.dumps({"hash": recipe_hash(), **_recipe()}, indent=1))
    return path


def ensure_tiny_siglip(path: str | Path, cache_root: str | Path) -> Path:
    """Return `path` holding the tiny SigLIP; build it when missing or from an older recipe."""
    if stored_digest(Path(path).expanduser()) != recipe_hash():
        log.info("building the tiny SigLIP checkpoint at %s", path)
    return ensure_checkpoint(path, recipe_hash(), build_tiny_siglip, cache_root)
