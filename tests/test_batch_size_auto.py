"""trainer.batch_size=auto: the largest micro-batch whose estimate + headroom fits the budget, the
accumulation that keeps the effective batch, resolved once and handed down, recorded, reused on
resume; bad combinations refused at validation."""

from __future__ import annotations

import copy
import json

import pytest
from helpers.configs import compose_run_cfg

from breakhis_ft.errors import ConfigError
from breakhis_ft.models.precision import Precision
from breakhis_ft.run.batch_size import resolve_batch_size
from breakhis_ft.run.setup import make_accelerator, recipe_settings
from breakhis_ft.validate import validate_config
from breakhis_ft.vram import estimate_vram
from breakhis_ft.vram.estimate import GIB
from breakhis_ft.vram.plan import MemoryBudgetError, needed_bytes, plan_batch_size

# MedGemma 4B (the built-in architecture: no download), LoRA, effective batch 8
AUTO = ["experiment=medgemma_lora_100x", "trainer.batch_size=auto", "trainer.grad_accum=1"]
AUTO += ["trainer.effective_batch_size=8", "data.root=/data/BreaKHis_v1"]
# (micro-batch, device) -> estimate_vram of AUTO's config (each builds a 4B model on meta)
ESTIMATES: dict[tuple[int, str], object] = {}


def estimate_once(cfg, device: str = "cuda"):
    """estimate_vram of AUTO's config, computed once per micro-batch and device."""
    key = (int(cfg.trainer.batch_size), device)
    if key not in ESTIMATES:
        ESTIMATES[key] = estimate_vram(cfg, device=device)
    return ESTIMATES[key]


@pytest.fixture(scope="module")
def auto_cfg():
    return compose_run_cfg(*AUTO)


def needs_on(auto_cfg, device: str) -> dict[int, int]:
    """Estimate + headroom, bytes, of each micro-batch that divides 8 (as estimate_vram says)."""
    out = {}
    for size in (1, 2, 4, 8):
        cfg = copy.deepcopy(auto_cfg)
        cfg.trainer.batch_size = size
        out[size] = needed_bytes(estimate_once(cfg, device))
    assert out[1] < out[2] < out[4] < out[8]
    return out


@pytest.fixture(scope="module")
def needs(auto_cfg) -> dict[int, int]:
    return needs_on(auto_cfg, "cuda")


@pytest.mark.parametrize(("between", "chosen"), [((8, None), 8), ((2, 4), 2), ((1, 2), 1)])
def test_budgets_force_8_2_and_1(auto_cfg, needs, between, chosen):
    """A budget just over a size's need (and under the next size's) chooses that size, with the
    accumulation that keeps the effective batch of 8; the plan says why."""
    low, high = between
    budget = needs[low] if high is None else (needs[low] + needs[high]) // 2
    plan = plan_batch_size(auto_cfg, budget, "trainer.memory_budget_gib", estimate=estimate_once)
    assert (plan.batch_size, plan.grad_accum, plan.effective_batch_size) == (chosen, 8 // chosen, 8)
    assert sorted(plan.needed_gib) == [s for s in (1, 2, 4, 8) if s >= chosen]  # largest first
    assert plan.needed_gib[chosen] == round(needs[chosen] / GIB, 4)
    reason = plan.reason()
    assert f"micro-batch {chosen} x grad_accum {8 // chosen}" in reason
    assert "trainer.memory_budget_gib" in reason and "headroom: 15% of the estimate" in reason
    if high is not None:
        assert f"; {high} would need" in reason
    assert auto_cfg.trainer.batch_size == "auto"  # the composed config is not changed


def test_budget_under_a_micro_batch_of_one_names_the_options(auto_cfg, needs):
    with pytest.raises(
        MemoryBudgetError, match=r"even a micro-batch of 1 needs .*memory_budget_gib"
    ):
        plan_batch_size(auto_cfg, needs[1] - 1, "trainer.memory_budget_gib", estimate=estimate_once)


def test_resolved_once_handed_down_recorded_and_reused_on_resume(auto_cfg, tmp_path, monkeypatch):
    """resolve_batch_size writes the choice into the run's config (the Accelerator's accumulation,
    the recipe's batch), run_info.json records it, and a resume reuses it whatever the budget."""
    monkeypatch.setattr("breakhis_ft.vram.plan.estimate_vram", estimate_once)
    needs = needs_on(auto_cfg, "cpu")  # a CPU run: the estimate of CPU autocast
    budget = (needs[2] + needs[4]) / 2 / GIB
    cfg = compose_run_cfg(*AUTO, f"trainer.memory_budget_gib={budget}", "trainer.cpu=true")
    validate_config(cfg)
    plan = resolve_batch_size(cfg, tmp_path)
    assert (plan.batch_size, plan.grad_accum) == (2, 4)
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum) == (2, 4)
    assert make_accelerator(cfg, Precision.of("fp32")).gradient_accumulation_steps == 4
    assert recipe_settings(cfg, tmp_path).trainer.batch_size == 2
    recorded = json.loads((tmp_path / "run_info.json").read_text())["batch_plan"]
    assert (recorded["batch_size"], recorded["grad_accum"]) == (2, 4)
    assert recorded["reason"] == plan.reason()

    # resumed with a budget that would choose 8: the run keeps the micro-batch its checkpoints count
    again = compose_run_cfg(
        *AUTO,
        f"trainer.memory_budget_gib={needs[8] / GIB}",
        "trainer.cpu=true",
        f"resume={tmp_path}",
    )
    assert resolve_batch_size(again, tmp_path) == plan
    assert (again.trainer.batch_size, again.trainer.grad_accum) == (2, 4)


