"""The per-layer activation model of the VRAM estimator: saved bytes per token of one layer.

Per-layer activation model (bytes per token; h hidden, q = heads x head_dim, kv = kv_heads x
head_dim, I intermediate, r LoRA rank, a = 2 under bf16/fp16 autocast or 4 in fp32, nh heads). Read
from transformers' Gemma 3 / SigLIP code and peft's LoRA layer, and checked tensor by tensor with
`torch.autograd.graph.saved_tensors_hooks` (tests/test_vram.py measures it on the CPU and matches):
- Gemma 3 decoder layer: four RMSNorms that save an fp32 copy of their input (4 x 4h) and q/k norms
  (4q + 4kv); SDPA saves q, out, k and v (k, v repeated to all heads because Gemma 3's mask is never
  None) and an fp32 logsumexp: a(2q + 2q') + 4nh, q' = q with GQA repeat; the MLP saves gate, gelu
  and up outputs (3aI). Each LoRA-adapted linear with input width d adds a 16-bit copy of its input
  (peft casts to fp32, autocast back: a x d), the rank-r output (a x r) and, with dropout, its mask
  (1 B per element on CUDA, an fp32 noise tensor on the CPU). For MedGemma 4B with LoRA r=16 on
  q/k/v/o/gate/up/down and dropout 0.05 at bf16 this is k = 80.7: 206,656 bytes per token per
  layer (r=8: 206,544), h = 2560 (norms 16h, q/k norms 4.8h, SDPA 6.4h, MLP 24h, LoRA input
  copies 19.6h, dropout masks 9.8h; stated for any config in
  `as_dict()["lm_layer_k_times_hidden"]`).
- SigLIP encoder layer (the vision tower): two LayerNorms (fp32 input under CUDA autocast), SDPA q,
  k, v, out + logsumexp, fc1's output; LoRA terms as above. A frozen tower runs under
  `torch.no_grad()` (medgemma.py): it saves nothing, only one layer's working set exists at a time.
- Attention (`model.attn_implementation`, applied by transformers to the LM and the tower alike;
  the SigLIP classifier always loads sdpa): sdpa (flash / memory-efficient kernels) saves q, k, v,
  its output and an fp32 logsumexp, heads floats per token: no seq x seq tensor. Eager attention
  materialises the scores, heads x seq x seq per sequence (LM 8 x seq x seq, SigLIP 16 x 4096 x
  4096 at 896 px), and saves softmax's fp32 output (4 B per
  score) and the 16-bit probabilities the value matmul reads (2 B; in fp32 `.to()` returns the same
  tensor), plus q, k and v, but not its output (o_proj's input is a fresh contiguous copy): 6 B per
  score under bf16. For SigLIP at 896 px that is 16 x 4096 x 4096 x 6 B = 1.5 GiB (1.6 GB) per image
  per layer. Transient, beyond what is saved (`eager_scores_transient`): under no_grad the 16-bit
  scores, softmax's fp32 cast of them and its fp32 output (10 B per score; 8 in fp32); in the
  backward the fp32 gradients of softmax's output and input (8 B per score).
- Gradient checkpointing (estimate.py): each layer keeps its input, tokens x hidden x a bytes, and
  the backward recomputes one layer at a time, whose saved tensors (above) exist once at the peak:
  the LM's layers, then the tower's (when it trains), so the larger of the two layers is counted.
  Eager attention under checkpointing keeps its scores for the recomputed layer only. A frozen
  tower's eager scores (no_grad) are transient, one layer's at a time, and its forward runs before
  the LM saves anything: it is the peak only where it exceeds the activations + working set.
- Loss: medgemma.py applies lm_head to the labelled positions only (answer + end of turn), so logits
  are rows x vocab with rows = batch x labelled tokens, not batch x seq x vocab; the peak of the
  fp32 cross-entropy is 12 B per element (fp32 logits, saved log-softmax, its gradient). The figure
  that the usual full-sequence loss would need is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes 4-bit blocks, double-quantisation blocks


@dataclass(frozen=True)
class Flavor:
    """How a device and precision store saved activations (bytes per element)."""

    act: int  # a saved activation in the compute dtype: 2 under bf16/fp16 autocast, 4 in fp32
    mixed: bool  # autocast to 16 bit: LoRA inputs are cast fp32 -> 16 bit, a fresh copy each
    mask: int  # a dropout mask element: 1 on CUDA (bool); 4 on the CPU (fp32 noise)
    ln: int  # a LayerNorm's saved input element: 4 on CUDA (autocast runs it in fp32); `act` on CPU

    @staticmethod
    def of(precision: str, device: str = "cuda") -> Flavor:
        """The flavour of `precision.name` (bf16, fp16, fp32) on `device` (cuda or cpu)."""
        act = 4 if precision == "fp32" else 2
        cuda = device == "cuda"
        return Flavor(act=act, mixed=act == 2, mask=1 if cuda else 4, ln=4 if cuda else act)


@dataclass(frozen=True)
class LoraSite:
    """One adapted linear layer of a transformer layer: its input group and widths."""

    group: str  # modules reading the same input share it (q/k/v: attn_in; gate/up: mlp_in)
    d_in: int
    d_out: int
    r: int


def lora_bytes_per_token(
    sites: list[LoraSite], flavor: Flavor, dropout: float, saved: tuple[str, ...] = ()
) -> float:
    """Saved bytes per token of the LoRA branches of one layer (see the module docstring).

    `saved`: input groups the layer saves anyway (SDPA's output is o_proj's input, same storage).
    """
    total, groups = 0.0, set(saved)
    for site in sites:
        total += flavor.act * site.r  # lora_A's output, saved for lora_B's weight gradient
        if dropout > 0:
            total += flavor.mask * site.d_in + (0 if flavor.mixed else flavor.act * site.d_in)
        if flavor.mixed:
            total += flavor.act * site.d_in  # autocast's 16-bit copy of the (fp32-cast) input
        elif dropout == 0 and site.group not in groups:
            total += flavor.act * site.d_in  # fp32: lora_A saves the input tensor itself, shared
        groups.add(site.group)
    return total


def lora_layer_constant(sites: list[LoraSite], flavor: Flavor) -> int:
    """Per-layer (not per-token) saved bytes: autocast's 16-bit copies of the fp32 LoRA weights."""
    return sum(2 * s.r * (s.d_in + s.d_out) for s in sites) if flavor.mixed else 0


