"""launcher=array: the tasks of an array job (Cloud Run jobs and the like) share one sweep, each
running its share into one sweep folder, as a local `-m` of the same command would; a retried task
skips completed jobs and continues started ones (issue 24).

The fast tests run jobs that only prepare the data (train=false test=false: no torch, a second
each); the slow ones train, kill a task with SIGKILL mid-job and retry it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.cli_runs import FAST, REPO, cli_env, read_metrics, run_cli

from breakhis_ft.analysis.runs import find_runs, load_run
from breakhis_ft.run.array import ArrayError, array_task, sweep_name
from breakhis_ft.run.ownership import lock_run_folder, release_run_folder

SWEEP = ["peft.r=4,8", "trainer.lr=1e-3,5e-4"]  # the demo sweep: 4 jobs
DATA_ONLY = [
    "train=false",
    "test=false",
    "logger=none",
    "data.synthetic_fraction=0.03",
    "data.synthetic_size=[48,32]",
]
# what -m gives each job (BasicSweeper's order: the last parameter varies fastest)
EXPECTED = {
    "job0": ["peft.r=4", "trainer.lr=0.001"],
    "job1": ["peft.r=4", "trainer.lr=0.0005"],
    "job2": ["peft.r=8", "trainer.lr=0.001"],
    "job3": ["peft.r=8", "trainer.lr=0.0005"],
}


def _task_env(index: int, count: int = 2, execution: str = "exec-1", **extra: str) -> dict:
    """A Cloud Run task's variables (as the service sets them for task `index` of `count`)."""
    return {
        "CLOUD_RUN_TASK_INDEX": str(index),
        "CLOUD_RUN_TASK_COUNT": str(count),
        "CLOUD_RUN_EXECUTION": execution,
        **extra,
    }


def _start(args: list[str], cache: Path, log: Path, env: dict) -> subprocess.Popen:
    """Start `python -m breakhis_ft` as a task, its output into `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "breakhis_ft", *args],
            cwd=REPO,
            env=cli_env(cache, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return log.read_text()


def _jobs(sweep: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(sweep.glob("job*")) if p.is_dir()}


def _config(job: Path, out: Path) -> str:
    """The job's composed config, its output folder written as OUT."""
    return (job / ".hydra" / "config.yaml").read_text().replace(str(out), "OUT")


def _overrides(job: Path) -> list[str]:
    saved = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return [o for o in saved if o.split("=")[0] in ("peft.r", "trainer.lr")]


