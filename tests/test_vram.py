"""The VRAM estimator: exact parameter counts, static memory against a real optimizer step, and the
per-layer activation model against the tensors autograd really saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForImageTextToText,
    Gemma3TextConfig,
    Gemma3TextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from breakhis_ft.config import register_configs
from breakhis_ft.models.gemma_loading import apply_peft, build_meta_medgemma
from breakhis_ft.models.lora import lora_config
from breakhis_ft.vram import (
    Flavor,
    LoraSite,
    build_meta_gemma,
    estimate_vram,
    gemma_layer_bytes_per_token,
    lora_bytes_per_token,
    lora_layer_constant,
    lora_sites,
    siglip_layer_bytes_per_token,
)
from breakhis_ft.vram import estimate as estimate_module
from breakhis_ft.vram.estimate import _layers, _stack

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_cfg(*overrides: str):
    """The run config for `overrides`, composed like a run."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize(
    ("overrides", "trainable"),
    [
        (["peft.r=8"], 14_901_248),
        (["peft.r=16"], 29_802_496),
        (["peft.r=8", "peft.target_modules=all-linear"], 19_248_896),
    ],
)
def test_medgemma_counts_match_reference(overrides: list[str], trainable: int) -> None:
    cfg = compose_cfg("model=medgemma_4b_it", *overrides)
    model, pb, _, folder = build_meta_gemma(cfg)
    assert folder is None  # the built-in architecture, no download
    assert pb.base == 4_300_079_472 == sum(p.numel() for p in build_meta_medgemma().parameters())
    assert (
        pb.trainable == trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    )
    # bf16 base (2 bytes) and fp32 adapters (4 bytes), as training holds them
    assert pb.frozen_bytes == 2 * pb.base and pb.trainable_bytes == 4 * trainable


def test_medgemma_estimate_table_and_checkpointing() -> None:
    cfg = compose_cfg("experiment=medgemma_lora_100x", "trainer.batch_size=4")
    est = estimate_vram(cfg)
    d = est.as_dict()
    assert d["total_bytes"] == sum(d["components_bytes"].values()) > d["static_bytes"]
    assert d["activations_gc_bytes"] < d["activations_no_gc_bytes"] / 10
    # 256 image soft tokens + the markers, the prompt and the answer
    assert 256 < d["seq_tokens"] < 400
    assert "total" in est.table() and "weights" in est.table()
    # the hand-checked layer figure of the module docstring (LoRA r=16, dropout 0.05, bf16, CUDA)
    assert d["lm_layer_bytes_per_token"] == 206_656


