"""hydra-optuna-sweeper's search, run by processes that share one study (shared_study_sweeper.py).

The stock sweeper runs `n_trials` per process and numbers its jobs with a counter of its own, so
two processes on one storage run twice the trials, into the same job folders. Here each process,
before asking for a trial, counts the trials the study holds (every process's, whatever their
state): at `n_trials` it stops. Optuna numbers a study's trials in the order the storage creates
them, so two processes that ask at the same moment get different numbers; a trial numbered
`n_trials` or more (asked just as another process asked the last one) is told FAIL unrun, with a
user attribute saying so. A trial runs as job `trial.number`. With a storage, each process
reseeds its sampler: processes started with one seed would otherwise draw the same random trials.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import Trial, TrialState
from sqlalchemy.engine import make_url

from breakhis_ft.files import build_lock, write_text_whole

log = logging.getLogger(__name__)

OVER_BUDGET = "breakhis_ft"  # the user attribute of a trial asked past n_trials, never run


class SharedStudySweeperImpl(OptunaSweeperImpl):
    """The stock implementation's search space, sampler and results; its own trial loop."""

    def sweep(self, arguments: list[str]) -> None:
        """Ask, run and tell trials until the study holds `n_trials`; write the best."""
        space, fixed = self._search_space(arguments)
        directions = self._get_directions()
        study = self._study(directions)
        if self.storage is not None:
            self.sampler.reseed_rng()
        log.info(
            f"Study {study.study_name} in {self.storage or 'memory'}: {self.n_trials} trials in "
            f"all, {len(study.get_trials(deepcopy=False))} there already"
        )
        while trials := self._ask(study):
            overrides = self._configure_trials(trials, space, fixed)
            returns = [
                self.launcher.launch([job], initial_job_idx=trial.number)[0]
                for trial, job in zip(trials, overrides, strict=True)
            ]
            self._tell(study, trials, returns, len(directions))
        self._write_results(study, len(directions))

    def _study(self, directions: list[str]) -> optuna.Study:
        """The study, created by the first process and loaded by the others. A new SQLite file is
        created under a lock beside it: processes creating Optuna's tables in one file at once
        fail (alembic's version stamp races). A server database (PostgreSQL) creates its tables
        once; create the study before starting the workers (docs/sweeps.md)."""

        def create() -> optuna.Study:
            return optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                sampler=self.sampler,
                directions=directions,
                load_if_exists=True,
            )

        if self.storage is None or not str(self.storage).startswith("sqlite:"):
            return create()
        database = make_url(str(self.storage)).database
        if not database or database == ":memory:":
            return create()
        with build_lock(database):
            return create()

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict]:
        """The distributions and fixed values of hydra.sweeper.params and the command line (a
        grid sampler gets its grid, and n_trials at most its size), as the stock sweeper does."""
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides(
            [*self._parse_sweeper_params_config(), *arguments]
        )
        space = {**(self.search_space_distributions or {}), **space}
        sampler = self.sampler
        if isinstance(sampler, functools.partial) and sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = sampler(grid)
            self.n_trials = min(
                self.n_trials, functools.reduce(lambda n, v: n * len(v), grid.values(), 1)
            )
        for name in fixed:
            space.pop(name, None)
        return space, fixed

    def _ask(self, study: optuna.Study) -> list[Trial]:
        """Up to n_jobs new trials while the study (all processes') holds fewer than n_trials."""
        trials: list[Trial] = []
        while len(trials) < self.n_jobs and len(study.get_trials(deepcopy=False)) < self.n_trials:
            trial = study.ask()
            if trial.number >= self.n_trials:
                trial.set_user_attr(OVER_BUDGET, f"asked past n_trials={self.n_trials}; not run")
                study.tell(trial, state=TrialState.FAIL)
                break
            trials.append(trial)
        return trials

    def _tell(
        self, study: optuna.Study, trials: Sequence[Trial], returns: Sequence[JobReturn], n: int
    ) -> None:
        """Each trial's value (or FAIL); too many failures end the search with the jobs' error."""
        failures = 0
        for trial, ret in zip(trials, returns, strict=True):
            try:
                value = ret.return_value
                values = [float(value)] if n == 1 else [float(v) for v in value]
            except Exception as err:  # the job's own error, or a value that is no number
                log.warning(f"Trial {trial.number} failed: {err}")
                study.tell(trial, state=TrialState.FAIL)
                failures += 1
                continue
            try:
                study.tell(trial, values=values)
            except RuntimeError as err:  # a grid sampler stops the study once its grid is done
                if "Study.stop" not in str(err):
                    raise
        if failures / len(returns) > self.max_failure_rate:
            rate = self.max_failure_rate
            log.error(f"{failures} of {len(returns)} trials failed (max_failure_rate: {rate})")
            for ret in returns:
                _ = ret.return_value  # raises the first job's error

    def _write_results(self, study: optuna.Study, n: int) -> None:
        """optimization_results.yaml in the sweep folder, from the whole study (every process's
        trials), written whole: processes sharing the folder may write it at once."""
        if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            log.warning("No trial of the study completed: no optimization_results.yaml")
            return
        if n == 1:
            best = study.best_trial
            results: dict[str, Any] = {
                "name": "optuna",
                "best_params": best.params,
                "best_value": best.value,
                "best_trial": best.number,
            }
            log.info(f"Best parameters: {best.params} (trial {best.number}, value {best.value})")
        else:
            front = [{"params": t.params, "values": t.values} for t in study.best_trials]
            results = {"name": "optuna", "solutions": front}
        path = Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, OmegaConf.to_yaml(OmegaConf.create(results)))
