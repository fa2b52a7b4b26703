"""Run configs composed from conf/ as the entrypoint composes them (no run folder, no Hydra run)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from breakhis_ft.config import register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_run_cfg(*overrides: str) -> DictConfig:
    """conf/train.yaml with `overrides`, checked by the schema (not yet by validate.py)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
