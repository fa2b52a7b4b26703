"""Nothing lost, nothing deleted: the user's model folder, SIGTERM, resume's record, bad files,
concurrent tiny builds, W&B without network, secrets."""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from helpers.cli_runs import FAST, read_metrics, run_cli, run_info, single_run_dir, start_cli
from omegaconf import OmegaConf

from breakhis_ft.config import LoggerConfig
from breakhis_ft.engine.stop import RunInterrupted
from breakhis_ft.errors import ModelLoadError
from breakhis_ft.models.tiny_checkpoint import RECIPE_FILE, ensure_checkpoint, stored_digest
from breakhis_ft.run.run_folder import record_resume, write_run_info
from breakhis_ft.run.secrets import mask_secrets
from breakhis_ft.run.tracking import RunTracker, TrackedJob


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fake_checkpoint(folder: Path) -> Path:
    """A user's model folder: a Gemma 3 config.json and a safetensors file."""
    from safetensors.torch import save_file
    from torch import ones

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    save_file({"weight": ones(3, 2)}, str(folder / "model.safetensors"))
    return folder


def test_the_tiny_build_never_replaces_a_user_model_folder(first_run, tmp_path: Path) -> None:
    """`model.name_or_path=<my folder>` with the default (tiny, build_tiny) model group."""
    _, cache = first_run  # its replica is reused
    folder = _fake_checkpoint(tmp_path / "my_medgemma")
    before = _files(folder)
    args = [f"model.name_or_path={folder}", "logger=none", *FAST]
    done = run_cli([*args, f"paths.output_dir={tmp_path / 'out'}"], cache)
    assert done.returncode != 0
    assert f"{folder} is outside the project's model cache" in done.stderr
    assert f"model=medgemma_4b_it model.name_or_path={folder}" in done.stderr  # the fix
    assert _files(folder) == before
    assert run_info(single_run_dir(tmp_path / "out"))["status"] == "failed"


def test_a_folder_in_the_cache_without_the_build_stamp_is_left_alone(tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path / "models" / "tiny_gemma3")
    before = _files(folder)
    with pytest.raises(ModelLoadError, match=f"{folder} exists and was not built by breakhis-ft"):
        ensure_checkpoint(folder, "digest", lambda p: pytest.fail("built"), tmp_path / "models")
    assert _files(folder) == before


def _counted_build(folder: Path, log: Path) -> None:
    from breakhis_ft.models.tiny_siglip import build_tiny_siglip

    with log.open("a") as f:  # one line per build that ran
        f.write(f"{os.getpid()}\n")
    build_tiny_siglip(folder)


def _first_build(barrier, path: Path, root: Path, log: Path) -> None:
    from breakhis_ft.models.tiny_siglip import recipe_hash

    barrier.wait()  # all start together: the race of the issue (2 of 16 crashed)
    ensure_checkpoint(path, recipe_hash(), functools.partial(_counted_build, log=log), root)


def test_concurrent_first_builds_build_once_and_all_succeed(tmp_path: Path) -> None:
    """12 processes ask for the same missing tiny SigLIP at once: one builds, under the lock, the
    others wait and use its copy (without the lock all 12 built and raced to swap theirs in)."""
    from transformers import SiglipModel

    from breakhis_ft.models.tiny_siglip import recipe_hash

    n, root, log = 12, tmp_path / "models", tmp_path / "builds.log"
    path = root / "tiny_siglip"
    ctx = multiprocessing.get_context("fork")  # torch and transformers are imported once
    barrier = ctx.Barrier(n)
    args = (barrier, path, root, log)
    procs = [ctx.Process(target=_first_build, args=args) for _ in range(n)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0] * n
    assert len(log.read_text().split()) == 1, "more than one process built the checkpoint"
    assert stored_digest(path) == recipe_hash()
    assert {"config.json", "model.safetensors", RECIPE_FILE} <= set(_files(path))
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []
    SiglipModel.from_pretrained(path)


def _logged_a_train_step(parent: Path) -> bool:
    for path in parent.rglob("metrics.jsonl"):
        if '"train/loss"' in path.read_text():
            return True
    return False


