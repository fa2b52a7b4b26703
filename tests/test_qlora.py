"""QLoRA on the CPU (bitsandbytes >= 0.49): the tiny Gemma 3 loaded in 4-bit NF4, trained with
LoRA under bf16 autocast, its adapter reloaded, and merged onto the dequantized base."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from helpers.builders import build
from helpers.medgemma_toy import examples, tiny_path
from hydra import compose, initialize_config_dir
from test_entrypoint import CONF
from test_medgemma_learning import balanced_accuracy, predictions
from torch import nn

from breakhis_ft.config import MedGemmaConfig, PeftConfig, register_configs
from breakhis_ft.models.gemma_loading import load_model_and_processor, qlora_quantization
from breakhis_ft.models.lora import merged_weights
from breakhis_ft.models.medgemma import MedGemmaClassifier

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_path(tmp_path_factory)


def qlora_classifier(tiny, target_modules: str = "all-linear") -> MedGemmaClassifier:
    """The tiny Gemma 3 in 4 bit with LoRA adapters, as peft=qlora builds it (bf16 compute)."""
    torch.manual_seed(0)  # LoRA init
    model_cfg = MedGemmaConfig(name_or_path=str(tiny))
    peft_cfg = PeftConfig(method="qlora", target_modules=target_modules, dropout=0.0)
    return build(model_cfg, peft_cfg, "bf16", ("a", "b", "c", "d"))


def test_the_tiny_gemma3_loads_in_4bit_where_transformers_quantizes(tiny):
    model, _ = load_model_and_processor(
        str(tiny), BF16, quantization_config=qlora_quantization(BF16)
    )
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    four_bit = {n for n, m in linear.items() if isinstance(m, bnb.nn.Linear4bit)}
    language = {n for n in linear if ".language_model." in n}
    vision = {n for n in linear if ".vision_tower." in n}
    # every linear layer of the language model (2 layers x q/k/v/o/gate/up/down) and of the
    # SigLIP tower (2 layers x q/k/v/out_proj/fc1/fc2), as in Google's notebook's 4-bit load
    assert len(language) == 14 and language <= four_bit
    assert len(vision) == 12 and vision <= four_bit
    # transformers keeps the tied output layer in 16 bit; the projector is a bare weight
    assert set(linear) - four_bit == {"lm_head"}
    projector = model.model.multi_modal_projector.mm_input_projection_weight
    assert projector.dtype == BF16
    packed = next(iter(model.model.language_model.layers[0].mlp.up_proj.parameters()))
    assert isinstance(packed, bnb.nn.Params4bit) and packed.quant_state.quant_type == "nf4"
    assert packed.device.type == "cpu"
    # prepared for k-bit training: all frozen, nothing upcast to float32
    assert not any(p.requires_grad for p in model.parameters())
    rest = {p.dtype for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)}
    assert rest == {BF16}
    # the VRAM estimator's rule for what is 4 bit selects the same weights
    from breakhis_ft.vram import build_meta_gemma

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=tiny_gemma3",
                "peft=qlora",
                f"model.name_or_path={tiny}",
                "model.build_tiny=false",
            ],
        )
    _, counted, _, _ = build_meta_gemma(cfg)
    assert counted.quantized == sum(
        linear[n].in_features * linear[n].out_features for n in four_bit
    )


def test_qlora_learns_and_the_adapter_reloads(tiny, tmp_path):
    train, held_out = examples(32, seed=1), examples(48, seed=2)
    clf = qlora_classifier(tiny)
    trainable = [p for p in clf.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # adapters in fp32
    packed = clf.core.model.language_model.layers[0].self_attn.q_proj.base_layer.weight
    frozen = packed.data.view(torch.uint8).clone()  # packed NF4 codes (bf16 storage)
    before = balanced_accuracy(predictions(clf, held_out), held_out)

    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    order = torch.Generator().manual_seed(0)
    epoch_losses = []
    clf.train()
    for _ in range(6):
        perm = torch.randperm(len(train), generator=order).tolist()
        losses = []
        for start in range(0, len(train), 8):
            batch = clf.collate([train[j] for j in perm[start : start + 8]], train=True)
            with torch.autocast("cpu", dtype=BF16):  # as accelerate's bf16 mixed precision does
                loss = clf.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    with torch.autocast("cpu", dtype=BF16):
        probs = predictions(clf, held_out)
    after = balanced_accuracy(probs, held_out)
    assert all(torch.isfinite(torch.tensor(epoch_losses)))
    assert epoch_losses[-1] < epoch_losses[0] - 0.1, epoch_losses
    assert after >= 0.75 and after - before >= 0.25, f"{before:.2f} -> {after:.2f} (chance 0.25)"
    assert torch.equal(packed.data.view(torch.uint8), frozen), "the 4-bit base must not change"

    clf.save_trained(tmp_path / "adapter")
    fresh = qlora_classifier(tiny)
    fresh.load_trained(tmp_path / "adapter")
    with torch.autocast("cpu", dtype=BF16):
        assert torch.equal(predictions(fresh, held_out), probs)


def test_merging_dequantizes_the_4bit_base_then_adds_the_adapter(tiny):
    clf = qlora_classifier(tiny, target_modules="language_model")
    for name, param in clf.model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter (peft initialises B to zero)
            with torch.no_grad():
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    layer = clf.core.model.language_model.layers[1].mlp.down_proj
    x = torch.randn(5, layer.in_features, dtype=BF16)
    expected = layer(x).float()  # 4-bit base + LoRA, as training computes it
    vision_layer = clf.core.model.vision_tower.encoder.layers[0].mlp.fc1
    weight = vision_layer.weight
    vision_expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()

    merged = merged_weights(clf.model)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not hasattr(merged.config, "quantization_config")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    got = merged.model.language_model.layers[1].mlp.down_proj(x.float())
    # the difference is bf16 rounding of the 4-bit layer's output, not NF4 rounding
    assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2)
    fc1 = merged.model.vision_tower.encoder.layers[0].mlp.fc1
    assert torch.equal(fc1.weight, vision_expected)  # no adapter there: the dequantized weight


def test_gradients_still_reach_the_first_layer_after_an_evaluation(tiny):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without backward; the run
    turns that off, so training after an evaluation (every epoch) still backpropagates."""
    clf = qlora_classifier(tiny, target_modules="language_model")
    # q_proj's gradient comes back through the 4-bit o_proj after it (lora_A's is 0: B starts at 0)
    first = clf.core.model.language_model.layers[0].self_attn.q_proj.lora_B["default"].weight
    batch = clf.collate(examples(4, seed=3), train=True)

    def first_layer_grad() -> torch.Tensor:
        clf.train()
        with torch.autocast("cpu", dtype=BF16):
            clf.loss(batch).backward()
        grad = torch.zeros_like(first) if first.grad is None else first.grad
        first.grad = None
        return grad

    before = first_layer_grad()
    assert before.abs().sum() > 0
    with torch.autocast("cpu", dtype=BF16):
        predictions(clf, examples(4, seed=4))  # eval mode, no autograd
    assert torch.equal(first_layer_grad(), before)


def test_8bit_adamw_steps_on_the_cpu(tiny):
    """trainer/optimizer=adamw_8bit (bitsandbytes' AdamW8bit) updates QLoRA adapters on the CPU,
    8-bit states for tensors of 4,096 elements or more (r=64: up_proj's lora_B is 128 x 64)."""
    torch.manual_seed(0)
    model_cfg = MedGemmaConfig(name_or_path=str(tiny))
    peft_cfg = PeftConfig(method="qlora", r=64, dropout=0.0)
    clf = build(model_cfg, peft_cfg, "bf16", ("a", "b", "c", "d"))
    trainable = {n: p for n, p in clf.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = bnb.optim.AdamW8bit(list(trainable.values()), lr=1e-3)
    batch = clf.collate(examples(4, seed=5), train=True)
    for _ in range(2):  # lora_B starts at zero: lora_A moves from the second step
        with torch.autocast("cpu", dtype=BF16):
            loss = clf.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    states = {str(s["state1"].dtype) for s in optimizer.state.values()}
    assert states == {"torch.uint8", "torch.float32"}  # 8-bit for large tensors, 32-bit for small