def test_qlora_weights_are_four_bit_with_16_bit_leftovers() -> None:
    lora = estimate_vram(compose_cfg("model=medgemma_4b_it", "peft=qlora"))
    plain = estimate_vram(compose_cfg("model=medgemma_4b_it", "peft=lora", "peft.r=16"))
    q, p = lora.components["weights"], plain.components["weights"]
    embed = 262_208 * 2560 * 2  # tied embeddings stay bf16
    assert embed < q < 0.4 * p  # the linears shrink about 4x
    assert lora.params["trainable_params"] == plain.params["trainable_params"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny") / "tiny_gemma3"


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_static_memory_equals_one_real_optimizer_step(tiny_path: Path, precision: str) -> None:
    cfg = compose_cfg(
        "model=tiny_gemma3",
        f"model.name_or_path={tiny_path}",
        f"paths.models={tiny_path.parent}",
        f"precision={precision}",
        "peft.r=4",
        "peft.modules_to_save=[lm_head]",
    )
    est = estimate_vram(cfg, device="cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_path), dtype=dtype)
    model = apply_peft(model, lora_config(cfg.peft), cfg.peft.target_modules)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(10, 200, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    params = _tensor_bytes(model.parameters())
    grads = _tensor_bytes(p.grad for p in trainable)
    states = _tensor_bytes(t for s in optimizer.state.values() for t in s.values())
    assert params + grads + states == est.static_bytes
    assert grads == est.components["gradients"] and states == est.components["optimizer states"]


def _measure_layer(dropout: float, precision: str, attn: str = "sdpa") -> tuple[float, float]:
    """(saved bytes of the middle decoder layer by saved_tensors_hooks, the model's figure)."""
    h, inter, b, s = 128, 512, 2, 48
    text = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        layer_types=["full_attention"] * 3,
        max_position_embeddings=256,
    )
    text._attn_implementation = attn
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = Gemma3TextModel(text).to(dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    model = get_peft_model(model, lora)  # a bare text model: no task type
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    where = ["outside"]
    layer = model.get_base_model().layers[1]
    layer.register_forward_pre_hook(lambda *_: where.__setitem__(0, "middle"))
    layer.register_forward_hook(lambda *_: where.__setitem__(0, "outside"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen[key] = (where[0], t.untyped_storage().nbytes())
        return t

    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, -3:] = 0  # padding: the mask is a tensor, as with Gemma 3's image tokens
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"),
    ):
        model(input_ids=torch.randint(0, 256, (b, s)), attention_mask=mask)
    measured = sum(n for w, n in seen.values() if w == "middle")
    flavor = Flavor.of(precision, device="cpu")
    sites = lora_sites(model, "layers")[1]
    per_token = gemma_layer_bytes_per_token(text, flavor, sites, dropout, s, attn)
    figure = b * s * per_token + lora_layer_constant(sites, flavor) + 16 * h + 8 * text.head_dim
    return measured, figure


@pytest.mark.parametrize(
    ("dropout", "precision", "attn"),
    [
        (0.0, "bf16", "sdpa"),
        (0.1, "bf16", "sdpa"),
        (0.0, "fp32", "sdpa"),
        (0.1, "bf16", "eager"),
        (0.0, "fp32", "eager"),
    ],
)
def test_layer_activation_model_matches_saved_tensors(
    dropout: float, precision: str, attn: str
) -> None:
    measured, figure = _measure_layer(dropout, precision, attn)
    assert figure == pytest.approx(measured, rel=0.02)


def _measure_siglip_layer(dropout: float, precision: str, attn: str) -> tuple[int, float]:
    """(saved bytes of the middle SigLIP layer by saved_tensors_hooks, the model's figure)."""
    b, image, patch = 2, 112, 14  # 64 patches
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image,
        patch_size=patch,
    )
    vision._attn_implementation = attn
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    model = get_peft_model(SiglipVisionModel(vision).to(dtype), lora)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    where = ["outside"]
    layer = dict(model.named_modules())["base_model.model.encoder.layers.1"]
    layer.register_forward_pre_hook(lambda *_: where.__setitem__(0, "middle"))
    layer.register_forward_hook(lambda *_: where.__setitem__(0, "outside"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen[key] = (where[0], t.untyped_storage().nbytes())
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"),
    ):
        model(pixel_values=torch.randn(b, 3, image, image, dtype=dtype))
    measured = sum(n for w, n in seen.values() if w == "middle")
    flavor = Flavor.of(precision, device="cpu")
    sites = lora_sites(model, "encoder")[1]
    per_token = siglip_layer_bytes_per_token(vision, flavor, sites, dropout, attn=attn)
    return measured, b * 64 * per_token + lora_layer_constant(sites, flavor)


@pytest.mark.parametrize(
    ("dropout", "precision", "attn"),
    [(0.1, "bf16", "sdpa"), (0.0, "fp32", "sdpa"), (0.1, "bf16", "eager"), (0.0, "fp32", "eager")],
)
def test_siglip_layer_model_matches_saved_tensors(
    dropout: float, precision: str, attn: str
) -> None:
    measured, figure = _measure_siglip_layer(dropout, precision, attn)
    assert figure == measured


def test_checkpointing_estimate_is_smaller(tiny_path: Path) -> None:
    cfg = compose_cfg(
        "model=tiny_gemma3",
        f"model.name_or_path={tiny_path}",
        f"paths.models={tiny_path.parent}",
        "trainer.batch_size=4",
    )
    est = estimate_vram(cfg)
    assert 0 < est.extra["activations_gc_bytes"] < est.extra["activations_no_gc_bytes"]
    assert est.settings["seq"].endswith(str(est.extra["seq_tokens"]))  # exact: local processor


def test_lora_site_groups() -> None:
    sites = [LoraSite("attn_in", 8, 8, 2), LoraSite("attn_in", 8, 4, 2)]
    fp32, bf16 = Flavor.of("fp32"), Flavor.of("bf16")
    # fp32 without dropout: q and k read the same input tensor (4 B x 8), saved once, + each
    # site's rank-2 output (4 B x 2)
    assert lora_bytes_per_token(sites, fp32, 0.0) == 4 * 8 + 2 * 4 * 2
    # ... unless the layer saves that input anyway (o_proj's input is SDPA's output)
    assert lora_bytes_per_token(sites, fp32, 0.0, saved=("attn_in",)) == 2 * 4 * 2
    # inputs of different groups are different tensors
    other = [LoraSite("attn_in", 8, 8, 2), LoraSite("mlp_in", 8, 4, 2)]
    assert lora_bytes_per_token(other, fp32, 0.0) == 2 * (4 * 8 + 4 * 2)
    # with dropout each site saves its own mask (1 B on CUDA) and its own dropped fp32 input
    assert lora_bytes_per_token(sites, fp32, 0.1) == 2 * (1 * 8 + 4 * 8 + 4 * 2)
    # bf16 autocast: each site casts the fp32-cast input back to 16 bit, a fresh copy each
    assert lora_bytes_per_token(sites, bf16, 0.0) == 2 * (2 * 8 + 2 * 2)


def test_medsiglip_counts_and_probe_estimate() -> None:
    lora = estimate_vram(compose_cfg("model=medsiglip_448", "task=binary"))
    probe = estimate_vram(
        compose_cfg("model=medsiglip_448", "peft=none", "model.freeze_encoder=true", "task=binary")
    )
    head = 1152 * 2 + 2  # the linear classification head, binary task
    assert probe.params["base_params"] == 428_565_440 + head  # docs/references.md's vision count
    assert probe.params["trainable_params"] == head
    assert probe.extra["activations_no_gc_bytes"] < lora.extra["activations_no_gc_bytes"]


def test_checkpointed_layers_keep_tokens_x_hidden_inputs() -> None:
    # 3 layers saving 100 B per token at 10 tokens, hidden 64, 2-byte activations
    assert _layers([100] * 3, [0] * 3, 10, 64, 2, False) == 3 * 10 * 100
    # checkpointed: each layer keeps its input (10 tokens x 64 hidden x 2 B), one is recomputed
    assert _stack([100] * 3, [0] * 3, 10, 64, 2, True) == (3 * 10 * 64 * 2, 10 * 100)
    assert _layers([100] * 3, [0] * 3, 10, 64, 2, True) == 3_840 + 1_000 == 4_840


# MedGemma 4B as docs/references.md states it: the language model ...
H, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2560, 10240, 34, 8, 4, 256, 262_208
# ... and the SigLIP tower: 896 px / patch 14 = 64 x 64 patches, pooled to 256 soft tokens
HV, IV, LAYERS_V, HEADS_V, PATCHES, SOFT = 1152, 4304, 27, 16, 64 * 64, 256
# the blog prompt without a local tokenizer: 80 prompt tokens (docs/references.md), the image block
# (256 soft tokens + 3 markers the processor adds around them), the answer digit + <end_of_turn> +
# the template's newline; the loss projects the digit and <end_of_turn>
SEQ, ROWS = 80 + (256 + 3) + (1 + 2), 2
R = 8  # the blog's LoRA: r=8, dropout 0.1, all linear layers; bf16 (2 B) on CUDA
STATIC_BLOG = (
    2 * 4_300_079_472  # bf16 base weights
    + 2 * 4 * 19_248_896  # fp32 adapters + their gradients
    + (2 * 4 * 19_248_896 + 4 * 2 * (34 * 7 + 27 * 6))  # AdamW: 2 fp32 states, a step per tensor
)

# Saved bytes per token of one LM layer (bf16 autocast, CUDA), by the model's code:
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM  # 2048, 1024; k and v repeated to 2048 (GQA)
LM_NORMS = 4 * (4 * H + 4) + 4 * (Q + KV) + 4 * (HEADS + KV_HEADS)  # fp32 norm inputs + rstd
LM_SDPA = 2 * Q + 2 * Q + 2 * Q + 2 * Q + 4 * HEADS  # q, out, k, v (bf16) + fp32 logsumexp
LM_EAGER = 2 * Q + 2 * Q + 2 * Q + (4 + 2) * HEADS * SEQ  # q, k, v; fp32 softmax + bf16 probs
LM_MLP = 3 * 2 * INTER  # gate output, gelu output, up output
# LoRA at each of q, k, v, o, gate, up, down: the rank-8 output (2 B), the dropout mask (1 B)
# and autocast's bf16 copy (2 B) of the input; o reads 2048, down 10240, the rest 2560
LM_LORA = 7 * 2 * R + 3 * (5 * H + Q + INTER)
LM_TOKEN = {
    "sdpa": LM_NORMS + LM_SDPA + LM_MLP + LM_LORA,
    "eager": LM_NORMS + LM_EAGER + LM_MLP + LM_LORA,
}
# per layer: bf16 copies of the fp32 LoRA weights (r x (in + out) x 2 B each), fp32 norm weights
LM_CONST = (
    2 * R * ((H + Q) + 2 * (H + KV) + (Q + H) + 2 * (H + INTER) + (INTER + H))
    + 4 * 4 * H
    + 2 * 4 * HEAD_DIM
)
# One SigLIP layer: two LayerNorms (fp32 input + mean + rstd), attention, fc1's output, LoRA at
# q, k, v, out, fc1 (input 1152) and fc2 (input 4304)
V_NORMS = 2 * (4 * HV + 4 + 4)
V_SDPA = 4 * 2 * HV + 4 * HEADS_V  # q, k, v, out + logsumexp
V_EAGER = 3 * 2 * HV + (4 + 2) * HEADS_V * PATCHES  # q, k, v; 16 x 4096 scores per patch
V_LORA = 6 * 2 * R + 3 * (5 * HV + IV)
V_MLP = 2 * IV  # fc1's output, the gelu's input
V_TOKEN = {"sdpa": V_NORMS + V_SDPA + V_MLP + V_LORA, "eager": V_NORMS + V_EAGER + V_MLP + V_LORA}
V_CONST = 2 * R * (4 * (HV + HV) + 2 * (HV + IV))


def test_hand_computed_layer_figures() -> None:
    assert LM_TOKEN == {"sdpa": 206_544, "eager": 218_832}  # 80.7 h and 85.5 h
    assert V_TOKEN == {"sdpa": 57_408, "eager": 448_256}
    # eager SigLIP at 896 px saves 16 x 4096 x 4096 scores, 6 B each, per image and layer (1.6 GB)
    # and no longer SDPA's output and logsumexp
    scores = 16 * 4096 * 4096 * 6
    assert scores == 1_610_612_736
    assert PATCHES * (V_TOKEN["eager"] - V_TOKEN["sdpa"]) == scores - PATCHES * (2 * HV + 4 * 16)
    assert (LM_CONST, V_CONST) == (919_552, 322_048)


def _hand_estimate(b: int, gc: bool, attn: str, vision_trains: bool) -> dict[str, int]:
    """The activation components and working set, by the arithmetic above."""
    eager = attn == "eager"
    lm_layer = b * SEQ * LM_TOKEN[attn] + LM_CONST
    v_layer = b * PATCHES * V_TOKEN[attn] + V_CONST
    # final norm's fp32 input + rstd; two seq x seq masks (sdpa: bool; eager: bf16, additive)
    lm_outside = b * SEQ * (4 * H + 4) + 2 * b * SEQ * SEQ * (2 if eager else 1)
    features = b * SOFT * H * 2  # the projected soft tokens
    # post-LayerNorm's fp32 input + mean + rstd; the projector's RMSNorm (fp32, 256 tokens)
    v_outside = b * PATCHES * (4 * HV + 8) + b * SOFT * 4 * HV
    if gc:  # checkpointed inputs: tokens x hidden x 2 B per layer
        lm = LAYERS * b * SEQ * H * 2 + lm_outside
        vis = features + (LAYERS_V * b * PATCHES * HV * 2 + v_outside if vision_trains else 0)
        recomputed = max(lm_layer, v_layer) if vision_trains else lm_layer
    else:
        lm = LAYERS * lm_layer + lm_outside
        vis = features + (LAYERS_V * v_layer + v_outside if vision_trains else 0)
        recomputed = 0
    # transients: fp32 logits + log-softmax + gradient; one layer's gradients in the backward
    # (eager: + the fp32 gradients of softmax's output and input, 8 B per score); a frozen tower's
    # no_grad forward (eager: bf16 scores + their fp32 cast + fp32 softmax output, 10 B per score)
    work = [
        b * ROWS * VOCAB * 12,
        b * SEQ * 2 * (2 * H + 2 * INTER) + eager * b * HEADS * SEQ**2 * 8,
    ]
    if vision_trains:
        work.append(b * PATCHES * 2 * (2 * HV + 2 * IV) + eager * b * HEADS_V * PATCHES**2 * 8)
    working = max(work)
    if not vision_trains:  # residual, fp32 LayerNorm input, q/k/v, fc1 + gelu outputs (+ scores)
        frozen = b * PATCHES * (2 * HV + 4 * HV + 3 * 2 * HV + 2 * 2 * IV)
        frozen += eager * b * HEADS_V * PATCHES**2 * 10
        # it runs before the LM saves anything: the peak is the larger of the two phases
        working = max(working, frozen - (lm + vis + recomputed))
    return {
        "activations: language model": lm,
        "activations: vision tower": vis,
        "activations: recomputed layer": recomputed,
        "working set": working,
    }


_META_BUILDS: dict[str, tuple] = {}


@pytest.fixture
def meta_build_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One meta-device build per adapter setting (batch, checkpointing, attention: no change)."""

    def cached(cfg):
        key = f"{cfg.peft}|{cfg.precision.name}|{cfg.model.name_or_path}"
        if key not in _META_BUILDS:
            _META_BUILDS[key] = build_meta_gemma(cfg)
        return _META_BUILDS[key]

    monkeypatch.setattr(estimate_module, "build_meta_gemma", cached)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("gc", [True, False])
@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("vision_trains", [True, False], ids=["all-linear", "lm-only"])
def test_medgemma_activations_match_hand_arithmetic(
    meta_build_once: None, b: int, gc: bool, attn: str, vision_trains: bool
) -> None:
    overrides = [
        "experiment=blog_medgemma_100x",
        f"trainer.batch_size={b}",
        f"trainer.gradient_checkpointing={str(gc).lower()}",
        f"model.attn_implementation={attn}",
    ]
    if not vision_trains:  # LoRA on the LM only: the tower runs frozen under no_grad
        overrides.append("peft.target_modules=language_model")
    est = estimate_vram(compose_cfg(*overrides))
    assert est.extra["seq_tokens"] == SEQ
    expected = _hand_estimate(b, gc, attn, vision_trains)
    assert {k: est.components[k] for k in expected} == expected
    if vision_trains:
        assert est.static_bytes == STATIC_BLOG


def test_blog_setting_estimate_covers_the_lower_bound(meta_build_once: None) -> None:
    est = estimate_vram(compose_cfg("experiment=blog_medgemma_100x"))  # batch 1, checkpointed
    inputs = LAYERS_V * PATCHES * HV * 2 + LAYERS * SEQ * H * 2  # checkpointed layer inputs
    assert inputs == 314_339_328  # 0.29 GiB
    assert est.total_bytes > STATIC_BLOG + inputs  # 8.59 GiB
    assert est.components["activations: vision tower"] > LAYERS_V * PATCHES * HV * 2
    assert est.total_bytes == STATIC_BLOG + sum(_hand_estimate(1, True, "sdpa", True).values())


def test_the_runs_own_optimizer_states_are_counted(meta_build_once: None) -> None:
    # the notebook trains with paged 8-bit AdamW: 2 one-byte states a parameter (+ absmax)
    # against torch AdamW's 2 fp32 states (8 bytes) for the same fp32 LoRA adapters
    notebook = compose_cfg("experiment=blog_notebook_100x")
    assert notebook.trainer.optimizer._target_ == "bitsandbytes.optim.PagedAdamW8bit"
    paged = estimate_vram(notebook)
    adamw = estimate_vram(compose_cfg("experiment=blog_notebook_100x", "trainer/optimizer=adamw"))
    trainable = paged.params["trainable_params"]
    assert trainable == adamw.params["trainable_params"] == 19_248_896  # all-linear r=8
    assert 2.0 < paged.components["optimizer states"] / trainable < 2.1
    assert 8.0 <= adamw.components["optimizer states"] / trainable < 8.01
    assert paged.total_bytes < adamw.total_bytes
    asked = estimate_vram(compose_cfg("experiment=blog_notebook_100x"), optimizer="adamw")
    assert asked.components == adamw.components  # --optimizer still overrides the preset's


def test_an_optimizer_the_estimator_does_not_know_is_named() -> None:
    cfg = compose_cfg("model=tiny_gemma3", "trainer.optimizer._target_=torch.optim.SGD")
    with pytest.raises(ValueError, match=r"trainer.optimizer._target_='torch.optim.SGD'"):
        estimate_vram(cfg)
