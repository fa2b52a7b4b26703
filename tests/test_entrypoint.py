"""The single entrypoint: composition, validation errors, run folders, W&B offline, reproduction."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from breakhis_ft.config import register_configs
from breakhis_ft.errors import ConfigError
from breakhis_ft.validate import validate_config

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
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


def compose_train(overrides: list[str]):
    """Compose conf/train.yaml with overrides, as the entrypoint does."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=False)


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


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    cfg = compose_train([f"experiment={experiment}", "data.root=/data/BreaKHis_v1"])
    validate_config(cfg)
    assert cfg.experiment_name == experiment


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_preset_composes(sweep: str) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={sweep}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params, "a sweep preset must name the parameters it sweeps"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["peft.r=-1"], "peft.r"),
        (["precision=fp16"], "precision"),
        (["split=eva"], "task"),
        (["split=eva", "task=eva4"], "magnification"),
        (["peft=qlora", "precision=fp32"], "precision"),
        (["data=breakhis"], "data.root"),
        (["model=tiny_siglip", "model.zero_shot=true"], "model.zero_shot"),
        (["model=tiny_siglip", "model.freeze_encoder=true"], "model.freeze_encoder"),
        (["trainer.monitor=val/balanced_acc"], "trainer.monitor"),
        (["trainer.scheduler=cosinus"], "trainer.scheduler"),
        (["data.image_size=0"], "data.image_size"),
        (["trainer.epochs=0"], "trainer.epochs"),
        (["model.kind=siglip"], "model.kind"),
    ],
)
def test_bad_values_and_combinations_name_the_key(override: list[str], key: str) -> None:
    cfg = compose_train(override)
    with pytest.raises(ConfigError, match=rf"config error: {key}"):
        validate_config(cfg)


def test_enum_keys_fail_at_compose_time() -> None:
    with pytest.raises(Exception, match="logger.mode=loud") as info:
        compose_train(["logger.mode=loud"])
    assert "Invalid value 'loud', expected one of [online, offline, disabled]" in str(
        info.value.__cause__
    )


def test_a_local_checkpoint_of_another_family_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "siglip"}')
    cfg = compose_train(["model=medgemma_4b_it", f"model.name_or_path={tmp_path}"])
    with pytest.raises(ConfigError, match="is a 'siglip' checkpoint"):
        validate_config(cfg)


def test_qlora_without_bitsandbytes_names_the_extra(monkeypatch) -> None:
    cfg = compose_train(["peft=qlora"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"breakhis-ft\[quant\]"):
        validate_config(cfg)


def test_monitorable_metrics_are_what_the_metrics_produce() -> None:
    import torch

    from breakhis_ft.engine.loop_state import true_class_nll
    from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags
    from breakhis_ft.validate import monitorable

    cfg = compose_train([])
    names = list(cfg.task.classes)
    probs = torch.softmax(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), 1)
    labels = torch.arange(16) % 8
    metrics = compute_metrics(probs, labels, names, ["p"] * 16, None, malignant_flags(names))
    metrics["loss"] = true_class_nll(probs, labels)  # as the recipe's evaluate adds it
    for name in monitorable(cfg):
        value = metrics
        for key in name.split("/")[1:]:
            value = value[key]
        assert isinstance(value, float), name


def test_fp16_is_allowed_when_asked() -> None:
    validate_config(compose_train(["precision=fp16", "precision.allow_fp16=true"]))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["precision=fp8"], "Could not find 'precision/fp8'"),
        (["magnification=50x"], "Could not find 'magnification/50x'"),
        (["trainer.lrr=1"], "Could not override 'trainer.lrr'"),
        (["peft.r=-1"], "config error: peft.r: must be a positive integer"),
    ],
)
def test_cli_rejects_bad_overrides_before_loading(args, expected, tmp_path: Path) -> None:
    done = run_cli([*args, f"paths.output_dir={tmp_path}"], tmp_path / "cache", timeout=120)
    assert done.returncode != 0
    assert expected in done.stderr
    assert not (tmp_path / "cache").exists(), "nothing may be built before the config is valid"


