"""scripts/accelerate_configs/*.yaml parse and validate as `accelerate launch` reads them.

FSDP itself cannot run here: accelerate turns it on only for multi-GPU (and other accelerator)
processes, never for CPU ones, so these checks are what the CPU can do for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from transformers import Gemma3ForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel

from breakhis_ft.models.gemma_loading import medgemma_4b_config

CONFIGS = Path(__file__).resolve().parent.parent / "scripts" / "accelerate_configs"


def launch_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <name>.yaml` gives each process."""
    path = CONFIGS / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "breakhis_ft"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_config_files_parse_with_known_keys_only(name: str) -> None:
    config = ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml")  # unknown keys raise
    expected = DistributedType.FSDP if name == "fsdp" else DistributedType.MULTI_GPU
    assert config.distributed_type == expected
    assert config.mixed_precision == "no"  # precision comes from the Hydra config only
    assert not config.use_cpu and config.num_machines == 1


def test_ddp_launch_is_plain_data_parallel() -> None:
    env = launch_env("ddp")
    assert env.get("ACCELERATE_USE_FSDP", "false") == "false"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_fsdp_launch_builds_a_valid_fsdp2_plugin(monkeypatch) -> None:
    env = launch_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads and checks the FSDP_* variables
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
    # transformer-based wrapping: every class named must exist in the models it wraps
    wrap = env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")
    with torch.device("meta"):
        gemma = Gemma3ForConditionalGeneration(medgemma_4b_config())
        siglip = SiglipVisionModel(SiglipVisionConfig(image_size=448, patch_size=14))
    gemma_classes = {type(m).__name__ for m in gemma.modules()}
    assert set(wrap) <= gemma_classes  # MedGemma holds both its decoder and SigLIP layers
    assert "SiglipEncoderLayer" in {type(m).__name__ for m in siglip.modules()}
