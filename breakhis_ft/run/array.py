"""A sweep shared by the tasks of an array job: Cloud Run jobs, Kubernetes Indexed Jobs, SLURM and
AWS Batch arrays. What `launcher=array` (hydra_plugins/breakhis_ft_plugins) decides with:

- which task this process is: task `i` of `n` runs jobs i, i+n, i+2n, ... of the job list that
  Hydra's sweeper expanded, exactly as a local `-m` expands it (`array_task`);
- the sweep's folder name, the same in every task and attempt (`sweep_name`: the execution's or
  the array's id, or a given name; never the clock);
- the plan (`sweep_plan.json`: job number, overrides, folder, task), which also keeps a second,
  different sweep out of a folder that holds one;
- what a retried task (or the same command run again) finds in a job's folder (`claim_job`): a
  completed job is skipped and its value handed back, one that started before is continued from its
  newest checkpoint with `resume=`'s guarantees (its saved config, its folder, its history), one
  that never started starts.

Concurrency: the sweep folder is stamped by whichever task comes first; the others find the stamp
(or only what Hydra's sweeper writes there) and go on. A job folder is locked (run/ownership.py)
by the task that runs it, before Hydra writes into it; a task that finds a job's folder held by a
live process leaves that job to it. flock is kernel-local on a bucket mount (gcsfuse): there the
partition itself keeps tasks apart, as no two tasks share a job and a scheduler never runs two
attempts of one task at once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from breakhis_ft.config import folder_name
from breakhis_ft.errors import ConfigError
from breakhis_ft.files import write_text_whole
from breakhis_ft.run.ownership import (
    STAMP_FILE,
    RunFolderError,
    claim_job_folder,
    is_run_folder,
    lock_run_folder,
    release_run_folder,
    stamp_run_folder,
)
from breakhis_ft.run.run_folder import read_run_info
from breakhis_ft.run.saved_config import load_saved_config

log = logging.getLogger(__name__)

PLAN_FILE = "sweep_plan.json"
SWEEP_NAME_RESOLVER = "array_sweep_name"  # conf/launcher/array.yaml's hydra.sweep.dir
# What Hydra's sweeper writes into the sweep folder before the launcher runs (multirun.yaml), and
# what the tasks write there themselves
_SWEEP_FILES = {"multirun.yaml", PLAN_FILE, STAMP_FILE}
# (index variable, count variable, scheduler), in the order they are looked for
_TASK_VARIABLES = (
    ("CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_COUNT", "Cloud Run"),
    ("JOB_COMPLETION_INDEX", None, "Kubernetes Indexed Job"),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM array"),
    ("AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE", "AWS Batch array"),
)
# (variable naming one execution or array, scheduler), in the order they are looked for
_SWEEP_NAME_VARIABLES = (
    ("CLOUD_RUN_EXECUTION", "Cloud Run"),
    ("SLURM_ARRAY_JOB_ID", "SLURM"),
    ("AWS_BATCH_JOB_ID", "AWS Batch"),
)
_WHERE_TASKS_COME_FROM = (
    "CLOUD_RUN_TASK_INDEX/CLOUD_RUN_TASK_COUNT (Cloud Run jobs), JOB_COMPLETION_INDEX with "
    "hydra.launcher.task_count=N (Kubernetes Indexed Jobs), SLURM_ARRAY_TASK_ID/"
    "SLURM_ARRAY_TASK_COUNT, AWS_BATCH_JOB_ARRAY_INDEX/AWS_BATCH_JOB_ARRAY_SIZE, or "
    "hydra.launcher.task_index=I hydra.launcher.task_count=N on the command line"
)


class ArrayError(ValueError):
    """launcher=array cannot run as asked (no task index, no sweep name, ...); the message says
    what would fix it."""


@dataclass(frozen=True)
class ArrayTask:
    """This process's place in the array: task `index` of `count`, as `source` says."""

    index: int
    count: int
    source: str

    def runs(self, job_num: int) -> bool:
        """Whether job `job_num` of the sweep is this task's."""
        return job_num % self.count == self.index


