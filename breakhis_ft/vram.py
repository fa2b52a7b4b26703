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
- gradients: one per trainable parameter, its dtype; optimizer: torch AdamW (what the trainer uses,
  fused or not) keeps exp_avg + exp_avg_sq in the parameter's dtype and a 4-byte `step` per tensor;
  `optimizer="adamw_8bit"` (bitsandbytes) would keep 1 byte per state + an fp32 absmax per 256;
- activations: the tensors autograd saves, per layer and per token, from the layer's code (below),
  times layers x batch x sequence; with gradient checkpointing only each layer's input is kept,
  plus one layer recomputed during backward; plus the loss's logits and the backward working set.

Per-layer activation model (bytes per token; h hidden, q = heads x head_dim, kv = kv_heads x
head_dim, I intermediate, r LoRA rank, a = 2 under bf16/fp16 autocast or 4 in fp32, nh heads). Read
from transformers' Gemma 3 / SigLIP code and peft's LoRA layer, and checked tensor by tensor with
`torch.autograd.graph.saved_tensors_hooks` (tests/test_vram.py measures it on the CPU and matches):
- Gemma 3 decoder layer: four RMSNorms that save an fp32 copy of their input (4 x 4h) and q/k norms
  (4q + 4kv); SDPA saves q, out, k and v (k, v repeated to all heads because Gemma 3's mask is never
  None) and an fp32 logsumexp: a(2q + 2q') + 4nh, q' = q with GQA repeat; the MLP saves gate, gelu
  and up outputs (3aI). Each LoRA-adapted linear with input width d adds a 16-bit copy of its input
  (peft casts to fp32, autocast back: a x d), the rank-r output (a x r) and, with dropout, its mask
  (1 B per element on CUDA, an fp32 noise tensor on the CPU). For MedGemma 4B with LoRA on
  q/k/v/o/gate/up/down and dropout 0.05 at bf16 this is k = 80.7: 206,656 bytes per token per
  layer, h = 2560 (norms 16h, q/k norms 4.8h, SDPA 6.4h, MLP 24h, LoRA input copies 19.6h, dropout
  masks 9.8h; stated for any config in `as_dict()["lm_layer_k_times_hidden"]`).
- SigLIP encoder layer (the vision tower): two LayerNorms (fp32 input under CUDA autocast), SDPA q,
  k, v, out + logsumexp, fc1's output; LoRA terms as above. A frozen tower runs under
  `torch.no_grad()` (medgemma.py): it saves nothing, only one layer's working set exists at a time.
- Loss: medgemma.py applies lm_head to the labelled positions only (answer + end of turn), so logits
  are rows x vocab with rows = batch x labelled tokens, not batch x seq x vocab; the peak of the
  fp32 cross-entropy is 12 B per element (fp32 logits, saved log-softmax, its gradient). The figure
  that the usual full-sequence loss would need is reported beside it.

Comparing with a GPU (none here; target: the estimate within 15% of the measurement): run
`scripts/estimate_vram.py <overrides> --json est.json`, then train the same overrides for a few
steps (`trainer.max_steps=5`), with `torch.cuda.reset_peak_memory_stats()` before the first step and
`torch.cuda.max_memory_allocated()` after the last (allocated, not reserved: the estimate has no
CUDA context, ~0.3-0.5 GB, and no allocator cache); compare with `total_bytes` and record both
beside the benchmarks. The first step's peak lacks the optimizer states, so measure after step 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from breakhis_ft.config import ConfigError, PromptConfig
from breakhis_ft.data.records import class_names

GIB = 1024**3
MEDGEMMA_HUB_IDS = ("google/medgemma-4b-it", "google/medgemma-4b-pt")
# google/medsiglip-448 (gated): the SigLIP So400m vision tower at 448 px with its pooling head.
MEDSIGLIP_448_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 448,
    "patch_size": 14,
    "vision_use_head": True,
}
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes 4-bit blocks, double-quantisation blocks
# Tokens of the 8-class numbered prompt of REFERENCE.md (chat markup included), used to scale the
# prompt length by characters where no tokenizer is available locally (the gated hub checkpoint).
REFERENCE_PROMPT_TOKENS = 80
# The Gemma 3 processor expands <start_of_image> to "\n\n" <boi> N x <image> <eoi> "\n\n".
IMAGE_EXTRA_TOKENS = 3


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
    if attn == "eager":
        total += a * q + 2 * a * kv_eff + (4 + a) * nh * seq  # fp32 softmax + 16-bit probabilities
    else:
        total += 2 * a * q + 2 * a * kv_eff + 4 * nh  # q, out, k, v and the logsumexp
    total += 3 * a * inter  # gate output (gelu input), gelu output, up output
    if full:  # trainable linears save their inputs: q/k/v share one, gate/up share one
        total += a * (2 * h + q + inter)
    saved = ("attn_out",) if attn == "sdpa" else ()
    return total + lora_bytes_per_token(sites, flavor, dropout, saved)


