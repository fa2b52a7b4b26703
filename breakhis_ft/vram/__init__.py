"""Estimate the GPU memory of a training run from its composed config, before renting a GPU.

`estimate_vram(cfg)` builds the configured model on the meta device (exact parameter counts, no
memory, no download), applies the adapter exactly as training does, and adds up:

- weights: the frozen base in the run's dtype (bf16 2 B, fp32 4 B); for QLoRA every `nn.Linear` that
  bitsandbytes converts is 4-bit NF4 (0.5 B a weight) plus its quantisation constants (double
  quantisation: one uint8 absmax per 64-weight block, one fp32 absmax per 256 blocks, an fp32 offset
  and the 16-entry NF4 code), while the modules transformers keeps out of quantisation (tied
  embeddings, lm_head, the last module, norms, convolutions, the projector's bare weight) stay
  16-bit;
- trainable weights: LoRA adapters in fp32 (peft's `autocast_adapter_dtype`), `modules_to_save`
  copies and full fine-tunes in the weights' dtype, a SigLIP head in fp32;
- gradients: one per trainable parameter, its dtype; optimizer states of the run's
  trainer/optimizer (or the `optimizer` asked): torch AdamW (fused or not) keeps exp_avg +
  exp_avg_sq in the parameter's dtype and a 4-byte `step` per tensor; bitsandbytes' 8-bit AdamW
  (`adamw_8bit`, `paged_adamw_8bit`: the blog notebook's) keeps 1 byte per state + an fp32 absmax
  per 256 (tensors under 4,096 values: 32-bit states);
- activations: the tensors autograd saves, per layer and per token, from the layer's code
  (activations.py), times layers x batch x sequence; with gradient checkpointing only each layer's
  input is kept, plus one layer recomputed during backward; plus the loss's logits and the backward
  working set.

The per-layer activation model is explained in `breakhis_ft/vram/activations.py`.

Comparing with a GPU (none here; target: the estimate within 15% of the measurement): run
`breakhis-ft-estimate-vram <overrides> --json est.json`, then train the same overrides for a few
steps (`trainer.max_steps=5`), with `torch.cuda.reset_peak_memory_stats()` before the first step and
`torch.cuda.max_memory_allocated()` after the last (allocated, not reserved: the estimate has no
CUDA context, ~0.3-0.5 GB, and no allocator cache); compare with `total_bytes` and record both
beside the benchmarks. The first step's peak lacks the optimizer states, so measure after step 2.
"""

from breakhis_ft.vram.activations import (
    Flavor,
    LoraSite,
    gemma_layer_bytes_per_token,
    lora_bytes_per_token,
    lora_layer_constant,
    nf4_bytes,
    siglip_layer_bytes_per_token,
)
from breakhis_ft.vram.estimate import GIB, VramEstimate, estimate_vram, optimizer_bytes
from breakhis_ft.vram.meta import (
    ParamBytes,
    build_meta_gemma,
    build_meta_siglip,
    lora_sites,
    param_bytes,
)
from breakhis_ft.vram.tokens import Tokens, count_tokens

__all__ = [
    "GIB",
    "Flavor",
    "LoraSite",
    "ParamBytes",
    "Tokens",
    "VramEstimate",
    "build_meta_gemma",
    "build_meta_siglip",
    "count_tokens",
    "estimate_vram",
    "gemma_layer_bytes_per_token",
    "lora_bytes_per_token",
    "lora_layer_constant",
    "lora_sites",
    "nf4_bytes",
    "optimizer_bytes",
    "param_bytes",
    "siglip_layer_bytes_per_token",
]