def _int_variable(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    """The whole number in variable `name` (`default` when it is not set)."""
    if name not in environ:
        return default
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ArrayError(f"launcher=array: {name}={value!r} is not a whole number") from None


def _from_environment(
    environ: Mapping[str, str], task_count: int | None
) -> tuple[int, int | None, str] | None:
    """(index, count, source) from the first scheduler whose variables are set, else None."""
    for index_name, count_name, scheduler in _TASK_VARIABLES:
        index = _int_variable(environ, index_name)
        if index is None:
            continue
        if index_name == "SLURM_ARRAY_TASK_ID":  # --array=1-9:2 numbers tasks 1, 3, 5, ...
            first = _int_variable(environ, "SLURM_ARRAY_TASK_MIN", 0)
            step = _int_variable(environ, "SLURM_ARRAY_TASK_STEP", 1)
            index = (index - first) // max(step, 1)
        count = _int_variable(environ, count_name, task_count) if count_name else task_count
        return index, count, f"{scheduler} ({index_name})"
    return None


def array_task(
    environ: Mapping[str, str], task_index: int | None, task_count: int | None
) -> ArrayTask:
    """This task's index and the number of tasks: from the scheduler's environment (Cloud Run,
    Kubernetes, SLURM, AWS Batch, in that order), else `hydra.launcher.task_index/task_count`;
    refused when neither says, or when the two disagree."""
    found = _from_environment(environ, task_count)
    if found is None:
        if task_index is None:
            raise ArrayError(
                "launcher=array runs one task's share of a sweep, and this process was given no "
                f"task index: it comes from {_WHERE_TASKS_COME_FROM}. (hydra.launcher.plan_only="
                "true shows the sweep's jobs without running any.) Nothing was run"
            )
        found = (task_index, task_count, "hydra.launcher.task_index")
    index, count, source = found
    if task_index is not None and task_index != index:
        raise ArrayError(
            f"launcher=array: hydra.launcher.task_index={task_index} but {source} says task "
            f"{index}; leave hydra.launcher.task_index out where the scheduler numbers the tasks"
        )
    if count is None:
        raise ArrayError(
            f"launcher=array: {source} gives this task's index but not the number of tasks; add "
            "hydra.launcher.task_count=N (a Kubernetes Indexed Job's completions)"
        )
    if count < 1 or not 0 <= index < count:
        raise ArrayError(
            f"launcher=array: task {index} of {count} (from {source}) is no task of the array: "
            "the index must be 0 to count - 1"
        )
    return ArrayTask(index, count, source)


def planned_task_count(environ: Mapping[str, str], task_count: int | None, n_jobs: int) -> int:
    """The number of tasks a plan is drawn for: the scheduler's or hydra.launcher.task_count, else
    one task per job."""
    found = _from_environment(environ, task_count)
    count = found[1] if found is not None else task_count
    if count is not None and count < 1:
        raise ArrayError(f"launcher=array: hydra.launcher.task_count={count} must be at least 1")
    return count or max(n_jobs, 1)


def sweep_name(environ: Mapping[str, str], given: str | None) -> str:
    """The sweep folder's name, the same in every task and attempt: `hydra.launcher.sweep_name`
    when given, else the scheduler's id of this execution or array (CLOUD_RUN_EXECUTION,
    SLURM_ARRAY_JOB_ID, AWS_BATCH_JOB_ID without its `:index`); refused when there is none."""
    if given is not None:
        name, source = str(given), "hydra.launcher.sweep_name"
    else:
        found = [(environ[v], v) for v, _ in _SWEEP_NAME_VARIABLES if environ.get(v)]
        if not found:
            raise ArrayError(
                "launcher=array: every task writes into one sweep folder, whose name must not "
                "depend on the clock or the machine; none of CLOUD_RUN_EXECUTION, "
                "SLURM_ARRAY_JOB_ID or AWS_BATCH_JOB_ID is set, so give it: "
                "hydra.launcher.sweep_name=NAME (the same in every task; on Kubernetes, the Job's "
                "name). Nothing was run"
            )
        name, source = found[0]
        if source == "AWS_BATCH_JOB_ID":
            name = name.partition(":")[0]  # a child job's id is <array job id>:<index>
    try:
        return folder_name(name)
    except ConfigError:  # folder_name's own refusal names experiment_name
        raise ArrayError(
            f"launcher=array: {source}={name!r} names the sweep's folder, so it must be one "
            "folder name (not empty, `.` or `..`, no / or \\)"
        ) from None


def register_sweep_name_resolver() -> None:
    """The `array_sweep_name` resolver of conf/launcher/array.yaml (reads this environment)."""
    if not OmegaConf.has_resolver(SWEEP_NAME_RESOLVER):
        OmegaConf.register_new_resolver(
            SWEEP_NAME_RESOLVER, lambda given: sweep_name(os.environ, given)
        )


@dataclass(frozen=True)
class PlannedJob:
    """One job of the sweep: its number, its overrides, its folder (under the sweep folder)."""

    num: int
    overrides: list[str]
    folder: str


def plan_record(
    sweep_dir: Path, jobs: Sequence[PlannedJob], task_count: int, overrides: list[str]
) -> dict[str, Any]:
    """sweep_plan.json's content: the command's overrides, and the jobs, each with the task that
    runs it out of `task_count`."""
    return {
        "sweep_dir": str(sweep_dir),
        "overrides": overrides,
        "n_jobs": len(jobs),
        "task_count": task_count,
        "jobs": [{**asdict(job), "task": job.num % task_count} for job in jobs],
    }


def _read_plan(sweep_dir: Path) -> dict[str, Any] | None:
    path = sweep_dir / PLAN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise RunFolderError(
            f"{path}: not valid JSON ({err}); is the sweep folder damaged?"
        ) from err


def _another_sweep(sweep_dir: Path, found: dict[str, Any], what: str) -> RunFolderError:
    return RunFolderError(
        f"{sweep_dir} holds another sweep ({what}; its command's overrides: "
        f"{' '.join(found.get('overrides') or [])}): give this one its own "
        "hydra.launcher.sweep_name, or run that sweep's command again to finish it. Nothing was run"
    )


def record_plan(
    sweep_dir: Path, jobs: Sequence[PlannedJob], task_count: int, overrides: list[str]
) -> dict[str, Any]:
    """Write the plan into the sweep folder, or check it against the plan found there: a folder
    that holds another sweep (other jobs under the same numbers) is refused."""
    record = plan_record(sweep_dir, jobs, task_count, overrides)
    found = _read_plan(sweep_dir)
    if found is not None:
        before = {job["num"]: job["overrides"] for job in found.get("jobs", [])}
        for job in jobs:
            if job.num in before and before[job.num] != job.overrides:
                raise _another_sweep(sweep_dir, found, f"its job {job.num} was {before[job.num]}")
        if found.get("n_jobs") == len(jobs) and found.get("task_count") == task_count:
            return found
    write_text_whole(sweep_dir / PLAN_FILE, json.dumps(record, indent=2))  # tasks write at once
    return record


def claim_sweep_folder(sweep_dir: Path, overrides: list[str]) -> None:
    """Stamp the sweep folder (new, empty or holding only what the sweep writes there), or accept
    the stamp a task put there first; a folder of other files, or one whose plan is another
    command's, is refused (before Hydra's sweeper writes its multirun.yaml there)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not is_run_folder(sweep_dir):  # another task may be writing its stamp or plan just now
        temporaries = {p.name for p in sweep_dir.iterdir() if p.name.startswith(".tmp-")}
        claim_job_folder(sweep_dir, _SWEEP_FILES | temporaries)
    found = _read_plan(sweep_dir)
    if found is not None and found.get("overrides") != overrides:
        raise _another_sweep(sweep_dir, found, "another command")


@dataclass(frozen=True)
class JobClaim:
    """What a task found in a job's folder (`claim_job`) and the value that goes with it."""

    state: str
    value: Any = None


def claim_job(job_dir: Path, command: list[str]) -> JobClaim:
    """Take a job's folder for this task (its lock held until `release_run_folder`) and say what
    to do with it: `start`, `resume`, `completed` (lock released; the value the job returned),
    or `held` (a live process holds the folder; its holder named). A folder that breakhis-ft did
    not stamp is refused (RunFolderError)."""
    if not job_dir.is_dir() or not any(job_dir.iterdir()):
        stamp_run_folder(job_dir)  # new or empty: ours from now on
    elif not is_run_folder(job_dir):
        claim_job_folder(job_dir, set())  # refuses, naming what is there
    try:
        lock_run_folder(job_dir, command)
    except RunFolderError as err:
        return JobClaim("held", str(err))
    info = read_run_info(job_dir)
    if info.get("status") == "completed":
        release_run_folder(job_dir)
        return JobClaim("completed", info.get("value"))
    return JobClaim("resume" if info else "start")


def resume_job_config(sweep_config: DictConfig, job_dir: Path) -> DictConfig:
    """A job to continue in its folder, as `resume=` continues a run: its saved config (checked as
    data), `resume` set to the folder, Hydra's settings of this sweep with nothing written to its
    `.hydra/` (the record of its first start stays)."""
    saved = load_saved_config(job_dir / ".hydra" / "config.yaml")
    config = OmegaConf.create({**saved, "resume": str(job_dir)})
    with open_dict(config):
        config.hydra = sweep_config.hydra
    with read_write(config.hydra):  # Hydra's settings are read-only
        config.hydra.sweep.dir = str(job_dir.parent)
        config.hydra.sweep.subdir = job_dir.name
        config.hydra.output_subdir = None
    return config
