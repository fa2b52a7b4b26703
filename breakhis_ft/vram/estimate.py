"""The estimate: static memory, activations and the working set, as a VramEstimate table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from breakhis_ft.vram.activations import (
    Flavor,
    eager_scores_transient,
    gemma_layer_bytes_per_token,
    lora_layer_constant,
    siglip_layer_bytes_per_token,
    vision_tokens,
)
from breakhis_ft.vram.meta import ParamBytes, build_meta_gemma, build_meta_siglip, lora_sites
from breakhis_ft.vram.tokens import count_tokens

GIB = 1024**3


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


OPTIMIZERS = ("adamw", "adamw_8bit")
# the optimizer of each trainer/optimizer choice (its _target_): whose states the estimate counts
OPTIMIZER_OF_TARGET = {
    "breakhis_ft.engine.optim.adamw": "adamw",
    "torch.optim.AdamW": "adamw",
    "bitsandbytes.optim.AdamW8bit": "adamw_8bit",
    # paged: the same 8-bit states, in memory that can spill to the host under pressure
    "bitsandbytes.optim.PagedAdamW8bit": "adamw_8bit",
}


def preset_optimizer(cfg: Any) -> str:
    """The estimator's name (adamw, adamw_8bit) of the run's trainer.optimizer."""
    target = str(cfg.trainer.optimizer.get("_target_", ""))
    if target not in OPTIMIZER_OF_TARGET:
        raise ValueError(
            f"trainer.optimizer._target_={target!r}: the estimator counts the "
            f"states of {', '.join(OPTIMIZER_OF_TARGET)}; pass --optimizer adamw or adamw_8bit "
            "to count one of them instead"
        )
    return OPTIMIZER_OF_TARGET[target]


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


def _stack(
    per_token: list[float], const: list[int], tokens: int, hidden: int, act: int, gc: bool
) -> tuple[float, float]:
    """(bytes held through the backward, bytes of the one layer recomputed) of a stack of layers.

    Without checkpointing every layer keeps what it saves: (their sum, 0). With it each layer keeps
    only its input hidden state, tokens x hidden x act bytes, and the backward recomputes one layer
    at a time: (layers x tokens x hidden x act, the largest layer's saved bytes).
    """
    sizes = [tokens * k + c for k, c in zip(per_token, const, strict=True)]
    if not gc:
        return float(sum(sizes)), 0.0
    return float(len(sizes) * tokens * hidden * act), float(max(sizes, default=0))


def _layers(
    per_token: list[float], const: list[int], tokens: int, hidden: int, act: int, gc: bool
) -> float:
    """Saved bytes of a stack of layers at its peak: all of them, or inputs + one recomputed."""
    return sum(_stack(per_token, const, tokens, hidden, act, gc))


def _static(model: nn.Module, pb: ParamBytes, optimizer: str) -> dict[str, int]:
    return {
        "weights": pb.frozen_bytes,
        "trainable weights": pb.trainable_bytes,
        "gradients": pb.trainable_bytes,
        "optimizer states": optimizer_bytes(model, optimizer),
    }


def estimate_vram(cfg: Any, device: str = "cuda", optimizer: str | None = None) -> VramEstimate:
    """Estimate the peak GPU memory of training with the composed run config `cfg`.

    `device`: cuda (the target) or cpu (how CPU autocast saves LayerNorm inputs and dropout masks);
    `optimizer`: adamw (torch AdamW) or adamw_8bit (bitsandbytes' 8-bit states, paged or not);
    None: the run's own trainer/optimizer (`preset_optimizer`).
    """
    optimizer = preset_optimizer(cfg) if optimizer is None else optimizer
    return ESTIMATORS[str(cfg.model.kind)](cfg, device, optimizer)


@dataclass
class _GemmaShapes:
    """What the MedGemma estimate computes with: sizes, batch, precision, attention, tokens."""

    model: Any
    pb: ParamBytes
    config: Any
    flavor: Flavor
    batch: int
    gc: bool
    attn: str
    tok: Any
    dropout: float
    qlora: bool

    @property
    def eager(self) -> bool:
        """Eager attention materialises the score tensors."""
        return self.attn == "eager"


def _gemma_shapes(cfg: Any, device: str) -> _GemmaShapes:
    model, pb, config, folder = build_meta_gemma(cfg)
    qlora = cfg.peft.method == "qlora"
    return _GemmaShapes(
        model=model,
        pb=pb,
        config=config,
        flavor=Flavor.of("bf16" if qlora else str(cfg.precision.name), device),
        batch=int(cfg.trainer.batch_size),
        gc=bool(cfg.trainer.gradient_checkpointing),
        attn=str(cfg.model.attn_implementation),
        tok=count_tokens(cfg, config, folder),
        dropout=float(cfg.peft.dropout),
        qlora=qlora,
    )


def _gemma_lm(s: _GemmaShapes, full: bool) -> dict[str, Any]:
    """The language model's stored activations (held, recomputed) with and without checkpoints."""
    text, a, b, seq = s.config.text_config, s.flavor.act, s.batch, s.tok.seq
    h, hd, n_layers = text.hidden_size, text.head_dim, text.num_hidden_layers
    sites = lora_sites(s.model, "language_model")
    per_token = [
        gemma_layer_bytes_per_token(text, s.flavor, sites.get(i, []), s.dropout, seq, s.attn, full)
        for i in range(n_layers)
    ]
    const = [
        lora_layer_constant(sites.get(i, []), s.flavor) + 16 * h + 8 * hd for i in range(n_layers)
    ]
    # final norm; the sliding + global masks (sdpa: bool, eager: additive in the compute dtype)
    outside = b * seq * (4 * h + 4) + 2 * b * seq * seq * (a if s.eager else 1)
    stacks = {g: _stack(per_token, const, b * seq, h, a, g) for g in (False, True)}
    return {"stacks": stacks, "outside": outside, "per_token": per_token}


def _gemma_vision(s: _GemmaShapes, trains: bool, full: bool) -> dict[str, Any]:
    """The vision tower's stored activations, its backward and (frozen) its no_grad forward."""
    vision, b, a = s.config.vision_config, s.batch, s.flavor.act
    patches = vision_tokens(vision)
    t_v, hv, iv = b * patches, vision.hidden_size, vision.intermediate_size
    nhv = vision.num_attention_heads
    out = {"stacks": {False: (0.0, 0.0), True: (0.0, 0.0)}, "patches": patches}
    out.update(output=0.0, backward=0.0, transient=0.0)
    if trains:
        sites = lora_sites(s.model, "vision_tower")
        per = [
            siglip_layer_bytes_per_token(
                vision, s.flavor, sites.get(i, []), s.dropout, full, s.attn
            )
            for i in range(vision.num_hidden_layers)
        ]
        const = [lora_layer_constant(sites.get(i, []), s.flavor) for i in range(len(per))]
        tokens = s.config.mm_tokens_per_image
        out["output"] = t_v * (s.flavor.ln * hv + 2 * s.flavor.ln) + b * tokens * 4 * hv
        # checkpointing covers the tower only when it trains (medgemma.py)
        out["stacks"] = {g: _stack(per, const, t_v, hv, a, g) for g in (False, True)}
        out["backward"] = t_v * a * (2 * hv + 2 * iv)
        if s.eager:
            out["backward"] += b * eager_scores_transient(nhv, patches, s.flavor, False)
    else:  # frozen: run under no_grad, one layer's tensors at a time (eager: its scores too)
        out["transient"] = t_v * (a * hv + s.flavor.ln * hv + 3 * a * hv + 2 * a * iv)
        if s.eager:
            out["transient"] += b * eager_scores_transient(nhv, patches, s.flavor, True)
    return out


def _gemma_notes(
    cfg: Any,
    s: _GemmaShapes,
    vis: dict[str, Any],
    per_token: list[float],
    vision_trains: bool,
    recomputed_name: str,
    optimizer: str,
) -> dict[str, str]:
    """What each component of the MedGemma estimate counts, in words."""
    text, config, b, gc, seq = s.config.text_config, s.config, s.batch, s.gc, s.tok.seq
    h = text.hidden_size
    return {
        "weights": f"frozen base, {'bf16 + NF4' if s.qlora else cfg.precision.name}"
        + (f", {s.pb.quantized:,} in NF4" if s.qlora else ""),
        "trainable weights": f"{s.pb.trainable:,} params ({cfg.peft.method}, adapters fp32)",
        "gradients": "one per trainable param, its dtype",
        "optimizer states": f"{optimizer}: exp_avg + exp_avg_sq (+ step)",
        "activations: language model": (
            f"{text.num_hidden_layers} layers x {b} x {seq} tokens, "
            f"{'checkpointed' if gc else f'k={per_token[-1] / h:.1f} h bytes/token/layer'}"
        ),
        "activations: vision tower": (
            f"{'trains' if vision_trains else 'frozen (no_grad)'}: {vis['patches']} patches x "
            f"{b}{', checkpointed' if gc and vision_trains else ''}"
            f" + {config.mm_tokens_per_image} soft tokens"
        ),
        "activations: recomputed layer": (
            f"one {recomputed_name} layer recomputed in the backward ({s.attn})"
            if gc
            else "none: no checkpointing, every layer is counted above"
        ),
    }


def _estimate_gemma(cfg: Any, device: str, optimizer: str) -> VramEstimate:
    s = _gemma_shapes(cfg, device)
    text, config, b, gc, a = s.config.text_config, s.config, s.batch, s.gc, s.flavor.act
    seq, rows = s.tok.seq, s.tok.labelled
    core = s.model.get_base_model() if hasattr(s.model, "get_base_model") else s.model
    lm_full = any(p.requires_grad for p in core.model.language_model.layers.parameters()) and (
        cfg.peft.method == "none"
    )
    vis_modules = (core.model.vision_tower, core.model.multi_modal_projector)
    vision_trains = any(p.requires_grad for m in vis_modules for p in m.parameters())
    lm = _gemma_lm(s, lm_full)
    vis = _gemma_vision(s, vision_trains, cfg.peft.method == "none")
    h = text.hidden_size
    features = b * config.mm_tokens_per_image * h * a  # projected soft tokens fed to the LM

    # Checkpointed, the LM's and the tower's layers are recomputed in turn: one layer at the peak.
    lms, viss = lm["stacks"], vis["stacks"]
    recomputed = {g: max(lms[g][1], viss[g][1]) for g in (False, True)}
    recomputed_name = "vision tower" if viss[gc][1] > lms[gc][1] else "language model"
    lm_held = {g: lms[g][0] + lm["outside"] for g in (False, True)}
    vis_held = {g: features + viss[g][0] + vis["output"] for g in (False, True)}

    vocab = text.vocab_size
    lm_eager = b * eager_scores_transient(text.num_attention_heads, seq, s.flavor, False)
    backward = b * seq * a * (2 * h + 2 * text.intermediate_size) + (lm_eager if s.eager else 0)
    work = {"loss logits": b * rows * vocab * 12, "backward": backward}
    work["vision backward"] = vis["backward"]
    work_name = max(work, key=work.get)
    working = work[work_name]
    work_note = f"largest transient: {work_name} (loss: {b} x {rows} positions x {vocab:,})"
    # A frozen tower runs before the LM saves anything: its forward's peak is not on top of the
    # activations; it sets the peak only where it exceeds them + the training working set.
    activations = lm_held[gc] + vis_held[gc] + recomputed[gc]
    if vis["transient"] > activations + working:
        working = vis["transient"] - activations
        work_note = (
            f"frozen vision forward, {vis['transient'] / GIB:.3f} GiB ({s.attn}), the peak: it "
            "runs before the LM saves anything, counted as its excess over the activations"
        )
    components = _static(s.model, s.pb, optimizer)
    components["activations: language model"] = int(lm_held[gc])
    components["activations: vision tower"] = int(vis_held[gc])
    components["activations: recomputed layer"] = int(recomputed[gc])
    components["working set"] = int(working)
    per_token = lm["per_token"]
    notes = _gemma_notes(cfg, s, vis, per_token, vision_trains, recomputed_name, optimizer)
    notes["working set"] = work_note
    params = {
        "base_params": s.pb.base,
        "total_params": s.pb.total,
        "trainable_params": s.pb.trainable,
    }
    extra = {
        "activations_no_gc_bytes": lm_held[False] + vis_held[False],
        "activations_gc_bytes": lm_held[True] + vis_held[True] + recomputed[True],
        "lm_layer_bytes_per_token": per_token[-1],
        "lm_layer_k_times_hidden": per_token[-1] / h,
        "full_sequence_logits_bytes": b * seq * vocab * 12,
        "frozen_vision_forward_bytes": vis["transient"],
        "seq_tokens": seq,
    }
    return VramEstimate(components, notes, params, _gemma_settings(cfg, s, device), extra)


def _gemma_settings(cfg: Any, s: _GemmaShapes, device: str) -> dict[str, Any]:
    """The settings the MedGemma estimate was made for (shown in its table)."""
    tok = s.tok
    approx = "" if tok.exact else " (approx.)"
    return {
        "model": str(cfg.model.name_or_path),
        "peft": str(cfg.peft.method),
        "r": int(cfg.peft.r),
        "precision": "bf16+nf4" if s.qlora else str(cfg.precision.name),
        "batch_size": s.batch,
        "seq": f"{tok.prompt}+{tok.image}+{tok.answer}={tok.seq}{approx}",
        "gradient_checkpointing": s.gc,
        "attn": s.attn,
        "device": device,
    }


def _estimate_siglip(cfg: Any, device: str, optimizer: str) -> VramEstimate:
    n_classes = len(cfg.task.classes)
    model, pb, vision, mode = build_meta_siglip(cfg, n_classes)
    flavor = Flavor.of(str(cfg.precision.name), device)
    a, b, gc = flavor.act, int(cfg.trainer.batch_size), bool(cfg.trainer.gradient_checkpointing)
    # load_vision_encoder uses transformers' default attention (sdpa) whatever
    # model.attn_implementation says: that setting reaches the MedGemma loader only
    attn = "sdpa"
    patches = vision_tokens(vision)
    t_v, h = b * patches, vision.hidden_size
    acts = {False: 4.0 * b * h, True: 4.0 * b * h}  # probe: the head reads cached embeddings
    backward = 0.0
    if mode != "probe":
        sites = lora_sites(model, "encoder")
        per = [
            siglip_layer_bytes_per_token(
                vision, flavor, sites.get(i, []), float(cfg.peft.dropout), mode == "full", attn
            )
            for i in range(vision.num_hidden_layers)
        ]
        const = [lora_layer_constant(sites.get(i, []), flavor) for i in range(len(per))]
        # autocast keeps a 16-bit copy of every fp32 weight a full fine-tune uses in the forward
        casts = 2 * pb.trainable if mode == "full" and flavor.mixed else 0
        outside = t_v * (flavor.ln * h + 2 * flavor.ln) + (
            t_v * 2.5 * a * h if vision.vision_use_head else 0
        )
        acts = {g: _layers(per, const, t_v, h, a, g) + outside + casts for g in (False, True)}
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


# the estimate of each model family, by `model.kind`
ESTIMATORS = {"medgemma": _estimate_gemma, "siglip": _estimate_siglip}