def test_a_fixed_batch_size_is_left_alone(tmp_path):
    cfg = compose_run_cfg("trainer.batch_size=4", "trainer.grad_accum=2")
    assert resolve_batch_size(cfg, tmp_path) is None
    assert (cfg.trainer.batch_size, cfg.trainer.grad_accum) == (4, 2)
    assert not (tmp_path / "run_info.json").exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["trainer.batch_size=auto"], "trainer.effective_batch_size"),
        (
            ["trainer.batch_size=auto", "trainer.effective_batch_size=16", "trainer.grad_accum=4"],
            "trainer.grad_accum",
        ),
        (  # the CPU: no free memory to measure
            ["trainer.batch_size=auto", "trainer.effective_batch_size=16", "trainer.cpu=true"],
            "trainer.memory_budget_gib",
        ),
        (["trainer.effective_batch_size=16"], "trainer.effective_batch_size"),
        (["trainer.memory_budget_gib=0"], "trainer.memory_budget_gib"),
        (["trainer.batch_size=0"], "trainer.batch_size"),
        (["trainer.batch_size=big"], "trainer.batch_size"),
        (["trainer.checkpoint_every_minutes=0"], "trainer.checkpoint_every_minutes"),
    ],
)
def test_bad_combinations_fail_validation(overrides, key):
    cfg = compose_run_cfg(*overrides)
    with pytest.raises(ConfigError, match=rf"config error: {key}: "):
        validate_config(cfg)


def test_auto_with_its_settings_validates():
    validate_config(compose_run_cfg(*AUTO, "trainer.memory_budget_gib=22", "trainer.cpu=true"))


def test_the_estimate_tool_shows_what_auto_chooses(needs, capsys):
    """breakhis-ft-estimate-vram with batch_size=auto: the run's choice, then that size's table."""
    from breakhis_ft.tools.estimate_vram import main

    overrides = [o for o in AUTO if not o.startswith("trainer.effective_batch_size")]
    budget = (needs[2] + needs[4]) / 2 / GIB  # the estimates of AUTO at effective 8, on CUDA
    args = [*overrides, "trainer.effective_batch_size=2", f"trainer.memory_budget_gib={budget}"]
    assert main([*args, "trainer.cpu=true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trainer.batch_size=auto: micro-batch 2 x grad_accum 1 (effective 2)")
    assert "batch_size=2," in out  # the table's settings: the estimate of the chosen size
