"""What a run shows: the terminal (config tree, a line per evaluation, the summary block last) and
the W&B record read back with W&B's own reader (`wandb leet inspect`), from the session's first
tiny run (conftest.first_run: W&B offline)."""

from __future__ import annotations

import json
import re

import pytest
from helpers.cli_runs import read_metrics
from helpers.wandb_records import history_keys, records, run_summary


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
    metrics = read_metrics(run_dir)
    val, test = metrics["val"], metrics["test"]
    assert block[1] == f"breakhis-ft: run finished, metrics of the best model ({run_dir})"
    assert block[2].split() == ["val", f"(n={val['n']})", "test", f"(n={test['n']})"]
    rows = {line.split()[0]: line for line in block[3:-5]}
    # the value and its patient-bootstrap interval, as metrics.json has them
    lo, hi = test["balanced_accuracy_ci95"]
    shown = f"{test['balanced_accuracy']:.4f} [{lo:.4f}, {hi:.4f}]"
    assert rows["balanced_accuracy"].endswith(shown)
    assert {"accuracy", "f1_macro", "auroc_macro", "patient_recognition_rate"} <= set(rows)
    assert block[-5].startswith("  best step: 4 (val/balanced_accuracy ")
    assert block[-4:] == [
        f"  run folder: {run_dir}",
        f"  compare: breakhis-ft-report {run_dir}",
        f"  predict: breakhis-ft-predict {run_dir} IMAGES --out predictions.csv",
        rule,
    ]


def test_wandb_offline_run_read_back_has_headline_history_and_tables(first_run) -> None:
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
    test = read_metrics(run_dir)["test"]
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
