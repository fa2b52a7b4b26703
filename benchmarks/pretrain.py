"""A stand-in for MedGemma's pretraining, for the peer benchmark's random proportional model.

MedGemma starts with a SigLIP tower whose features describe tissue and a language model that reads
the prompt and answers in its format (the blog's base model: 32.6% accuracy before tuning). A
random model has neither: a frozen random tower handicaps the recipes that freeze it, and a random
language model cannot produce a parseable answer for many epochs, which zeroes the generation-based
accuracy of the notebooks. So, on a replica the benchmark never uses (seed 1):
- the vision tower is trained with a linear probe on its mean-pooled patches (the probe dropped);
- the language model (and the tied embeddings) learns the text of the three recipes' prompts with
  answers in their formats, over that replica's image features, with the answers drawn at random:
  it learns to answer, not which answer (chance accuracy before fine-tuning).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import Gemma3ForConditionalGeneration, Gemma3Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from benchmarks import notebook as nb
from breakhis_ft.config import PromptConfig
from breakhis_ft.data.records import class_names
from breakhis_ft.models.prompts import make_prompt


def pretrain_vision_tower(
    model: Gemma3ForConditionalGeneration, pixels: torch.Tensor, labels: list[int], epochs: int
) -> list[float]:
    """Train the tower with a linear probe on its mean-pooled output; the probe's accuracy per
    epoch."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, max(labels) + 1)
    targets = torch.tensor(labels)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    accuracy = []
    tower.train()
    for _ in range(epochs):
        correct = 0
        for rows in torch.randperm(len(targets), generator=generator).split(16):
            logits = head(tower(pixel_values=pixels[rows]).last_hidden_state.mean(dim=1))
            torch.nn.functional.cross_entropy(logits, targets[rows]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            correct += int((logits.argmax(dim=1) == targets[rows]).sum())
        accuracy.append(correct / len(targets))
    return accuracy


def prompt_texts(processor: Gemma3Processor) -> list[list[str]]:
    """Per recipe, the chat text of each class's answer (blog, breakhis-ft, Google)."""
    ours = make_prompt(PromptConfig(), class_names("subtype8"))
    recipes = [
        (nb.BLOG_PROMPT, [str(c) for c in range(8)]),
        (ours.user_text(), list(ours.answers)),
        (nb.GOOGLE_PROMPT, list(nb.GOOGLE_OPTIONS)),
    ]
    return [
        [
            processor.apply_chat_template(nb.format_messages(prompt, answer), tokenize=False)
            for answer in answers
        ]
        for prompt, answers in recipes
    ]


def _rows(processor: Gemma3Processor, texts: list[str]) -> dict[str, torch.Tensor]:
    blank = [[Image.new("RGB", (32, 32))] for _ in texts]
    return processor(
        text=texts, images=blank, return_tensors="pt", padding=True, add_special_tokens=False
    )


def pretrain_language(
    model: Gemma3ForConditionalGeneration,
    processor: Gemma3Processor,
    features: torch.Tensor,
    steps: int,
) -> list[float]:
    """Train the language model on the prompts with random answers over real image features
    (loss on all text but image tokens and padding); the mean loss of each tenth of the steps."""
    lm = model.model.language_model
    params = [*lm.parameters()]  # the output layer is tied to the embeddings
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tok = processor.tokenizer
    masked = {tok.pad_token_id, tok.boi_token_id, tok.image_token_id}
    batches = [_rows(processor, texts) for texts in prompt_texts(processor)]
    generator = torch.Generator().manual_seed(0)
    losses: list[float] = []
    lm.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        pick = torch.randint(0, len(batch["input_ids"]), (16,), generator=generator)
        ids = batch["input_ids"][pick]
        image = features[torch.randint(0, len(features), (16,), generator=generator)]
        hidden = model.model(
            input_ids=ids,
            attention_mask=batch["attention_mask"][pick],
            token_type_ids=batch["token_type_ids"][pick],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=image)},
            use_cache=False,
        ).last_hidden_state
        labels = ids.clone()
        for token in masked:
            labels[labels == token] = -100
        logits = model.lm_head(hidden[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tenth = max(1, steps // 10)
    return [sum(losses[i : i + tenth]) / len(losses[i : i + tenth]) for i in range(0, steps, tenth)]


def pretrain(path: Path, images: list, labels: list[int], epochs: int, steps: int) -> dict:
    """Both stages on the checkpoint at `path`, saved back; what they reached."""
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = Gemma3Processor.from_pretrained(path)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    out = {"vision_probe_accuracy": pretrain_vision_tower(model, pixels, labels, epochs)}
    with torch.no_grad():
        model.eval()
        features = torch.cat(
            [model.model.get_image_features(p).pooler_output for p in pixels.split(32)]
        )
    out["language_loss"] = pretrain_language(model, processor, features, steps)
    model.save_pretrained(path)
    return out
