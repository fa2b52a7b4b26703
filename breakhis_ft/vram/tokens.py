"""Sequence lengths of the configured prompt: exact with a local processor, else scaled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from breakhis_ft.config import PromptConfig
from breakhis_ft.data.records import class_names

# Tokens of the blog's 8-class numbered prompt (docs/references.md; chat markup included), used
# to scale the prompt length by characters where no tokenizer is available locally (the gated hub
# checkpoint).
REFERENCE_PROMPT_TOKENS = 80
# The Gemma 3 processor expands <start_of_image> to "\n\n" <boi> N x <image> <eoi> "\n\n".
IMAGE_EXTRA_TOKENS = 3


@dataclass
class Tokens:
    """The longest training sequence of a batch, in parts, and the positions the loss projects."""

    prompt: int  # chat text before the image and around it (incl. <start_of_image>)
    image: int  # soft tokens + the markers the processor adds
    answer: int  # the answer, end of turn and what the template appends
    labelled: int  # positions lm_head is applied to per sequence (loss_on)
    exact: bool  # counted with the checkpoint's processor, else scaled from docs/references.md

    @property
    def seq(self) -> int:
        """Tokens per sequence."""
        return self.prompt + self.image + self.answer


def count_tokens(cfg: Any, config: Any, folder: str | None) -> Tokens:
    """Token counts of the configured prompt: with the local processor when there is one."""
    from breakhis_ft.models.prompts import make_prompt

    prompt = make_prompt(cfg.model.prompt, class_names(str(cfg.task.name)))
    mm = int(config.mm_tokens_per_image)
    all_text = str(cfg.model.loss_on) == "all_text"
    if folder is not None:
        return _count_with_processor(prompt, folder, mm, all_text)
    reference = make_prompt(PromptConfig(), class_names("subtype8"))  # the blog's prompt
    text = prompt.user_text() + (prompt.system or "")
    n_prompt = round(REFERENCE_PROMPT_TOKENS * len(text) / len(reference.user_text()))
    longest = max(len(a) for a in prompt.answers)
    answer = 1 if prompt.style == "numbered" else math.ceil(longest / 3)  # digits: one token
    labelled = answer + 1  # + <end_of_turn>
    if all_text:
        labelled += n_prompt - 1
    return Tokens(n_prompt, mm + IMAGE_EXTRA_TOKENS, answer + 2, labelled, exact=False)


def _count_with_processor(prompt: Any, folder: str, mm: int, all_text: bool) -> Tokens:
    """Exact counts: the chat template and the processor of the local checkpoint."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    image = Image.new("RGB", (32, 32))
    prompt_text = processor.apply_chat_template(
        prompt.messages(), add_generation_prompt=True, tokenize=False
    )
    n_prompt = len(processor(text=[prompt_text], images=[[image]])["input_ids"][0])
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    special = {tok.image_token_id, tok.boi_token_id, tok.eoi_token_id}
    best: Tokens | None = None
    for answer in prompt.answers:
        text = processor.apply_chat_template(prompt.messages(answer), tokenize=False)
        ids = processor(text=[text], images=[[image]])["input_ids"][0]
        tail = tok(text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        n_image = mm + IMAGE_EXTRA_TOKENS  # the split is for display; the sum is exact
        labelled = tail.index(eot) + 1 if eot in tail else len(tail)
        if all_text:
            labelled = sum(1 for i in ids if i not in special) - 1
        tokens = Tokens(n_prompt - n_image, n_image, len(ids) - n_prompt, labelled, exact=True)
        if best is None or tokens.seq > best.seq:
            best = tokens
    if best is None:
        raise ValueError("the prompt has no answers")
    return best
