"""SigLIP's attention-pooling head runs sequence-first (a CPU speed fix) with unchanged results."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from breakhis_ft.models.siglip_loading import (
    SequenceFirstAttention,
    load_vision_encoder,
    pooled_embedding,
)
from breakhis_ft.models.tiny_siglip import SIZES, ensure_tiny_siglip


def _plain_copy(encoder: nn.Module) -> nn.Module:
    """`encoder` with the stock nn.MultiheadAttention back."""
    plain = copy.deepcopy(encoder)
    for module in plain.modules():
        if type(module) is SequenceFirstAttention:
            module.__class__ = nn.MultiheadAttention
    return plain


def test_pooling_head_gives_the_stock_values_gradients_and_weight_names(tmp_path: Path) -> None:
    path = ensure_tiny_siglip(tmp_path / "tiny", tmp_path)
    encoder = load_vision_encoder(str(path), torch.float32)
    heads = [m for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)]
    assert heads and all(type(m) is SequenceFirstAttention for m in heads)
    plain = _plain_copy(encoder)
    assert list(encoder.state_dict()) == list(plain.state_dict())  # saved weights load as before
    size = SIZES["image_size"]
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours, stock = pooled_embedding(encoder, pixels), pooled_embedding(plain, pixels)
    torch.testing.assert_close(ours, stock)
    assert not torch.equal(ours[0], ours[1])  # per-image embeddings, batch order kept
    weights = torch.randn_like(ours)  # full fine-tuning trains the head: the same gradients
    (ours * weights).sum().backward()
    (stock * weights).sum().backward()
    for (name, a), (_, b) in zip(encoder.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    frozen = load_vision_encoder(str(path), torch.bfloat16).requires_grad_(False)
    with torch.no_grad():  # the probe's case: frozen bf16 weights, no autograd
        torch.testing.assert_close(
            pooled_embedding(frozen, pixels),
            pooled_embedding(_plain_copy(frozen), pixels),
            atol=2e-2,
            rtol=2e-2,
        )
