"""hparams_search=lora_optuna with a shared storage: processes started with the same command share
one Optuna study, n_trials in all, each trial run once, in a folder numbered by the trial (issue
24). Fast: two processes of a Hydra app whose trials cost nothing; slow: two searches of
breakhis-ft at tiny settings."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.cli_runs import FAST, REPO, cli_env

optuna = pytest.importorskip("optuna", reason="the optuna extra")

SHARED_SWEEPER = "hydra_plugins.breakhis_ft_plugins.shared_study_sweeper.SharedStudySweeper"


def _start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def _check_study(db: Path, sweep: Path, logs: list[Path], n_trials: int) -> optuna.Study:
    """n_trials completed trials in the study, distinct, each run once by one of the processes
    in its own job<trial number> folder; one best result, the study's."""
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in done) == list(range(n_trials))
    unrun = [t for t in study.trials if t not in done]
    assert all("breakhis_ft" in t.user_attrs for t in unrun), "only trials asked past n_trials"
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == n_trials, "each process drew its own trials"
    assert sorted(p.name for p in sweep.glob("job*")) == [f"job{n}" for n in range(n_trials)]
    for t in done:
        saved = yaml.safe_load((sweep / f"job{t.number}" / ".hydra" / "overrides.yaml").read_text())
        assert {o.split("=")[0]: o.split("=")[1] for o in saved if o.split("=")[0] in t.params} == {
            k: str(v) for k, v in t.params.items()
        }
    ran = [sorted(int(line.split("#")[1].split(" ")[0]) for line in log.read_text().splitlines()
                  if "\t#" in line) for log in logs]  # fmt: skip
    assert sorted(ran[0] + ran[1]) == list(range(n_trials)) and all(ran), ran
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number
    assert best["best_value"] == pytest.approx(study.best_value)
    return study


def test_two_processes_share_one_study_of_four_trials(tmp_path) -> None:
    db, sweep, go = tmp_path / "study.db", tmp_path / "sweep", tmp_path / "go"
    argv = [
        sys.executable,
        str(REPO / "tests" / "shared_study_app.py"),
        "-m",
        "hydra/sweeper=optuna",
        f"hydra.sweeper._target_={SHARED_SWEEPER}",
        f"hydra.sweeper.storage=sqlite:///{db}",
        "hydra.sweeper.study_name=shared",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.seed=7",  # one seed in both: they must not draw the same trials
        "x=interval(0,1)",  # the search space, as the command line gives it
        "y=choice(1,2,3)",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=job${hydra.job.num}",  # as breakhis-ft's train.yaml names them
    ]
    env = cli_env(tmp_path / "cache", GO_FILE=str(go))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(argv, log, env) for log in logs]
    deadline = time.monotonic() + 120
    while sum("\t#" in log.read_text() for log in logs) < 2:  # both have a trial
        assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    _check_study(db, sweep, logs, 4)


@pytest.mark.slow
def test_two_breakhis_ft_searches_share_one_study(tmp_path) -> None:
    db, sweep = tmp_path / "study.db", tmp_path / "sweep"
    argv = [
        sys.executable,
        "-m",
        "breakhis_ft",
        "model=tiny_siglip",
        "logger=none",
        *FAST,
        "trainer.max_steps=2",
        "hparams_search=lora_optuna",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage=sqlite:///{db}",
        "hydra.sweeper.study_name=shared",
        f"hydra.sweep.dir={sweep}",
        f"paths.output_dir={tmp_path}",
    ]
    env = cli_env(tmp_path / "cache")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(argv, log, env) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=1800) == 0, log.read_text()[-3000:]
    _check_study(db, sweep, logs, 4)