@pytest.mark.parametrize(
    ("environ", "given", "expected"),
    [
        (_task_env(1, 4), (None, None), (1, 4)),
        ({"JOB_COMPLETION_INDEX": "2"}, (None, 3), (2, 3)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4"} | {
            "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}, (None, None), (3, 4)),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "5"}, (None, None), (0, 5)),
        ({}, (1, 2), (1, 2)),
        ({"JOB_COMPLETION_INDEX": "2"}, (None, None), "hydra.launcher.task_count=N"),
        (_task_env(2, 2), (None, None), "the index must be 0 to count - 1"),
    ],
)  # fmt: skip
def test_each_scheduler_numbers_the_tasks(environ, given, expected) -> None:
    if isinstance(expected, str):
        with pytest.raises(ArrayError, match=re.escape(expected)):
            array_task(environ, *given)
    else:
        task = array_task(environ, *given)
        assert (task.index, task.count) == expected
        assert [n for n in range(12) if task.runs(n)] == list(range(expected[0], 12, expected[1]))


def test_the_sweep_name_comes_from_the_execution_never_the_clock() -> None:
    assert sweep_name({"CLOUD_RUN_EXECUTION": "job-x7k2p"}, None) == "job-x7k2p"
    assert sweep_name({"SLURM_ARRAY_JOB_ID": "4242"}, None) == "4242"
    assert sweep_name({"AWS_BATCH_JOB_ID": "a1b2-c3:7"}, None) == "a1b2-c3"  # a child's :index
    assert sweep_name({"CLOUD_RUN_EXECUTION": "e"}, "mine") == "mine"
    with pytest.raises(ArrayError, match="hydra.launcher.sweep_name=NAME"):
        sweep_name({}, None)
    with pytest.raises(ArrayError, match="one folder name"):
        sweep_name({}, "../up")


def test_plan_only_counts_the_jobs_and_runs_none(module_cache, tmp_path) -> None:
    done = run_cli(
        [
            "-m",
            "launcher=array",
            *SWEEP,
            "hydra.launcher.plan_only=true",
            "hydra.launcher.sweep_name=s1",
            "hydra.launcher.task_count=3",
            f"paths.output_dir={tmp_path}",
        ],
        module_cache,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "default" / "s1"
    assert f"4 jobs for 3 tasks; plan: {sweep / 'sweep_plan.json'}" in done.stdout
    plan = json.loads((sweep / "sweep_plan.json").read_text())
    assert plan["n_jobs"] == 4 and plan["task_count"] == 3
    jobs = plan["jobs"]
    assert [(j["num"], j["folder"], j["task"]) for j in jobs] == [
        (0, "job0", 0),
        (1, "job1", 1),
        (2, "job2", 2),
        (3, "job3", 0),
    ]
    assert [[o for o in j["overrides"] if o[:4] in ("peft", "trai")] for j in jobs] == list(
        EXPECTED.values()
    )
    assert not _jobs(sweep), "plan_only runs no job"


@pytest.mark.parametrize(
    ("extra", "env", "refusal"),
    [
        ([], {}, "this process was given no task index"),
        ([], _task_env(0, execution=""), "none of CLOUD_RUN_EXECUTION"),
        (["hparams_search=lora_optuna"], _task_env(0), "chooses its jobs as results come in"),
        (["hydra.launcher.task_index=1"], _task_env(0), "but Cloud Run (CLOUD_RUN_TASK_INDEX)"),
    ],
    ids=["no-task", "no-sweep-name", "optuna", "two-indexes"],
)
def test_array_refuses_what_it_cannot_share(module_cache, tmp_path, extra, env, refusal) -> None:
    done = run_cli(
        ["-m", "launcher=array", *SWEEP, *extra, f"paths.output_dir={tmp_path}"],
        module_cache,
        timeout=120,
        **env,
    )
    assert done.returncode != 0 and refusal in done.stderr, done.stderr[-3000:]
    assert "Nothing was run" in done.stderr or "leave hydra.launcher.task_index out" in done.stderr
    assert not (tmp_path / "sweeps").exists() or not list(tmp_path.rglob("job*"))


def test_two_tasks_share_the_sweep_of_a_local_multirun(module_cache, tmp_path) -> None:
    """Two tasks started at once write the four jobs of a local -m of the same command, with
    its folders and configs; retried, a task continues an interrupted job with resume='s record,
    leaves a job a live process holds, and runs no completed job again."""
    from breakhis_ft.analysis.sweep_progress import progress_lines

    local, shared = tmp_path / "local", tmp_path / "shared"
    done = run_cli(["-m", *DATA_ONLY, *SWEEP, f"paths.output_dir={local}"], module_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    (reference,) = (local / "sweeps" / "default").iterdir()
    args = ["-m", "launcher=array", *DATA_ONLY, *SWEEP, f"paths.output_dir={shared}"]
    logs = [tmp_path / f"task{i}.log" for i in (0, 1)]
    tasks = [_start(args, module_cache, logs[i], _task_env(i)) for i in (0, 1)]
    outputs = [_finish(task, log) for task, log in zip(tasks, logs, strict=True)]
    sweep = shared / "sweeps" / "default" / "exec-1"
    jobs = _jobs(sweep)
    assert list(jobs) == list(_jobs(reference)) == list(EXPECTED)
    for name, job in jobs.items():
        assert _overrides(job) == EXPECTED[name]
        assert _config(job, shared) == _config(reference / name, local)
        assert (job / "splits.csv").read_text() == (reference / name / "splits.csv").read_text()
        assert json.loads((job / "run_info.json").read_text())["status"] == "completed"
    assert "jobs 0, 2 of 4" in outputs[0] and "jobs 1, 3 of 4" in outputs[1]

    # a retry: job1 as a SIGTERM leaves it, job3 held by a live process (this one)
    info1 = json.loads((jobs["job1"] / "run_info.json").read_text())
    (jobs["job1"] / "run_info.json").write_text(json.dumps({**info1, "status": "interrupted"}))
    saved1 = (jobs["job1"] / ".hydra" / "config.yaml").read_text()
    lock_run_folder(jobs["job3"])
    try:
        retry = run_cli(args, module_cache, **_task_env(1, CLOUD_RUN_TASK_ATTEMPT="1"))
    finally:
        release_run_folder(jobs["job3"])
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "left to the process that runs it" in retry.stdout  # Hydra logs on stdout
    info1 = json.loads((jobs["job1"] / "run_info.json").read_text())
    assert info1["status"] == "completed" and len(info1["history"]) == 1
    assert info1["history"][0]["previous"]["status"] == "interrupted"
    assert (jobs["job1"] / ".hydra" / "config.yaml").read_text() == saved1  # its record kept
    before = {n: (j / "run_info.json").read_text() for n, j in jobs.items()}
    again = run_cli(args, module_cache, **_task_env(1, CLOUD_RUN_TASK_ATTEMPT="2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("completed before, not run again") == 2
    assert {n: (j / "run_info.json").read_text() for n, j in jobs.items()} == before

    # the report while a task runs: job2 running (its folder held), job0's task killed, job3 not
    # started
    for name in ("job0", "job2"):
        info = json.loads((jobs[name] / "run_info.json").read_text())
        (jobs[name] / "run_info.json").write_text(json.dumps({**info, "status": "running"}))
    (jobs["job3"] / "run_info.json").unlink()
    lock_run_folder(jobs["job2"])
    try:
        runs = [load_run(p) for p in find_runs([sweep])]
        lines = progress_lines(sweep, runs)
    finally:
        release_run_folder(jobs["job2"])
    statuses = {r.path.name: r.status for r in runs}
    assert statuses == {
        "job0": "stopped",
        "job1": "completed",
        "job2": "running",
        "job3": "unknown",
    }
    assert "1 completed, 1 running, 1 stopped, 1 not started" in "\n".join(lines)
    assert [
        line.split(" | ")[2]
        for line in lines
        if line.startswith("| job") and not line.startswith("| job |")
    ] == [
        "stopped",
        "running",
        "not started",
    ]


def _wait_for(path_glob: str, root: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while not list(root.glob(path_glob)):
        assert proc.poll() is None, f"the task ended before {path_glob}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    "size",
    [
        [*FAST, "logger.mode=offline"],
        ["experiment=demo", "logger.mode=offline", "trainer.max_steps=6"],
    ],
    ids=["tiny", "demo"],
)
def test_killed_task_retried_finishes_the_sweep_of_a_local_multirun(tmp_path, size) -> None:
    """The issue's check: two tasks at once, task 1 SIGKILLed mid-job and started again with
    CLOUD_RUN_TASK_ATTEMPT=1; the four jobs' configs and metrics are a local -m's, task 1's
    completed job is not run again, and every job is in the W&B group of the sweep's name."""
    cache, local, shared = tmp_path / "cache", tmp_path / "local", tmp_path / "shared"
    common = [*size, *SWEEP, "trainer.checkpoint_every_steps=1"]
    done = run_cli(["-m", *common, f"paths.output_dir={local}"], cache, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    (reference,) = local.glob("sweeps/*/*")
    args = ["-m", "launcher=array", *common, f"paths.output_dir={shared}"]
    logs = [tmp_path / f"task{i}.log" for i in (0, 1, 2)]
    task0 = _start(args, cache, logs[0], _task_env(0))
    task1 = _start(args, cache, logs[1], _task_env(1))
    checkpoint = "sweeps/*/exec-1/job3/checkpoints/step_000002/trainer_state.json"
    _wait_for(checkpoint, shared, task1, logs[1])
    (sweep,) = shared.glob("sweeps/*/exec-1")
    assert load_run(sweep / "job3").status == "running"  # its task holds the folder
    task1.send_signal(signal.SIGKILL)
    task1.wait()
    assert not (sweep / "job3" / "metrics.json").exists(), "killed too late: job3 had finished"
    _finish(task0, logs[0])
    assert load_run(sweep / "job3").status == "stopped"
    job1_metrics = (sweep / "job1" / "metrics.json").stat().st_mtime_ns
    retry = _start(args, cache, logs[2], _task_env(1, CLOUD_RUN_TASK_ATTEMPT="1"))
    out = _finish(retry, logs[2])
    assert "completed before, not run again" in out and "started before, continued" in out
    assert (sweep / "job1" / "metrics.json").stat().st_mtime_ns == job1_metrics
    history = json.loads((sweep / "job3" / "run_info.json").read_text())["history"]
    assert len(history) == 1 and history[0]["from_step"] >= 2
    for name, job in _jobs(sweep).items():
        assert _config(job, shared) == _config(reference / name, local)
        assert read_metrics(job) == read_metrics(reference / name), name
        wandb = json.loads((job / "run_info.json").read_text())["wandb"]
        local_wandb = json.loads((reference / name / "run_info.json").read_text())["wandb"]
        assert wandb["group"] == f"{sweep.parent.name}/exec-1"  # one group for every task
        assert wandb["name"] == local_wandb["name"]
    assert sorted(_jobs(sweep)) == list(EXPECTED)
