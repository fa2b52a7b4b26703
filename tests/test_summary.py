"""What the terminal shows (run/summary.py) and what W&B receives beyond the entrypoint's run: the
summary block with intervals, the console filter, the config tree, the model artifact."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from breakhis_ft.config import LoggerConfig
from breakhis_ft.run import summary
from breakhis_ft.run.tracking import RunTracker, TrackedJob, split_tables

METRICS = {
    "val": {"n": 30, "balanced_accuracy": 0.5, "accuracy": 0.6},
    "test": {
        "n": 40,
        "balanced_accuracy": 0.62,
        "balanced_accuracy_ci95": [0.48, 0.75],
        "accuracy": 0.7,
        "f1_macro": None,  # undefined: left out
        "binary": {"accuracy": 0.9, "f1": 0.8, "auroc": None},
    },
}


def test_summary_block_shows_metrics_with_intervals_best_step_and_commands(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "runs" / "demo" / "t1"
    lines = summary.summary_block(run, METRICS, ("val/balanced_accuracy", 0.5, 12)).splitlines()
    assert lines[0] == lines[-1] == "-" * 100
    assert lines[2:6] == [
        "                     val (n=30)               test (n=40)",
        "  balanced_accuracy  0.5000                   0.6200 [0.4800, 0.7500]",
        "  accuracy           0.6000                   0.7000",  # f1_macro undefined: no row
        "  binary accuracy    -                        0.9000",
    ]
    assert lines[6] == "  best step: 12 (val/balanced_accuracy 0.5000)"
    assert lines[7:10] == [
        "  run folder: outputs/runs/demo/t1",  # relative to where the command ran
        "  compare: breakhis-ft-report outputs/runs/demo/t1",
        "  predict: breakhis-ft-predict outputs/runs/demo/t1 IMAGES --out predictions.csv",
    ]
    untrained = summary.summary_block(Path("/elsewhere/run"), METRICS, None)
    assert "best step" not in untrained and "run folder: /elsewhere/run" in untrained


def test_summary_block_names_the_classes_no_interval_covers(tmp_path) -> None:
    fixed = {"fixed_classes": ["adenosis", "lobular_carcinoma"], "unit": "stem"}
    test = {**METRICS["test"], "classes": ["a"] * 8, "interval": fixed}
    block = summary.summary_block(tmp_path, {**METRICS, "test": test}).splitlines()
    assert block[6] == (
        "  intervals leave out the sampling of the classes in one group each (test 2 of 8; "
        "metrics.json interval.fixed_classes)"
    )
    assert "intervals leave out" not in summary.summary_block(tmp_path, METRICS)


@pytest.fixture
def hydra_like_logging(tmp_path):
    """Root logging as Hydra configures it: a console handler and a file handler."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    console = logging.StreamHandler(io.StringIO())
    file = logging.FileHandler(tmp_path / "run.log")
    for handler in (console, file):
        handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root.handlers[:] = [console, file]
    root.setLevel(logging.INFO)
    yield console.stream, tmp_path / "run.log"
    file.close()
    root.handlers[:], root.level = saved[0], saved[1]


def test_console_leaves_checkpoint_lines_to_the_file_and_prints_bare_records(
    hydra_like_logging,
) -> None:
    console, log_file = hydra_like_logging
    summary.configure_console()
    summary.configure_console()  # once per multirun job: idempotent
    logging.getLogger("accelerate.checkpointing").info("Saving current state to x/.tmp-step_1")
    logging.getLogger("accelerate.accelerator").warning("a library's warning")
    logging.getLogger("accelerate.accelerator").error("a library's error")
    logging.getLogger("breakhis_ft.x").info("eval step 1")
    logging.getLogger("breakhis_ft.x").error("a traceback", extra=summary.FILE_ONLY)
    summary.log.info("the block", extra=summary.BARE)
    logging.getLogger().handlers[1].flush()
    shown, kept = console.getvalue(), log_file.read_text()
    assert shown.splitlines() == [  # other libraries' records from ERROR up (third_party.py)
        "[accelerate.accelerator][ERROR] - a library's error",
        "[breakhis_ft.x][INFO] - eval step 1",
        "the block",
    ]
    for line in ("Saving current state to x/.tmp-step_1", "a library's warning", "a traceback"):
        assert line in kept
    assert "[breakhis_ft.run.summary][INFO] - the block" in kept


