"""The output scale of every Gemma 3 stand-in: can LoRA reach a low answer loss at all?

  python -m benchmarks output-scale        # writes output_scale.json into --out

Gemma 3 ties its output layer to the token embeddings, and LoRA freezes both them and the final
norm, so the largest logit any adapter can produce is bounded by |h| x |e|: the final RMS norm's
output (norm sqrt(hidden) x its scale) times the longest embedding row. For each stand-in the
benchmarks use (the tiny model of the demo and the tests, the proportional model of the speed
sections, the peer benchmark's model with MedGemma's output-layer share), built with transformers'
initialisation ("fresh": rows of std 0.02, norm scale 1) and with `init_learnable_scale`
("learnable", models/tiny.py), this measures:
- the embedding rows' std and norms, the final norm's scale and that logit bound;
- the token-loss floor: the lowest cross-entropy of each answer token (the project's prompt's
  class answers, tokenised) over a *free* final hidden state of the norm the final RMS norm gives
  (Adam on that sphere), averaged over the tokens: no LoRA, however trained, goes below it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch
from transformers import Gemma3ForConditionalGeneration

from benchmarks.models import PROPORTIONAL, peer_vocab
from breakhis_ft.config import PromptConfig
from breakhis_ft.data.records import class_names
from breakhis_ft.models.prompts import make_prompt
from breakhis_ft.models.tiny import (
    SIZES,
    _corpus_words,
    build_tiny_tokenizer,
    init_learnable_scale,
    tiny_gemma3_config,
)

STAND_INS: dict[str, dict[str, int]] = {  # name -> sizes (the vision tower plays no part here)
    "tiny (demo, tests)": dict(SIZES),
    "proportional (bench speed)": {**PROPORTIONAL, "vision_layers": 1},
    "peer (bench --only peer)": {
        **PROPORTIONAL,
        "vision_layers": 1,
        "vocab_size": peer_vocab(PROPORTIONAL),
    },
}


def build_model(sizes: dict[str, int], learnable: bool) -> Gemma3ForConditionalGeneration:
    """A stand-in at transformers' initialisation, or at the tiny models' learnable scale."""
    config = tiny_gemma3_config(build_tiny_tokenizer(_corpus_words()), sizes)
    config.text_config.vocab_size = max(config.text_config.vocab_size, sizes.get("vocab_size", 0))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    if learnable:
        init_learnable_scale(model)
    return model


def answer_tokens() -> list[int]:
    """The token ids of the project's prompt's class answers (8 classes)."""
    tokenizer = build_tiny_tokenizer(_corpus_words())
    prompt = make_prompt(PromptConfig(), class_names("subtype8"))
    ids = {
        t
        for answer in prompt.answers
        for t in tokenizer(answer, add_special_tokens=False)["input_ids"]
    }
    return sorted(ids)


def token_loss_floor(embeddings: torch.Tensor, radius: float, tokens: list[int]) -> list[float]:
    """Per token: the lowest cross-entropy of a free hidden state of norm `radius` (Adam on the
    sphere, from the token's own embedding direction, the best start)."""
    targets = torch.tensor(tokens)
    direction = embeddings[targets].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([direction], lr=0.05)
    for _ in range(400):
        hidden = radius * direction / direction.norm(dim=1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(hidden @ embeddings.T, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hidden = radius * direction / direction.norm(dim=1, keepdim=True)
        losses = torch.nn.functional.cross_entropy(hidden @ embeddings.T, targets, reduction="none")
    return losses.tolist()


def measure(model: Gemma3ForConditionalGeneration, tokens: list[int]) -> dict[str, Any]:
    """The output scale of one model (see the module's docstring)."""
    language = model.model.language_model
    embeddings = language.embed_tokens.weight.detach()
    rows = embeddings.norm(dim=1)
    scale = (1.0 + language.norm.weight.detach()).abs().max().item()  # Gemma: x (1 + weight)
    radius = math.sqrt(embeddings.shape[1]) * scale
    floor = token_loss_floor(embeddings, radius, tokens)
    return {
        "vocab": embeddings.shape[0],
        "hidden": embeddings.shape[1],
        "embedding_std": embeddings.std().item(),
        "embedding_row_norm_mean": rows.mean().item(),
        "embedding_row_norm_max": rows.max().item(),
        "final_norm_scale": scale,
        "logit_bound": radius * rows.max().item(),
        "token_loss_floor_mean": sum(floor) / len(floor),
        "token_loss_floor_max": max(floor),
        "ln_vocab": math.log(embeddings.shape[0]),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every stand-in at both initialisations; write output_scale.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokens = answer_tokens()
    results: dict[str, Any] = {
        "answer_tokens": len(tokens),
        "machine": f"{platform.machine()}, CPU",
        "stand_ins": {},
    }
    for name, sizes in STAND_INS.items():
        results["stand_ins"][name] = {
            init: measure(build_model(sizes, init == "learnable"), tokens)
            for init in ("fresh", "learnable")
        }
        fresh, ours = (results["stand_ins"][name][k] for k in ("fresh", "learnable"))
        print(
            f"{name}: logit bound {fresh['logit_bound']:.2f} -> {ours['logit_bound']:.2f}, "
            f"token-loss floor {fresh['token_loss_floor_mean']:.2f} -> "
            f"{ours['token_loss_floor_mean']:.3f} (ln vocab {ours['ln_vocab']:.2f})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "output_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