def _single_run_dir(parent: Path) -> Path:
    runs = [p.parent.parent for p in parent.rglob(".hydra/config.yaml")]
    assert len(runs) == 1, runs
    return runs[0]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


RUN_FILES = (
    "run_info.json",
    "splits.csv",
    "data_stats.json",
    "metrics.jsonl",
    "metrics.json",
    "predictions_val.csv",
    "predictions_test.csv",
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny MedGemma run with W&B offline: (run folder, cache folder)."""
    base = tmp_path_factory.mktemp("entry")
    done = run_cli(
        ["model=tiny_gemma3", "logger.mode=offline", *FAST, f"paths.output_dir={base / 'a'}"],
        base / "cache",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (base / "first_run.stdout").write_text(done.stdout)  # what the terminal showed
    return _single_run_dir(base / "a"), base / "cache"


def test_run_folder_is_complete(first_run) -> None:
    run_dir, _ = first_run
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"missing {name}"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "completed" and info["end_time"] and info["git"]["commit"]
    header = (run_dir / "splits.csv").read_text().splitlines()[0]
    assert header == "path,split,label,subtype,patient,stem,magnification"
    test = _metrics(run_dir)["test"]
    assert {
        "accuracy",
        "balanced_accuracy",
        "f1_macro",
        "f1_weighted",
        "auroc_macro",
        "patient_accuracy",
        "per_class",
        "confusion_matrix",
        "classes",
        "binary",
    } <= set(test)


def test_wandb_offline_run_holds_the_config(first_run) -> None:
    run_dir, _ = first_run
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    # offline runs keep the config in the run's record log (protobuf with JSON values)
    log = next(offline[0].glob("run-*.wandb")).read_bytes()
    assert b'"name_or_path":"' in log and b"tiny_gemma3" in log
    assert b"experiment_name" in log and b"optimized_metric" in log
    assert b"HF_TOKEN" not in log and b"WANDB_API_KEY" not in log


def test_terminal_shows_config_evaluations_and_ends_with_the_summary(first_run) -> None:
    run_dir, _ = first_run
    out = (run_dir.parents[3] / "first_run.stdout").read_text()
    lines = out.rstrip().splitlines()
    assert lines[0].startswith("config (") and "model=tiny_gemma3" in lines[0]
    assert any(line.startswith("├── model (tiny_gemma3): kind=medgemma") for line in lines)
    assert re.search(r"eval step 4: val/balanced_accuracy \d\.\d{4} \(new best\), val/loss", out)
    assert "training 16,384 of" in out  # what trains, said once by the training run
    # accelerate's checkpoint lines stay in the log file, off the console
    assert "Saving current state" not in out and ".tmp-step_" not in out
    log_file = (run_dir / "breakhis-ft.log").read_text()
    assert "Saving current state" in log_file and "├── model (tiny_gemma3)" in log_file
    rule = "-" * 100
    assert lines[-1] == rule
    rules = [i for i, line in enumerate(lines) if line == rule]
    block = lines[rules[-2] :]  # the last block, between its two rules
    test = _metrics(run_dir)["test"]
    expected = [
        rule,
        f"breakhis-ft: run finished, metrics of the best model ({run_dir})",
        f"  val (n={_metrics(run_dir)['val']['n']}): ",
        f"  test (n={test['n']}): balanced_accuracy {test['balanced_accuracy']:.4f}; ",
        "  best step: 4 (val/balanced_accuracy ",
        f"  run folder: {run_dir}",
        f"  compare: python scripts/report.py {run_dir}",
        f"  predict: python scripts/predict.py {run_dir} IMAGES --out predictions.csv",
        rule,
    ]
    assert len(block) == len(expected)
    for line, start in zip(block, expected, strict=True):
        assert line.startswith(start), (line, start)


def test_wandb_offline_run_read_back_has_headline_history_and_tables(first_run) -> None:
    from wandb_records import history_keys, records, run_summary

    run_dir, _ = first_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    keys = history_keys(records(offline))
    assert len(keys) < 40, sorted(keys)
    assert {
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "train/grad_norm",
        "val/loss",
        "val/balanced_accuracy",
        "val/binary/auroc",
    } <= keys
    assert not [k for k in keys if "/per_class/" in k or "/by_magnification/" in k]
    for split in ("val", "test"):
        tables = {"per_class", "by_magnification", "binary", "confusion_matrix_table"}
        assert {f"{split}/{t}" for t in tables} <= keys
    assert not [k for k in keys if k.startswith("plots/confusion")]  # W&B's chart only
    state = run_summary(offline)
    assert state["state"] == "finished"
    test = _metrics(run_dir)["test"]
    summary = state["summary"]
    assert summary["test/balanced_accuracy"] == pytest.approx(test["balanced_accuracy"])
    assert summary["test/per_class/adenosis/support"] == test["per_class"]["adenosis"]["support"]
    assert summary["test/binary"]["_type"] == "table-file"
    table = json.loads((offline / "files" / summary["test/per_class"]["path"]).read_text())
    mags = test["by_magnification"]
    assert table["columns"] == ["magnification", "class", "precision", "recall", "f1", "support"]
    assert len(table["data"]) == 8 * (1 + len(mags)) and len(mags) == 4
    hydra = state["config"]["hydra"]
    assert hydra["overrides"][:2] == ["model=tiny_gemma3", "logger.mode=offline"]
    assert hydra["job_num"] is None and hydra["choices"]["model"] == "tiny_gemma3"


def test_same_command_twice_gives_identical_metrics(first_run, tmp_path: Path) -> None:
    run_dir, cache = first_run
    done = run_cli(
        ["model=tiny_gemma3", "logger=none", *FAST, f"paths.output_dir={tmp_path}"], cache
    )
    assert done.returncode == 0, done.stderr[-3000:]
    second = _single_run_dir(tmp_path)
    assert second != run_dir
    assert _metrics(second) == _metrics(run_dir)


def test_rerun_from_folder_gives_identical_metrics_in_a_new_folder(first_run) -> None:
    run_dir, cache = first_run
    done = run_cli([f"rerun={run_dir}", "logger.mode=disabled"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = run_cli([f"rerun={run_dir}", "logger=none"], cache, timeout=60)
    assert refused.returncode != 0 and "override its keys instead of logger=none" in refused.stderr
    reruns = sorted(run_dir.parent.glob(f"{run_dir.name}-rerun-*"))
    assert len(reruns) == 1
    assert _metrics(reruns[0]) == _metrics(run_dir)
    assert (run_dir / "metrics.json").stat().st_mtime < (reruns[0] / "metrics.json").stat().st_mtime


def test_multirun_writes_one_complete_folder_per_job(first_run, tmp_path: Path) -> None:
    _, cache = first_run
    done = run_cli(
        [
            "-m",
            "model=tiny_siglip",
            "peft=none",
            "logger=none",
            *FAST,
            "trainer.lr=1e-3,1e-2",
            f"paths.output_dir={tmp_path}",
        ],
        cache,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.parent.parent for p in tmp_path.rglob(".hydra/config.yaml"))
    assert [j.name for j in jobs] == ["job0", "job1"]
    lrs = set()
    for job in jobs:
        for name in RUN_FILES:
            assert (job / name).is_file(), f"{job.name}: missing {name}"
        lrs.add(yaml.safe_load((job / ".hydra/config.yaml").read_text())["trainer"]["lr"])
    assert lrs == {1e-3, 1e-2}


def test_resume_after_sigkill_ends_with_the_uninterrupted_metrics(first_run, tmp_path) -> None:
    run_dir, cache = first_run
    env = {**os.environ, "BREAKHIS_FT_CACHE": str(cache), "WANDB_SILENT": "true"}
    args = [
        "model=tiny_gemma3",
        "logger=none",
        *FAST,
        "trainer.checkpoint_every_steps=1",
        f"paths.output_dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "breakhis_ft", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.rglob("checkpoints/step_000002/trainer_state.json")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _single_run_dir(tmp_path)
    assert not (killed / "metrics.json").exists(), "killed too late: the run had finished"
    done = run_cli([f"resume={killed}"], cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _single_run_dir(tmp_path) == killed, "resume continues in the run's own folder"
    assert _metrics(killed) == _metrics(run_dir)


def test_two_processes_write_one_run_folder(first_run, tmp_path) -> None:
    """DDP over gloo on the CPU: one folder, main-process files only, every image predicted once."""
    _, cache = first_run
    run_dir = tmp_path / "ddp_run"
    env = {**os.environ, "BREAKHIS_FT_CACHE": str(cache), "WANDB_SILENT": "true"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    args = [
        "-m",
        "breakhis_ft.run.cli",
        "model=tiny_gemma3",
        "logger=none",
        *FAST,
        "trainer.cpu=true",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(
        [*torchrun, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp_run"]
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"missing {name}"
    for split in ("val", "test"):
        rows = (run_dir / f"predictions_{split}.csv").read_text().splitlines()[1:]
        paths = [row.split(",")[0] for row in rows]
        split_rows = (run_dir / "splits.csv").read_text().splitlines()[1:]
        expected = sum(1 for row in split_rows if row.split(",")[1] == split)
        assert len(paths) == len(set(paths)) == expected == _metrics(run_dir)[split]["n"]


def test_a_run_folder_is_never_reused(first_run) -> None:
    run_dir, cache = first_run
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    done = run_cli([f"hydra.run.dir={run_dir}", "logger=none"], cache, timeout=60)
    assert done.returncode != 0
    assert f"hydra.run.dir={run_dir} already holds a run" in done.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == saved


def test_a_failing_sweep_job_is_reported_and_its_wandb_run_closed(first_run, tmp_path) -> None:
    _, cache = first_run
    tiny = cache / "models" / "tiny_gemma3"
    done = run_cli(
        [
            "-m",
            "model=tiny_gemma3",
            "model.build_tiny=false",
            f"model.name_or_path={tmp_path / 'missing'},{tiny}",
            "logger.mode=offline",
            *FAST,
            f"paths.output_dir={tmp_path}",
        ],
        cache,
    )
    assert done.returncode != 0 and "no such folder" in done.stderr
    job0, job1 = sorted(tmp_path.rglob("job[01]"))
    status = [json.loads((j / "run_info.json").read_text())["status"] for j in (job0, job1)]
    assert status == ["failed", "completed"]
    # job0's W&B run was finished (exit code 1) before job1's began, not left open until exit
    log0 = (job0 / "wandb" / "debug.log").read_text().splitlines()
    finished = next(line for line in log0 if "finishing run" in line)[:23]
    assert any("got exitcode: 1" in line for line in log0)
    started = (job1 / "wandb" / "debug.log").read_text().splitlines()[0][:23]
    assert finished < started


def test_the_demo_learns_eight_classes_on_held_out_patients(first_run, tmp_path) -> None:
    """The demo at a tenth of the replica: untrained it scores 0.17 / 0.14 balanced accuracy on
    val / test (chance 0.125); trained, 0.45 / 0.34 here on two seeds."""
    _, cache = first_run
    done = run_cli(
        [
            "experiment=demo",
            "logger=none",
            "data.synthetic_fraction=0.1",
            "trainer.epochs=3",
            f"paths.output_dir={tmp_path}",
        ],
        cache,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _metrics(_single_run_dir(tmp_path))
    assert metrics["val"]["balanced_accuracy"] > 0.3
    assert metrics["test"]["balanced_accuracy"] > 0.25
