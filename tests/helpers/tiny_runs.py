"""Tiny runs trained through the real entrypoint, for the tests that need finished run folders.

`train_runs` starts every run as its own `python -m breakhis_ft` subprocess, in parallel, after
building their shared replica once (so they do not race to build it); each run is the COMMON
overrides (a small replica at 48x32 px, 4 steps, fp32) plus its own, which win.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from breakhis_ft.config import TrainRunConfig
from breakhis_ft.data.breakhis import scan_from_config
from helpers.cli_runs import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
COMMON = ["logger=none", *TINY_RUN]


def with_common(overrides: list[str]) -> list[str]:
    """COMMON without the keys `overrides` set, then `overrides` (Hydra refuses a key twice)."""
    keys = {o.partition("=")[0] for o in overrides}
    return [c for c in COMMON if c.partition("=")[0] not in keys] + list(overrides)


def data_config(overrides: list[str]) -> DictConfig:
    """The config these overrides compose, as far as the data is concerned (schema + data.*)."""
    return OmegaConf.merge(
        OmegaConf.structured(TrainRunConfig),
        OmegaConf.from_dotlist([o for o in overrides if o.startswith("data.")]),
    )


def train_runs(specs: dict[str, list[str]], out: Path, cache: Path) -> dict[str, Path]:
    """Train each named run (COMMON + its overrides) under out/<name>; return its run folder.

    W&B is disabled unless a run asks for `logger=wandb` (then it logs offline into its folder).
    """
    scan_from_config(data_config(COMMON).data, cache / "synthetic")
    env = {**os.environ, "BREAKHIS_FT_CACHE": str(cache), "WANDB_SILENT": "true"}
    procs = {}
    for name, args in specs.items():
        run_env = dict(env)
        if "logger=wandb" not in args:
            run_env["WANDB_MODE"] = "disabled"
        argv = [*with_common(args), f"paths.output_dir={out / name}"]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "breakhis_ft", *argv],
            cwd=REPO,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    found = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} run failed:\n{log[-3000:]}"
        (found[name],) = (out / name / "runs" / "default").iterdir()
    return found
