"""Hydra sweeper of `hparams_search=lora_optuna`: hydra-optuna-sweeper's search, with a study that
several processes share through its storage (`hydra.sweeper.storage=<database URL>`,
`hydra.sweeper.study_name=NAME`). Started with the same command, on one machine or many, they
cooperate on one study: each asks the study for the next trial, so no trial runs twice; together
they run `n_trials` trials; each trial's job number (its folder, `job<N>`) is the study's trial
number, unique across the processes. Without a storage it runs as the stock sweeper does.

The work is in _shared_study.py, imported when the sweeper is built: Hydra's plugin scan imports
this module at every start, where optuna (an optional extra) may be absent.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SharedStudySweeper(Sweeper):
    """hydra-optuna-sweeper's settings (sampler, direction, storage, study_name, n_trials, n_jobs,
    max_failure_rate, search_space, custom_search_space, params), a study shared by processes."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.breakhis_ft_plugins._shared_study import SharedStudySweeperImpl

        self.sweeper = SharedStudySweeperImpl(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Hand Hydra's context to the search (it builds the launcher)."""
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        """Run this process's trials of the study until it holds `n_trials`."""
        return self.sweeper.sweep(arguments)
