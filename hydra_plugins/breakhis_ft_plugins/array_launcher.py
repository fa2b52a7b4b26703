"""Hydra launcher `array` (`breakhis-ft -m launcher=array ...`): this process is one task of an
array job (Cloud Run job, Kubernetes Indexed Job, SLURM or AWS Batch array) and runs its share of
the jobs that Hydra's basic sweeper expanded: task i of n runs jobs i, i+n, i+2n, ..., each
composed, numbered and placed as a local `-m` would. The decisions are breakhis_ft/run/array.py's;
this module is the Hydra side (the launcher and its config, registered as hydra/launcher=array).

No `from __future__ import annotations` here: Hydra's plugin scan runs this module before it is in
sys.modules, where dataclasses cannot resolve string annotations.
"""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# the one sweeper whose job list is fixed before any job runs (Optuna asks as results come in)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class ArrayLauncherConf:
    _target_: str = "hydra_plugins.breakhis_ft_plugins.array_launcher.ArrayLauncher"
    # this task's index and the number of tasks, where no scheduler variable gives them
    # (task_count alone: a Kubernetes Indexed Job, whose JOB_COMPLETION_INDEX is the index)
    task_index: int | None = None
    task_count: int | None = None
    # the sweep folder's name where the scheduler gives none (CLOUD_RUN_EXECUTION, ...), or to
    # continue a sweep in a new execution
    sweep_name: str | None = None
    # print the number of jobs and write sweep_plan.json into the sweep folder; run nothing
    plan_only: bool = False


ConfigStore.instance().store(
    group="hydra/launcher", name="array", node=ArrayLauncherConf, provider="breakhis-ft"
)


class ArrayLaunchRefused(CompactHydraException):
    """launcher=array cannot run as asked; Hydra prints the message alone."""


class ArrayLauncher(Launcher):
    """Runs this task's share of a sweep, skipping completed jobs and continuing started ones."""

    def __init__(
        self,
        task_index: int | None = None,
        task_count: int | None = None,
        sweep_name: str | None = None,
        plan_only: bool = False,
    ) -> None:
        self.task_index, self.task_count = task_index, task_count
        self.sweep_name, self.plan_only = sweep_name, plan_only
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.task: Any = None  # array.ArrayTask; None with plan_only
        self.sweep_dir = Path()
        self.planned: list = []  # array.PlannedJob of every batch so far

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Check the sweeper, find this task and the sweep folder, stamp the folder."""
        from breakhis_ft.run import array
        from breakhis_ft.run.ownership import RunFolderError

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        sweeper = str(config.hydra.sweeper.get("_target_"))
        if sweeper != BASIC_SWEEPER:
            raise ArrayLaunchRefused(
                f"launcher=array shares a fixed list of jobs between the tasks, and the sweeper "
                f"{sweeper} chooses its jobs as results come in, so each task would search on its "
                "own. Several processes share one Optuna search through its storage instead: "
                "hparams_search=lora_optuna hydra.sweeper.storage=<database URL> "
                "hydra.sweeper.study_name=NAME in every task, with the default launcher "
                "(docs/sweeps.md). Nothing was run"
            )
        try:
            if not self.plan_only:
                self.task = array.array_task(os.environ, self.task_index, self.task_count)
            raw_dir = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
            if array.SWEEP_NAME_RESOLVER in str(raw_dir):  # its refusal, before OmegaConf's
                array.sweep_name(os.environ, self.sweep_name)
            self.sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))
            array.claim_sweep_folder(self.sweep_dir, self._overrides())
        except (array.ArrayError, RunFolderError) as err:
            raise ArrayLaunchRefused(str(err)) from None

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """Write (or check) the plan, then run this task's jobs of the batch one after another;
        the results of the jobs it ran or found completed."""
        from breakhis_ft.run import array
        from breakhis_ft.run.ownership import RunFolderError

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        composed = [
            self._compose(initial_job_idx + k, overrides)
            for k, overrides in enumerate(job_overrides)
        ]
        self.planned += [job for job, _ in composed]
        try:
            count = (
                self.task.count
                if self.task
                else array.planned_task_count(os.environ, self.task_count, len(self.planned))
            )
            array.record_plan(self.sweep_dir, self.planned, count, self._overrides())
        except (array.ArrayError, RunFolderError) as err:
            raise ArrayLaunchRefused(str(err)) from None
        if self.plan_only:
            print(
                f"{len(self.planned)} jobs for {count} tasks; plan: "
                f"{self.sweep_dir / array.PLAN_FILE}",
                flush=True,
            )
            return []
        log.info(
            f"Task {self.task.index} of {self.task.count} ({self.task.source}): jobs "
            f"{', '.join(str(job.num) for job, _ in composed if self.task.runs(job.num))} of "
            f"{len(self.planned)} in {self.sweep_dir}"
        )
        returns = []
        for job, sweep_config in composed:
            if self.task.runs(job.num):
                ret = self._run(job, sweep_config)
                returns += [ret] if ret is not None else []
        return returns

    def _overrides(self) -> list[str]:
        """The command's overrides (the sweep's, unexpanded): what names the sweep in its plan."""
        assert self.config is not None
        return list(self.config.hydra.overrides.task)

    def _compose(self, num: int, overrides: Sequence[str]) -> tuple[Any, DictConfig]:
        """Job `num`'s config, composed and numbered as Hydra's basic launcher does, and its plan
        entry (its folder under the sweep folder)."""
        from breakhis_ft.run.array import PlannedJob

        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(
            self.config, list(overrides)
        )
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = num
            sweep_config.hydra.job.num = num
        HydraConfig.instance().set_config(sweep_config)  # a subdir may use ${hydra:...}
        folder = str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
        return PlannedJob(num, list(overrides), folder), sweep_config

    def _run(self, job: Any, sweep_config: DictConfig) -> JobReturn | None:
        """Run, continue or skip one job in its folder; None when a live process holds it."""
        from breakhis_ft.errors import ConfigError
        from breakhis_ft.run import array
        from breakhis_ft.run.ownership import RunFolderError, release_run_folder
        from breakhis_ft.run.run_folder import command_line

        assert self.config is not None and self.hydra_context is not None
        job_dir = self.sweep_dir / job.folder
        shown = " ".join(filter_overrides(job.overrides))
        try:
            claim = array.claim_job(job_dir, command_line())
        except RunFolderError as err:
            return self._failed(job, err)
        if claim.state == "held":
            log.warning(f"\t#{job.num} : {shown}: left to the process that runs it ({claim.value})")
            return None
        if claim.state == "completed":
            log.info(f"\t#{job.num} : {shown}: completed before, not run again ({job_dir})")
            ret = JobReturn(overrides=job.overrides, working_dir=str(job_dir))
            ret.status, ret.return_value = JobStatus.COMPLETED, claim.value
            return ret
        try:
            if claim.state == "resume":
                sweep_config = array.resume_job_config(sweep_config, job_dir)
                log.info(f"\t#{job.num} : {shown}: started before, continued in {job_dir}")
            else:
                log.info(f"\t#{job.num} : {shown}")
            return run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        except ConfigError as err:
            return self._failed(job, err)
        finally:
            release_run_folder(job_dir)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

    @staticmethod
    def _failed(job: Any, err: Exception) -> JobReturn:
        """A job that could not start: the sweeper raises `err` once the task's jobs are done."""
        log.error(f"\t#{job.num} : {err}")
        ret = JobReturn(overrides=job.overrides)
        ret.status, ret.return_value = JobStatus.FAILED, err
        return ret