def test_config_tree_is_compact_and_shows_group_choices() -> None:
    from test_entrypoint import compose_train

    cfg = compose_train(["experiment=demo"])
    text = summary.config_tree(cfg, {"model": "tiny_gemma3", "hydra/launcher": "basic"})
    lines = text.splitlines()
    assert lines[0] == "config (model=tiny_gemma3)"
    assert len(lines) < 50  # the YAML of the same config is about 135 lines
    assert any(line.startswith("├── model (tiny_gemma3): kind=medgemma") for line in lines)
    assert "tags=['demo']" in text  # values are not read as rich markup
    assert "optimizer=adamw" in text and "builder=build_medgemma_classifier" in text


def test_split_tables_hold_per_class_and_per_magnification_with_binary() -> None:
    per_class = {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.6, "support": 2}}
    split = {
        "n": 4,
        "accuracy": 0.5,
        "per_class": per_class,
        "binary": {"accuracy": 0.75, "f1": 0.7, "auroc": None},
        "by_magnification": {"40": {"n": 2, "accuracy": 1.0, "per_class": per_class}},
    }
    tables = {name: (cols, rows) for name, cols, rows in split_tables(split)}
    cols, rows = tables["per_class"]
    assert rows == [["all", "a", 1.0, 0.5, 0.6, 2], ["40", "a", 1.0, 0.5, 0.6, 2]]
    cols, rows = tables["by_magnification"]
    assert rows[1][: cols.index("accuracy") + 1] == ["40", 2, 1.0] and rows[1][-3:] == [None] * 3
    # the split's binary figures: the `all` row's binary columns, no table of their own
    all_row = dict(zip(cols, rows[0], strict=True))
    assert all_row["magnification"] == "all" and all_row["binary_accuracy"] == 0.75
    assert all_row["binary_f1"] == 0.7 and "binary" not in tables
    # every other figure, with its interval, in the statistics table (per class left out)
    cols, rows = tables["statistics"]
    assert cols == ("scope", "metric", "value", "ci_low", "ci_high")
    assert ["image", "accuracy", 0.5, None, None] in rows and [
        "binary",
        "f1",
        0.7,
        None,
        None,
    ] in rows
    assert not [r for r in rows if r[1] in ("precision", "support")]


@pytest.fixture
def fresh_wandb():
    """W&B keeps process-wide settings (WANDB_DIR, the mode) after an init: later tests in this
    process get a fresh W&B."""
    yield
    import wandb

    wandb.teardown()


def test_best_model_logged_as_a_wandb_artifact(tmp_path, monkeypatch, fresh_wandb) -> None:
    from helpers.wandb_records import records

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = OmegaConf.structured(LoggerConfig(mode="offline", log_model="best"))
    tracker = RunTracker(tmp_path, TrackedJob({"seed": 1}, "name", "group"), logger)
    best = tmp_path / "best"
    best.mkdir()
    (best / "adapter_model.safetensors").write_bytes(b"weights")
    tracker.log_model(best, "best", {"step": 3, "monitor": "val/balanced_accuracy"})
    tracker.finish()
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    artifacts = [r["artifact"] for r in records(offline) if r["type"] == "artifact"]
    assert len(artifacts) == 1
    artifact = artifacts[0]
    assert artifact["type"] == "model" and artifact["name"].startswith("model-")
    assert "best" in artifact["aliases"]
    assert "adapter_model.safetensors" in str(artifact["manifest"])
    assert json.loads(artifact["metadata"]) == {"step": 3, "monitor": "val/balanced_accuracy"}