def siglip_layer_bytes_per_token(
    vision: Any, flavor: Flavor, sites: list[LoraSite], dropout: float, full: bool = False
) -> float:
    """Saved activation bytes per token (patch) of one SigLIP encoder layer under training."""
    h, inter, a, nh = (
        vision.hidden_size,
        vision.intermediate_size,
        flavor.act,
        vision.num_attention_heads,
    )
    total = 2 * (flavor.ln * h + 2 * flavor.ln)  # two LayerNorms: input + mean and rstd
    total += 4 * a * h + 4 * nh  # SDPA: q, k, v, out, logsumexp
    total += a * inter  # fc1's output, the gelu's input
    if full:  # each trainable linear saves its (autocast) input; out_proj's is SDPA's out
        total += 4 * a * h + a * inter
    return total + lora_bytes_per_token(sites, flavor, dropout, ("attn_out",))


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 weight with double quantisation (bitsandbytes' 4-bit QLoRA layout)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 16 * 4


@dataclass
class VramEstimate:
    """The estimate: byte figures per component, parameter counts and the settings behind them."""

    components: dict[str, int]  # name -> bytes, in table order; their sum is the total
    notes: dict[str, str]
    params: dict[str, int]
    settings: dict[str, Any]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """The estimated peak of allocated GPU memory."""
        return sum(self.components.values())

    @property
    def static_bytes(self) -> int:
        """Weights + trainable weights + gradients + optimizer states."""
        keys = ("weights", "trainable weights", "gradients", "optimizer states")
        return sum(self.components[k] for k in keys)

    def table(self) -> str:
        """A plain-text table: component, GiB, what it counts; then the total and the settings."""
        width = max(len(k) for k in self.components) + 2
        lines = [f"{'component':<{width}}{'GiB':>9}  what", "-" * (width + 60)]
        for name, value in self.components.items():
            lines.append(f"{name:<{width}}{value / GIB:>9.3f}  {self.notes.get(name, '')}")
        lines.append("-" * (width + 60))
        lines.append(f"{'total':<{width}}{self.total_bytes / GIB:>9.3f}  estimated peak allocated")
        lines.append("")
        lines.append(", ".join(f"{k}={v:,}" for k, v in self.params.items()))
        lines.append(", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready values (bytes, counts, settings)."""
        return {
            "components_bytes": dict(self.components),
            "notes": dict(self.notes),
            "total_bytes": self.total_bytes,
            "static_bytes": self.static_bytes,
            "total_gib": round(self.total_bytes / GIB, 4),
            "params": dict(self.params),
            "settings": dict(self.settings),
            **self.extra,
        }


# ---- the model on the meta device ---------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "out_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "fc1": "mlp_in",
    "down_proj": "mlp_mid",
    "fc2": "mlp_mid",
}


def _local_config(name: str, key: str = "model.name_or_path") -> Any:
    """AutoConfig of a local folder or an already-cached hub checkpoint; a clear error otherwise."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"config error: {key}={name!r}: no config.json could be read ({type(err).__name__}). "
            "The estimator needs the architecture only: point it at a local checkpoint folder, use "
            f"one of {MEDGEMMA_HUB_IDS + ('google/medsiglip-448',)} (built in), or a tiny model"
        ) from err


def _gemma_checkpoint(model_cfg: Any) -> tuple[Any, str | None]:
    """(Gemma3Config, local folder or None): the built-in MedGemma 4B config, or AutoConfig."""
    from breakhis_ft.models.gemma_loading import medgemma_4b_config
    from breakhis_ft.models.tiny import ensure_tiny_gemma3

    name = str(model_cfg.name_or_path)
    if bool(model_cfg.get("build_tiny", False)):
        name = str(ensure_tiny_gemma3(name))  # what a run does first; a few CPU seconds
    if name in MEDGEMMA_HUB_IDS and not Path(name).is_dir():
        return medgemma_4b_config(), None
    config = _local_config(name)
    if config.model_type != "gemma3":
        raise ConfigError(
            f"config error: model.name_or_path={name!r} is a {config.model_type!r} checkpoint; "
            "model.kind=medgemma expects a Gemma 3 image-text model (model_type gemma3)"
        )
    return config, name if Path(name).is_dir() else None


def _quantized_weights(model: nn.Module) -> set[int]:
    """ids of the weights bitsandbytes would turn into NF4 (transformers' own selection rules)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(
        getattr(model, "_keep_in_fp32_modules", None) or []
    )
    return {
        id(module.weight)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    }


def lora_sites(model: nn.Module, prefix: str) -> dict[int, list[LoraSite]]:
    """LoRA-adapted linears per layer index, for layers under `prefix` (e.g. `language_model`)."""
    from peft.tuners.lora import LoraLayer

    sites: dict[int, list[LoraSite]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or prefix not in name or ".layers." not in name:
            continue
        index = int(name.split(".layers.")[1].split(".")[0])
        short = name.rsplit(".", 1)[-1]
        for _adapter, r in module.r.items():
            base = module.get_base_layer()
            site = LoraSite(GROUPS.get(short, short), base.in_features, base.out_features, int(r))
            sites.setdefault(index, []).append(site)
    return sites


@dataclass
class ParamBytes:
    """Parameter counts and bytes of a model as training holds it."""

    total: int = 0
    trainable: int = 0
    trainable_tensors: int = 0
    frozen_bytes: int = 0
    trainable_bytes: int = 0
    quantized: int = 0  # weights held in 4 bit
    base: int = 0  # the model's own parameters (no adapters, no modules_to_save copies)


def param_bytes(model: nn.Module, quantized: set[int] = frozenset()) -> ParamBytes:
    """Counts and bytes of every parameter (tied ones once); 4-bit bytes for `quantized` ids."""
    out = ParamBytes()
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        out.total += param.numel()
        if "lora_" not in name and ".modules_to_save." not in name:
            out.base += param.numel()
        if param.requires_grad:
            out.trainable += param.numel()
            out.trainable_tensors += 1
            out.trainable_bytes += size
        elif id(param) in quantized:
            out.quantized += param.numel()
            out.frozen_bytes += nf4_bytes(param.numel())
        else:
            out.frozen_bytes += size
    return out


def build_meta_gemma(cfg: Any) -> tuple[nn.Module, ParamBytes, Any, str | None]:
    """The configured Gemma 3 model + adapter on meta: (model, bytes, config, local folder)."""
    from breakhis_ft.models.gemma_loading import apply_peft, build_meta_medgemma

    config, folder = _gemma_checkpoint(cfg.model)
    qlora = cfg.peft.method == "qlora"
    model = build_meta_medgemma(config).to(torch.bfloat16 if qlora else DTYPES[cfg.precision.name])
    quantized = _quantized_weights(model) if qlora else set()
    model = apply_peft(model, cfg.peft, freeze_vision=bool(cfg.model.get("freeze_vision", True)))
    return model, param_bytes(model, quantized), config, folder


def build_meta_siglip(cfg: Any, n_classes: int) -> tuple[nn.Module, ParamBytes, Any, str]:
    """The configured SigLIP classifier (encoder + adapter + head) on meta, and its mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from breakhis_ft.models.siglip import classifier_mode, lora_targets
    from breakhis_ft.models.tiny_siglip import ensure_tiny_siglip

    mode = classifier_mode(cfg.model, cfg.peft)
    name = str(cfg.model.name_or_path)
    if bool(cfg.model.get("build_tiny", False)):
        name = str(ensure_tiny_siglip(name))
    if name == "google/medsiglip-448" and not Path(name).is_dir():
        vision = SiglipVisionConfig(**MEDSIGLIP_448_VISION)
    else:
        config = _local_config(name)
        vision = getattr(config, "vision_config", config)
    dtype = torch.float32 if mode == "full" else DTYPES[cfg.precision.name]
    with torch.device("meta"):
        encoder: nn.Module = SiglipVisionModel(vision).to(dtype)
        head = nn.Linear(vision.hidden_size, n_classes)
    if mode == "probe":
        encoder.requires_grad_(False)
    if mode == "lora":
        lora = LoraConfig(
            r=int(cfg.peft.r),
            lora_alpha=int(cfg.peft.alpha),
            lora_dropout=float(cfg.peft.dropout),
            target_modules=lora_targets(cfg.peft.target_modules, encoder),
            modules_to_save=list(cfg.peft.modules_to_save) or None,
            bias="none",
        )
        encoder = get_peft_model(encoder, lora)
    model = nn.ModuleDict({"encoder": encoder, "head": head})
    return model, param_bytes(model), vision, mode


# ---- sequence lengths ----------------------------------------------------------------------------


@dataclass
class Tokens:
    """The longest training sequence of a batch, in parts, and the positions the loss projects."""

    prompt: int  # chat text before the image and around it (incl. <start_of_image>)
    image: int  # soft tokens + the markers the processor adds
    answer: int  # the answer, end of turn and what the template appends
    labelled: int  # positions lm_head is applied to per sequence (loss_on)
    exact: bool  # counted with the checkpoint's processor, else scaled from REFERENCE.md

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


# ---- the estimate --------------------------------------------------------------------------------

OPTIMIZERS = ("adamw", "adamw_8bit")


def optimizer_bytes(model: nn.Module, optimizer: str = "adamw") -> int:
    """Optimizer state bytes: torch AdamW 2 states in the parameter's dtype + a 4-byte step each."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: got {optimizer!r}, allowed: {', '.join(OPTIMIZERS)}")
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if optimizer == "adamw" or p.numel() < 4096:  # bitsandbytes keeps small tensors 32-bit
            size = p.element_size() if optimizer == "adamw" else 4
            total += 2 * p.numel() * size + 4
        else:  # 8-bit blockwise states: 1 byte each + an fp32 absmax per 256 values
            total += 2 * (p.numel() + 4 * math.ceil(p.numel() / 256)) + 4
    return total


def _layers(per_token: list[float], const: list[int], tokens: int, act_h: int, gc: bool) -> float:
    """Saved bytes of a stack of layers: all of them, or (checkpointing) inputs + one recomputed."""
    sizes = [tokens * k + c for k, c in zip(per_token, const, strict=True)]
    if not gc:
        return float(sum(sizes))
    return float(len(sizes) * tokens * act_h + max(sizes, default=0))


def _static(model: nn.Module, pb: ParamBytes, optimizer: str) -> dict[str, int]:
    return {
        "weights": pb.frozen_bytes,
        "trainable weights": pb.trainable_bytes,
        "gradients": pb.trainable_bytes,
        "optimizer states": optimizer_bytes(model, optimizer),
    }


def estimate_vram(cfg: Any, device: str = "cuda", optimizer: str = "adamw") -> VramEstimate:
    """Estimate the peak GPU memory of training with the composed run config `cfg`.

    `device`: cuda (the target) or cpu (how CPU autocast saves LayerNorm inputs and dropout masks);
    `optimizer`: adamw (the trainer's torch AdamW) or adamw_8bit (bitsandbytes, for comparison).
    """
    kind = str(cfg.model.kind)
    if kind == "medgemma":
        return _estimate_gemma(cfg, device, optimizer)
    if kind == "siglip":
        return _estimate_siglip(cfg, device, optimizer)
    raise ConfigError(f"config error: model.kind: got {kind!r}, allowed: medgemma, siglip")


def _estimate_gemma(cfg: Any, device: str, optimizer: str) -> VramEstimate:
    model, pb, config, folder = build_meta_gemma(cfg)
    text, vision = config.text_config, config.vision_config
    qlora = cfg.peft.method == "qlora"
    flavor = Flavor.of("bf16" if qlora else str(cfg.precision.name), device)
    a, b, gc = flavor.act, int(cfg.trainer.batch_size), bool(cfg.trainer.gradient_checkpointing)
    tok = count_tokens(cfg, config, folder)
    seq, rows, dropout = tok.seq, tok.labelled, float(cfg.peft.dropout)
    t_lm = b * seq
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_full = any(p.requires_grad for p in core.model.language_model.layers.parameters()) and (
        cfg.peft.method == "none"
    )
    vis_modules = (core.model.vision_tower, core.model.multi_modal_projector)
    vision_trains = any(p.requires_grad for m in vis_modules for p in m.parameters())

    h, hd, n_layers = text.hidden_size, text.head_dim, text.num_hidden_layers
    attn = str(cfg.model.attn_implementation)
    sites = lora_sites(model, "language_model")
    per_token = [
        gemma_layer_bytes_per_token(text, flavor, sites.get(i, []), dropout, seq, attn, lm_full)
        for i in range(n_layers)
    ]
    const = [
        lora_layer_constant(sites.get(i, []), flavor) + 16 * h + 8 * hd for i in range(n_layers)
    ]
    outside = t_lm * (4 * h + 4) + 2 * b * seq * seq * a  # final norm; sliding + global masks
    lm = {g: _layers(per_token, const, t_lm, a, g) + outside for g in (False, True)}

    patches = (vision.image_size // vision.patch_size) ** 2
    t_v, hv, iv = b * patches, vision.hidden_size, vision.intermediate_size
    features = b * config.mm_tokens_per_image * h * a  # projected soft tokens fed to the LM
    vis = {False: float(features), True: float(features)}
    vision_transient = 0.0
    if vision_trains:
        vsites = lora_sites(model, "vision_tower")
        vfull = cfg.peft.method == "none"
        vper = [
            siglip_layer_bytes_per_token(vision, flavor, vsites.get(i, []), dropout, vfull)
            for i in range(vision.num_hidden_layers)
        ]
        vconst = [lora_layer_constant(vsites.get(i, []), flavor) for i in range(len(vper))]
        vout = t_v * (flavor.ln * hv + 2 * flavor.ln) + b * config.mm_tokens_per_image * 4 * hv
        # checkpointing covers the tower only when it trains (medgemma.py)
        vis = {g: features + _layers(vper, vconst, t_v, a, g) + vout for g in (False, True)}
    else:  # frozen: run under no_grad, one layer's tensors at a time
        vision_transient = t_v * (a * hv + flavor.ln * hv + 3 * a * hv + 2 * a * iv)

    vocab = text.vocab_size
    logits = b * rows * vocab * 12
    backward = t_lm * a * (2 * h + 2 * text.intermediate_size)
    work = {"loss logits": logits, "backward": backward, "frozen vision forward": vision_transient}
    work_name = max(work, key=work.get)
    components = _static(model, pb, optimizer)
    components["activations: language model"] = int(lm[gc])
    components["activations: vision tower"] = int(vis[gc])
    components["working set"] = int(work[work_name])
    quant = f", {pb.quantized:,} in NF4" if qlora else ""
    notes = {
        "weights": f"frozen base, {'bf16 + NF4' if qlora else cfg.precision.name}{quant}",
        "trainable weights": f"{pb.trainable:,} params ({cfg.peft.method}, adapters fp32)",
        "gradients": "one per trainable param, its dtype",
        "optimizer states": f"{optimizer}: exp_avg + exp_avg_sq (+ step)",
        "activations: language model": (
            f"{n_layers} layers x {b} x {seq} tokens, "
            f"{'checkpointed' if gc else f'k={per_token[-1] / h:.1f} h bytes/token/layer'}"
        ),
        "activations: vision tower": (
            f"{'trains' if vision_trains else 'frozen (no_grad)'}: {patches} patches x {b}"
            f" + {config.mm_tokens_per_image} soft tokens"
        ),
        "working set": f"largest transient: {work_name} (loss: {b} x {rows} positions x {vocab:,})",
    }
    params = {
        "base_params": pb.base,
        "total_params": pb.total,
        "trainable_params": pb.trainable,
    }
    settings = {
        "model": str(cfg.model.name_or_path),
        "peft": str(cfg.peft.method),
        "r": int(cfg.peft.r),
        "precision": "bf16+nf4" if qlora else str(cfg.precision.name),
        "batch_size": b,
        "seq": f"{tok.prompt}+{tok.image}+{tok.answer}={seq}{'' if tok.exact else ' (approx.)'}",
        "gradient_checkpointing": gc,
        "attn": attn,
        "device": device,
    }
    extra = {
        "activations_no_gc_bytes": lm[False] + vis[False],
        "activations_gc_bytes": lm[True] + vis[True],
        "lm_layer_bytes_per_token": per_token[-1],
        "lm_layer_k_times_hidden": per_token[-1] / h,
        "full_sequence_logits_bytes": b * seq * vocab * 12,
        "seq_tokens": seq,
    }
    return VramEstimate(components, notes, params, settings, extra)


def _estimate_siglip(cfg: Any, device: str, optimizer: str) -> VramEstimate:
    n_classes = len(class_names(str(cfg.task.name)))
    model, pb, vision, mode = build_meta_siglip(cfg, n_classes)
    flavor = Flavor.of(str(cfg.precision.name), device)
    a, b, gc = flavor.act, int(cfg.trainer.batch_size), bool(cfg.trainer.gradient_checkpointing)
    patches = (vision.image_size // vision.patch_size) ** 2
    t_v, h = b * patches, vision.hidden_size
    acts = {False: 4.0 * b * h, True: 4.0 * b * h}  # probe: the head reads cached embeddings
    backward = 0.0
    if mode != "probe":
        sites = lora_sites(model, "encoder")
        per = [
            siglip_layer_bytes_per_token(
                vision, flavor, sites.get(i, []), float(cfg.peft.dropout), mode == "full"
            )
            for i in range(vision.num_hidden_layers)
        ]
        const = [lora_layer_constant(sites.get(i, []), flavor) for i in range(len(per))]
        # autocast keeps a 16-bit copy of every fp32 weight a full fine-tune uses in the forward
        casts = 2 * pb.trainable if mode == "full" and flavor.mixed else 0
        outside = t_v * (flavor.ln * h + 2 * flavor.ln) + (
            t_v * 2.5 * a * h if vision.vision_use_head else 0
        )
        acts = {g: _layers(per, const, t_v, a, g) + outside + casts for g in (False, True)}
        backward = t_v * a * (2 * h + 2 * vision.intermediate_size)
    components = _static(model, pb, optimizer)
    components["activations: vision encoder"] = int(acts[gc])
    components["working set"] = int(backward)
    notes = {
        "weights": f"frozen encoder, {cfg.precision.name}",
        "trainable weights": f"{pb.trainable:,} params ({mode}; head fp32)",
        "gradients": "one per trainable param, its dtype",
        "optimizer states": f"{optimizer}: exp_avg + exp_avg_sq (+ step)",
        "activations: vision encoder": (
            f"{vision.num_hidden_layers} layers x {b} x {patches} patches{', checkpointed' * gc}"
        ),
        "working set": "backward gradients of one layer",
    }
    params = {"base_params": pb.base, "total_params": pb.total, "trainable_params": pb.trainable}
    settings = {
        "model": str(cfg.model.name_or_path),
        "mode": mode,
        "precision": str(cfg.precision.name),
        "batch_size": b,
        "image_size": vision.image_size,
        "gradient_checkpointing": gc,
        "device": device,
    }
    extra = {"activations_no_gc_bytes": acts[False], "activations_gc_bytes": acts[True]}
    return VramEstimate(components, notes, params, settings, extra)
