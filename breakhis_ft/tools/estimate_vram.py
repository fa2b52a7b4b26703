"""Estimate the GPU memory of a training run from the same overrides as the run.

breakhis-ft-estimate-vram experiment=medgemma_lora_100x trainer.batch_size=4
breakhis-ft-estimate-vram model=medgemma_4b_it peft=qlora --json vram.json
breakhis-ft-estimate-vram experiment=medgemma_lora_100x trainer.batch_size=auto \
    trainer.grad_accum=1 trainer.effective_batch_size=16 trainer.memory_budget_gib=22
    (what batch_size=auto would choose within 22 GiB, and the estimate of that micro-batch)
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from breakhis_ft.config import register_configs
from breakhis_ft.errors import ConfigError, ModelLoadError
from breakhis_ft.run.batch_size import memory_budget
from breakhis_ft.tools import tool_parser, user_errors
from breakhis_ft.validate import validate_config
from breakhis_ft.vram import estimate_vram
from breakhis_ft.vram.plan import MemoryBudgetError, plan_batch_size


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-estimate-vram", __doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for breakhis-ft")
    parser.add_argument("--json", type=Path, help="also write the estimate to this JSON file")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "adamw_8bit"),
        help="count these optimizer states instead of the run's trainer/optimizer's (adamw: "
        "torch AdamW; adamw_8bit: bitsandbytes' 8-bit AdamW, paged or not)",
    )
    parser.add_argument(
        "--config-dir", type=Path, help="a conf/ folder (default: the installed configs)"
    )
    return parser


def compose_run_config(overrides: list[str], config_dir: Path | None) -> DictConfig:
    """The run's config as `breakhis-ft <overrides>` composes it (from config_dir if given)."""
    register_configs()
    if config_dir is None:
        context = initialize_config_module("breakhis_ft.conf", version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3")
    with context:
        return compose(config_name="train", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """Compose the config from the overrides, print the estimate table, optionally write JSON."""
    args = build_parser().parse_args(argv)
    # a wrong group, key or value: Hydra's and OmegaConf's messages name it and the options
    with user_errors(
        ConfigError,
        ModelLoadError,
        ValueError,
        HydraException,
        OmegaConfBaseException,
        MemoryBudgetError,
    ):
        cfg = compose_run_config(args.overrides, args.config_dir)
        checked = cfg.copy()  # the estimate reads no data: a missing data.root is not an error
        if checked.data.root is None:
            checked.data.root = "unused-by-the-estimate"
        validate_config(checked)
        if cfg.trainer.batch_size == "auto":  # the run's choice, then its estimate
            budget, source, _device = memory_budget(cfg)
            estimator = functools.partial(estimate_vram, optimizer=args.optimizer)
            plan = plan_batch_size(cfg, budget, source, args.device, estimator)
            print(plan.reason() + "\n")
            cfg.trainer.batch_size, cfg.trainer.grad_accum = plan.batch_size, plan.grad_accum
        estimate = estimate_vram(cfg, device=args.device, optimizer=args.optimizer)
    print(estimate.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(estimate.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
