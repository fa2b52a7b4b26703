"""A Hydra app on breakhis-ft's shared-study sweeper whose trials cost nothing: each returns a
function of its parameters. tests/test_shared_study.py starts two of it on one study; a trial
waits for the file named by GO_FILE, so both processes are searching before any trial ends."""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import DictConfig

from hydra_plugins.breakhis_ft_plugins.shared_study_sweeper import SharedStudySweeper

ConfigStore.instance().store(name="app", node={"x": 0.0, "y": 1})


@hydra.main(version_base="1.3", config_path=None, config_name="app")
def trial(cfg: DictConfig) -> float:
    """-(x - 0.3)^2 + y, once the test says go."""
    go = Path(os.environ["GO_FILE"])
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return -((cfg.x - 0.3) ** 2) + cfg.y


if __name__ == "__main__":
    Plugins.instance().register(SharedStudySweeper)  # an editable install hides it from the scan
    trial()
