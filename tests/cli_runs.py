"""Running the entrypoint in tests: a private cache, tiny sizes, and reading the run folder back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# a small, fast run: a few images per patient at a tiny size, a handful of steps
FAST = [
    "data.synthetic_fraction=0.03",
    "data.synthetic_size=[48,32]",
    "data.image_size=32",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=32",
    "precision=fp32",
]


def run_cli(args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m breakhis_ft` with a private cache folder."""
    env = {
        **os.environ,
        "BREAKHIS_FT_CACHE": str(cache),
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "breakhis_ft", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def single_run_dir(parent: Path) -> Path:
    """The one run folder under `parent`."""
    runs = [p.parent.parent for p in parent.rglob(".hydra/config.yaml")]
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run_dir: Path) -> dict:
    """The run's metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())
