"""The VRAM estimator: exact parameter counts, static memory against a real optimizer step, and the
per-layer activation model against the tensors autograd really saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, Gemma3TextConfig, Gemma3TextModel

from breakhis_ft.config import register_configs
from breakhis_ft.models.gemma_loading import apply_peft, build_meta_medgemma
from breakhis_ft.vram import (
    Flavor,
    LoraSite,
    build_meta_gemma,
    estimate_vram,
    gemma_layer_bytes_per_token,
    lora_layer_constant,
    lora_sites,
)

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
        f"precision={precision}",
        "peft.r=4",
        "peft.modules_to_save=[lm_head]",
    )
    est = estimate_vram(cfg, device="cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_path), dtype=dtype)
    model = apply_peft(model, cfg.peft)
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


def _measure_layer(dropout: float, precision: str) -> tuple[float, float]:
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
    text._attn_implementation = "sdpa"
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
    per_token = gemma_layer_bytes_per_token(text, flavor, sites, dropout, s)
    figure = b * s * per_token + lora_layer_constant(sites, flavor) + 16 * h + 8 * text.head_dim
    return measured, figure


@pytest.mark.parametrize(("dropout", "precision"), [(0.0, "bf16"), (0.1, "bf16"), (0.0, "fp32")])
def test_layer_activation_model_matches_saved_tensors(dropout: float, precision: str) -> None:
    measured, figure = _measure_layer(dropout, precision)
    assert figure == pytest.approx(measured, rel=0.02)


def test_checkpointing_estimate_is_smaller(tiny_path: Path) -> None:
    cfg = compose_cfg(
        "model=tiny_gemma3", f"model.name_or_path={tiny_path}", "trainer.batch_size=4"
    )
    est = estimate_vram(cfg)
    assert 0 < est.extra["activations_gc_bytes"] < est.extra["activations_no_gc_bytes"]
    assert est.settings["seq"].endswith(str(est.extra["seq_tokens"]))  # exact: local processor


def test_lora_site_groups() -> None:
    sites = [LoraSite("attn_in", 8, 8, 2), LoraSite("attn_in", 8, 4, 2)]
    fp32 = Flavor.of("fp32")
    # fp32 without dropout: q and k read the same input tensor, saved once
    assert gemma_layer_bytes_per_token.__name__ and fp32.act == 4
    from breakhis_ft.vram import lora_bytes_per_token

    assert lora_bytes_per_token(sites, fp32, 0.0) == 4 * 8 + 2 * 4 * 2
    assert lora_bytes_per_token(sites, Flavor.of("bf16"), 0.0) == 2 * (2 * 8 + 2 * 2)


def test_medsiglip_counts_and_probe_estimate() -> None:
    lora = estimate_vram(compose_cfg("model=medsiglip_448", "task=binary"))
    probe = estimate_vram(
        compose_cfg("model=medsiglip_448", "peft=none", "model.freeze_encoder=true", "task=binary")
    )
    head = 1152 * 2 + 2  # the linear classification head, binary task
    assert probe.params["base_params"] == 428_565_440 + head  # REFERENCE.md's vision count
    assert probe.params["trainable_params"] == head
    assert probe.extra["activations_no_gc_bytes"] < lora.extra["activations_no_gc_bytes"]