def _sigterm_after_the_first_update(logger: str, cache: Path, tmp_path: Path) -> Path:
    """Start the first run's configuration (W&B `logger`), SIGTERM it once it logged a training
    step, check that it ended as interrupted with its checkpoint; its run folder."""
    out = tmp_path / "out"
    args = ["model=tiny_gemma3", logger, *FAST, "trainer.log_every_steps=1"]
    proc = start_cli([*args, f"paths.output_dir={out}"], cache, tmp_path / "log.txt")
    deadline = time.monotonic() + 600
    while not _logged_a_train_step(out):
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "log.txt").read_text()[-3000:]
    run_dir = single_run_dir(out)
    info = run_info(run_dir)
    assert (info["status"], info["signal"]) == ("interrupted", "SIGTERM")
    step = info["step"]
    assert 1 <= step < 4, "stopped too late: the run had finished training"
    assert (run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").is_file()
    assert not (run_dir / "metrics.json").exists()
    return run_dir


def test_sigterm_then_resume_ends_with_the_uninterrupted_metrics(first_run, tmp_path) -> None:
    """The fast tier's SIGTERM + resume (the slow test below also checks W&B and the record):
    SIGTERM after the first update, exit 143 with a checkpoint, resume= to the first run's
    metrics."""
    uninterrupted, cache = first_run
    run_dir = _sigterm_after_the_first_update("logger=none", cache, tmp_path)
    done = run_cli([f"resume={run_dir}"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_info(run_dir)["status"] == "completed"
    assert read_metrics(run_dir) == read_metrics(uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(first_run, tmp_path) -> None:
    """SIGTERM mid-training: exit 143, status interrupted at step N with its checkpoint; resume=
    leaves .hydra/ as it was, lists itself in the history, continues the W&B run, logs no step
    twice and ends with the metrics of the uninterrupted run."""
    uninterrupted, cache = first_run
    run_dir = _sigterm_after_the_first_update("logger.mode=offline", cache, tmp_path)
    info = run_info(run_dir)
    step = info["step"]
    record, wandb_id = _files(run_dir / ".hydra"), info["wandb"]["id"]

    done = run_cli([f"resume={run_dir}"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert single_run_dir(tmp_path / "out") == run_dir and _files(run_dir / ".hydra") == record
    resumed = run_info(run_dir)
    assert resumed["status"] == "completed" and "signal" not in resumed
    assert resumed["command"] == info["command"]  # the original command stays
    (entry,) = resumed["history"]
    assert entry["from_step"] == step and f"resume={run_dir}" in entry["command"]
    assert entry["previous"] == {k: info[k] for k in ("status", "step", "signal", "end_time")}
    assert read_metrics(run_dir) == read_metrics(uninterrupted)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], key) for row in rows for key in row if key != "step"]
    assert len(logged) == len(set(logged)), "a step logged twice"
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4]
    assert resumed["wandb"]["id"] == wandb_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{wandb_id}") for name in offline)


def test_interruptions_exit_as_a_shell_reports_the_signal() -> None:
    assert RunInterrupted(5, "SIGTERM").exit_code == 143
    assert RunInterrupted(None, "SIGINT").exit_code == 130
    assert isinstance(RunInterrupted(5, "SIGTERM"), KeyboardInterrupt)


def test_resume_keeps_the_metrics_up_to_its_checkpoint_once(tmp_path: Path) -> None:
    """A run killed at step 5 with its last checkpoint at step 3: steps 4-5 are logged again."""
    rows = [{"step": 0, "model/parameters": 10}]
    rows += [{"step": s, "train/loss": 1.0 / s} for s in range(1, 6)] + [{"step": 3, "val/f1": 0.5}]
    lines = [json.dumps(r) for r in rows] + ['{"step": 6, "train/lo']  # cut short by the kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    logger = OmegaConf.structured(LoggerConfig(kind="none", mode="disabled"))
    tracker = RunTracker(tmp_path, TrackedJob({}, "run", "group"), logger, resume_step=3)
    tracker.log({"model/parameters": 10}, 0)  # a resumed run logs its size again: kept once
    tracker.log({"train/loss": 0.3, "val/f1": 0.6}, 4)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [*rows[:4], rows[6], {"step": 4, "train/loss": 0.3, "val/f1": 0.6}]


def test_each_resume_is_appended_to_the_history(tmp_path: Path) -> None:
    write_run_info(tmp_path, "running")
    first = write_run_info(tmp_path, "interrupted", step=7, signal="SIGTERM")
    record_resume(tmp_path, 7)
    write_run_info(tmp_path, "failed")
    info = record_resume(tmp_path, 9)
    assert info["command"] == first["command"] and info["start_time"] == first["start_time"]
    assert [h["from_step"] for h in info["history"]] == [7, 9]
    assert info["history"][0]["previous"]["signal"] == "SIGTERM"
    assert info["history"][1]["previous"]["status"] == "failed"
    assert info["status"] == "running" and "step" not in info and "end_time" not in info


def test_secret_looking_keys_are_masked_everywhere_they_appear() -> None:
    config = {
        "hf_token": "abc",
        "logger": {"api_key": 123, "Password": "x", "apiKey": "y", "project": "p"},
        "model": {"max_new_tokens": 40, "pad_token_id": 0},  # config keys, not secrets
        "exclude_keys": ["seed"],
        "overrides": ["+hf_token=abc", "trainer.lr=0.1", "hydra.job.env_set.WANDB_API_KEY=k"],
        "override_dirname": "+my_secret_id=s,model.max_new_tokens=8",
    }
    assert mask_secrets(config) == {
        "hf_token": "***",
        "logger": {"api_key": "***", "Password": "***", "apiKey": "***", "project": "p"},
        "model": {"max_new_tokens": 40, "pad_token_id": 0},
        "exclude_keys": ["seed"],
        "overrides": ["+hf_token=***", "trainer.lr=0.1", "hydra.job.env_set.WANDB_API_KEY=***"],
        "override_dirname": "+my_secret_id=***,model.max_new_tokens=8",
    }


@pytest.fixture
def wandb_teardown():
    """W&B keeps process-wide settings (WANDB_DIR, the mode) after a first init: later tests in
    this process get a fresh W&B."""
    yield
    import wandb

    wandb.teardown()


def _tracker(run_dir: Path, **logger: object) -> RunTracker:
    cfg = OmegaConf.structured(LoggerConfig(**logger))
    return RunTracker(run_dir, TrackedJob({"a": 1}, "run", "group"), cfg)


def test_wandb_online_without_network_goes_on_offline_with_one_line(
    tmp_path: Path, monkeypatch, caplog, wandb_teardown
) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port: no server
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.run.tracking"):
        tracker = _tracker(tmp_path, mode="online", init_timeout=2)
    try:
        assert tracker.wandb_run is not None
        assert run_info(tmp_path)["wandb"]["mode"] == "offline"
        lines = [r.getMessage() for r in caplog.records if "continues offline" in r.getMessage()]
        assert len(lines) == 1 and f"wandb sync {tmp_path}/wandb/offline-run-*" in lines[0]
        assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    finally:
        tracker.finish()


@pytest.mark.parametrize(("env", "expected"), [("disabled", None), ("offline", "offline")])
def test_wandb_mode_from_the_environment_wins(
    tmp_path: Path, monkeypatch, env, expected, wandb_teardown
) -> None:
    monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # online would fail: it is not
    tracker = _tracker(tmp_path, mode="online", init_timeout=2)
    tracker.finish()
    if expected is None:
        assert not (tmp_path / "wandb").exists() and not (tmp_path / "run_info.json").exists()
    else:
        assert run_info(tmp_path)["wandb"]["mode"] == expected
        assert not list((tmp_path / "wandb").glob("run-*"))  # no online attempt


def _damaged_copy(replica_root: Path, dest: Path) -> tuple[str, str]:
    """A copy of the replica with one truncated and one empty PNG; their names."""
    shutil.copytree(replica_root, dest)
    pngs = sorted(dest.rglob("*.png"))
    truncated, empty = pngs[3], pngs[-3]
    truncated.write_bytes(truncated.read_bytes()[:100])
    empty.write_bytes(b"")
    return truncated.name, empty.name


@pytest.mark.slow
def test_bad_files_are_skipped_or_named_before_any_model_loads(replica_root, tmp_path) -> None:
    truncated, empty = _damaged_copy(replica_root, tmp_path / "data")
    common = ["data=breakhis", f"data.root={tmp_path / 'data'}", "model=tiny_siglip", "peft=none"]
    common += ["logger=none", "data.image_size=32", "trainer.max_steps=2", "precision=fp32"]
    error = [*common, "data.on_bad_file=error", f"paths.output_dir={tmp_path / 'out_error'}"]
    done = run_cli(error, tmp_path / "cache_error")
    assert done.returncode != 0
    assert f"{truncated}: corrupt or truncated PNG" in done.stderr
    assert f"{empty}: empty file" in done.stderr
    assert not (tmp_path / "cache_error" / "models").exists(), "a model was built first"

    out = tmp_path / "out"
    skip = [*common, "data.on_bad_file=skip", f"paths.output_dir={out}"]
    done = run_cli(skip, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = single_run_dir(out)
    listed = (run_dir / "bad_files.csv").read_text()
    assert f"{truncated}," in listed and "corrupt or truncated PNG" in listed
    assert f"{empty}," in listed and "empty file (0 bytes)" in listed
    assert truncated not in (run_dir / "splits.csv").read_text()
    assert read_metrics(run_dir)["test"]["n"] > 0