def gemma_layer_bytes_per_token(
    text: Any,
    flavor: Flavor,
    sites: list[LoraSite],
    dropout: float,
    seq: int,
    attn: str = "sdpa",
    full: bool = False,
) -> float:
    """Saved activation bytes per token of one Gemma 3 decoder layer under training."""
    h, inter, a = text.hidden_size, text.intermediate_size, flavor.act
    nh, nkv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    q, kv = nh * hd, nkv * hd
    kv_eff = q if nkv < nh else kv  # repeat_kv: Gemma 3 always passes a mask, so no enable_gqa
    norm = 8 if full else 4  # a trainable norm weight also saves the normalised fp32 output
    total = 4 * (norm * h + 4) + norm * (q + kv) + 4 * (nh + nkv)
    if attn == "eager":  # q, repeated k and v; the seq x seq scores (module docstring)
        total += a * q + 2 * a * kv_eff + eager_scores_bytes_per_token(nh, seq, flavor)
    else:
        total += 2 * a * q + 2 * a * kv_eff + 4 * nh  # q, out, k, v and the logsumexp
    total += 3 * a * inter  # gate output (gelu input), gelu output, up output
    if full:  # trainable linears save their inputs: q/k/v share one, gate/up share one
        total += a * (2 * h + q + inter)
    saved = ("attn_out",) if attn == "sdpa" else ()
    return total + lora_bytes_per_token(sites, flavor, dropout, saved)


def siglip_layer_bytes_per_token(
    vision: Any,
    flavor: Flavor,
    sites: list[LoraSite],
    dropout: float,
    full: bool = False,
    attn: str = "sdpa",
) -> float:
    """Saved activation bytes per token (patch) of one SigLIP encoder layer under training."""
    h, inter, a, nh = (
        vision.hidden_size,
        vision.intermediate_size,
        flavor.act,
        vision.num_attention_heads,
    )
    eager = attn == "eager"
    total = 2 * (flavor.ln * h + 2 * flavor.ln)  # two LayerNorms: input + mean and rstd
    if eager:  # q, k, v and the patches x patches scores (module docstring)
        total += 3 * a * h + eager_scores_bytes_per_token(nh, vision_tokens(vision), flavor)
    else:
        total += 4 * a * h + 4 * nh  # SDPA: q, k, v, out, logsumexp
    total += a * inter  # fc1's output, the gelu's input
    if full:  # each trainable linear saves its (autocast) input; out_proj's is SDPA's out
        total += 4 * a * h + a * inter + (a * h if eager else 0)
    saved = () if eager else ("attn_out",)
    return total + lora_bytes_per_token(sites, flavor, dropout, saved)


def vision_tokens(vision: Any) -> int:
    """Patches per image of a SigLIP config: (image_size / patch_size)^2 (896 px: 4096)."""
    return int((vision.image_size // vision.patch_size) ** 2)


def eager_scores_bytes_per_token(heads: int, keys: int, flavor: Flavor) -> int:
    """Saved bytes per query token of eager attention's scores over `keys` tokens.

    softmax(dtype=float32)'s output (4 B per score), saved for its backward, and the 16-bit
    probabilities the value matmul saves (a bytes; none in fp32, where `.to()` is a no-op).
    """
    return heads * keys * (4 + (flavor.act if flavor.act != 4 else 0))


def eager_scores_transient(heads: int, tokens: int, flavor: Flavor, no_grad: bool) -> int:
    """Bytes of one eager attention's score tensors alive beyond what it saves, per sequence.

    no_grad (a frozen tower): the 16-bit scores, softmax's fp32 cast of them (none in fp32) and its
    fp32 output, all at once inside softmax. Training: at softmax's backward, the fp32 gradients
    of its output and of its input beside the saved output (8 B per score).
    """
    if no_grad:
        per = flavor.act + 4 + (4 if flavor.act != 4 else 0)
    else:
        per = 8
    return heads * tokens * tokens * per


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 weight with double quantisation (bitsandbytes' 4-bit QLoRA layout)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 16 * 4
