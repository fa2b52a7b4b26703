"""Running the entrypoint in tests: a private cache, tiny sizes, and reading the run folder back."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# a tiny replica (a few images per patient, 48x32, read at 32 px), a handful of fp32 steps
TINY_RUN = [
    "data.synthetic_fraction=0.03",
    "data.synthetic_size=[48,32]",
    "data.image_size=32",
    "trainer.max_steps=4",
    "precision=fp32",
]
# the entrypoint tests' run: TINY_RUN with its batch sizes spelled out
FAST = [
    *TINY_RUN,
    "trainer.batch_size=8",
    "trainer.eval_batch_size=32",
]
# secrets the first run is given (environment and a secret-looking override): none may be written
SECRET_ENV = {"HF_TOKEN": f"hf_{secrets.token_hex(20)}", "WANDB_API_KEY": secrets.token_hex(20)}
SECRET_OVERRIDE = ("+hf_token", secrets.token_hex(20))
# more secret-looking keys a user may add (run/secrets.py's rule): their values are never written
ADDED_SECRETS = {key: f"s{secrets.token_hex(16)}" for key in ("+my_token_value", "+auth_tokens")}
ADDED_SECRETS["+credentials"] = f"s{secrets.token_hex(16)}"


def cli_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of an entrypoint run: a private cache, quiet W&B, full Hydra errors."""
    return {
        **os.environ,
        "BREAKHIS_FT_CACHE": str(cache),
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "1",
        **extra,
    }


def run_cli(
    args: list[str], cache: Path, timeout: int = 600, **env: str
) -> subprocess.CompletedProcess:
    """Run `python -m breakhis_ft` with a private cache folder (and extra environment)."""
    return subprocess.run(
        [sys.executable, "-m", "breakhis_ft", *args],
        cwd=REPO,
        env=cli_env(cache, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    """Start `python -m breakhis_ft` in the background, its output into `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "breakhis_ft", *args],
            cwd=REPO,
            env=cli_env(cache),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def single_run_dir(parent: Path) -> Path:
    """The one run folder (it holds .hydra/config.yaml) under `parent`."""
    runs = [p.parent.parent for p in parent.rglob(".hydra/config.yaml")]
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run_dir: Path) -> dict:
    """The run's metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())


def run_info(run_dir: Path) -> dict:
    """The run's run_info.json."""
    return json.loads((run_dir / "run_info.json").read_text())
