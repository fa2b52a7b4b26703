"""A run's identity on the dashboard (run/identity.py): names under 64 characters from what differs,
numbers rounded, the group, the sweep / search / rerun tags and a rerun that names its source."""

from __future__ import annotations

import json

from hydra.types import RunMode
from omegaconf import OmegaConf

from breakhis_ft.run.identity import MAX_NAME, job_identity, recorded_overrides

# an Optuna trial's overrides as Hydra records them: the sweep's fixed ones, then the trial's
OPTUNA_TRIAL = [
    "experiment=demo",
    "logger.mode=offline",
    "paths.output_dir=/tmp/out",
    "data.synthetic_fraction=0.03",
    "peft.r=16",
    "peft.alpha=32",
    "peft.dropout=0.13157894736842105",
    "trainer.lr=0.00023571753158316953",
]


def _hydra(overrides, multirun=False, sweeper=None, sweep_dir="/o/sweeps/demo/2026-12-07_10-00"):
    """What HydraConfig.get() holds that job_identity reads."""
    return OmegaConf.create(
        {
            "mode": RunMode.MULTIRUN if multirun else RunMode.RUN,
            "overrides": {"task": list(overrides)},
            "sweep": {"dir": sweep_dir},
            "sweeper": sweeper or {},
        }
    )


def _cfg(**extra):
    return OmegaConf.create({"experiment_name": "demo", "rerun_of": None, **extra})


def test_an_optuna_trial_is_named_by_its_swept_values_rounded_under_64_chars() -> None:
    sweeper = {
        "study_name": "lora_optuna",
        "params": {
            "peft.r": "choice(4, 8, 16, 32)",
            "peft.alpha": "choice(8, 16, 32, 64)",
            "peft.dropout": "interval(0.0, 0.2)",
            "trainer.lr": "tag(log, interval(1e-5, 1e-3))",
        },
    }
    argv = ["experiment=demo", "hparams_search=lora_optuna", "data.synthetic_fraction=0.03"]
    ident = job_identity(_cfg(), _hydra(OPTUNA_TRIAL, True, sweeper), argv)
    assert ident.name == "r=16,alpha=32,dropout=0.1316,lr=0.0002357"
    assert ident.group == "demo/2026-12-07_10-00"
    assert set(ident.tags) == {"sweep:2026-12-07_10-00", "optuna:lora_optuna"}
    assert ident.notes is None


def test_a_grid_job_is_named_by_the_command_lines_sweeps_only() -> None:
    overrides = ["model=tiny_siglip", "peft=none", "trainer.max_steps=4", "trainer.lr=0.001"]
    argv = ["-m", "model=tiny_siglip", "peft=none", "trainer.max_steps=4", "trainer.lr=1e-3,1e-2"]
    ident = job_identity(_cfg(), _hydra(overrides, True), argv)
    assert ident.name == "lr=0.001"
    assert ident.tags == ("sweep:2026-12-07_10-00",)


def test_a_single_run_is_named_by_its_overrides_and_a_long_name_is_capped_apart() -> None:
    ident = job_identity(_cfg(), _hydra(["experiment=demo", "logger.mode=offline"]), [])
    assert (ident.name, ident.group, ident.tags) == ("demo", "demo", ())
    many = [f"+extra.key_number_{i}={i / 3}" for i in range(12)]
    one, two = (job_identity(_cfg(), _hydra(many[:k]), []) for k in (11, 12))
    assert len(one.name) <= MAX_NAME and len(two.name) <= MAX_NAME
    assert one.name != two.name
    # two keys that end alike keep their full path (the name says which is which)
    ident = job_identity(_cfg(), _hydra(["model.lr=1", "trainer.lr=2"]), [])
    assert ident.name == "model.lr=1,trainer.lr=2"


def test_a_rerun_names_its_source_run_and_records_only_its_own_overrides(tmp_path) -> None:
    source = tmp_path / "2026-12-07_09-00-00"
    source.mkdir()
    wandb = {"id": "abc123", "name": "r=8,lr=0.0005"}
    (source / "run_info.json").write_text(json.dumps({"status": "completed", "wandb": wandb}))
    overrides = ["trainer.max_steps=8", f"++rerun_of='{source}'", "resume=null"]
    ident = job_identity(_cfg(rerun_of=str(source)), _hydra(overrides), [])
    assert ident.name == "rerun of r=8,lr=0.0005: max_steps=8"
    assert ident.tags == ("rerun",)
    assert ident.notes == f"rerun of {source} (W&B run abc123)"
    assert recorded_overrides(overrides) == ["trainer.max_steps=8"]
    # a source run without W&B: named by its folder
    (source / "run_info.json").write_text(json.dumps({"status": "completed"}))
    ident = job_identity(_cfg(rerun_of=str(source)), _hydra([f"++rerun_of='{source}'"]), [])
    assert ident.name == f"rerun of {source.name}" and ident.notes == f"rerun of {source}"
