"""What a run shows: the terminal (config tree, a line per evaluation, the summary block last) and
the W&B record read back with W&B's own reader (`wandb leet inspect`), from the session's first
tiny run (conftest.first_run: W&B offline)."""

from __future__ import annotations

import json
import re

import pytest
from helpers.cli_runs import read_metrics
from helpers.wandb_records import (
    artifacts,
    history_keys,
    media_types,
    records,
    run_record,
    run_summary,
)


def test_terminal_shows_config_evaluations_and_ends_with_the_summary(first_run) -> None:
    run_dir, _ = first_run
    out = (run_dir.parents[3] / "first_run.stdout").read_text()
    lines = out.rstrip().splitlines()
    assert lines[0].startswith("config (") and "model=tiny_gemma3" in lines[0]
    assert any(line.startswith("├── model (tiny_gemma3): kind=medgemma") for line in lines)
    assert re.search(
        r"eval step 4: val/balanced_accuracy \d\.\d{4} \(new best\), val/class_nll", out
    )
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
    recs = records(offline)
    keys = history_keys(recs)
    assert len(keys) < 40, sorted(keys)
    assert {
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "train/grad_norm",
        "val/class_nll",  # the true class's NLL: not train/loss, MedGemma's token loss
        "val/balanced_accuracy",
        "val/binary/auroc",
    } <= keys
    assert "val/loss" not in keys
    assert not [k for k in keys if "/per_class/" in k or "/by_magnification/" in k]
    media = media_types(recs)
    for split in ("val", "test"):
        for table in ("per_class", "by_magnification", "confusion_matrix_table"):
            assert media[f"{split}/{table}"] == "table-file"
    assert not [k for k in keys if k.startswith("plots/confusion")]  # W&B's chart only
    state = run_summary(offline)
    assert state["state"] == "finished"
    test = read_metrics(run_dir)["test"]
    summary = state["summary"]
    # a runs table's columns: the headline with its intervals, the selection, the run's facts
    assert len(summary) < 60, sorted(summary)
    assert summary["test/balanced_accuracy"] == pytest.approx(test["balanced_accuracy"])
    assert summary["test/balanced_accuracy_ci95"] == pytest.approx(test["balanced_accuracy_ci95"])
    assert summary["best/step"] == 4 and summary["best/monitor"] == "val/balanced_accuracy"
    assert summary["data/test/images"] == test["n"] and summary["model/trainable_parameters"]
    assert summary["run/wall_time_s"] > 0
    assert not [k for k in summary if "/per_class/" in k or "/by_magnification/" in k]
    # every summary value of a table or chart key is that table or chart, never a number
    for key, kind in media.items():
        value = summary.get(key, {"_type": kind})  # an image leaves the summary (media panels)
        assert isinstance(value, dict) and value.get("_type") == kind, (key, value)
    table = json.loads((offline / "files" / summary["test/per_class"]["path"]).read_text())
    mags = test["by_magnification"]
    assert table["columns"] == ["magnification", "class", "precision", "recall", "f1", "support"]
    assert len(table["data"]) == 8 * (1 + len(mags)) and len(mags) == 4
    hydra = state["config"]["hydra"]
    assert hydra["overrides"][:2] == ["model=tiny_gemma3", "logger.mode=offline"]
    assert hydra["job_num"] is None and hydra["choices"]["model"] == "tiny_gemma3"
    # logger.log_model=best (the default): the exported adapter, metrics.json and config.yaml
    (model,) = artifacts(recs, "model")
    files = {c["path"] for c in model["manifest"]["contents"]}
    assert {"adapter_model.safetensors", "export_info.json", "metrics.json", "config.yaml"} <= files
    assert "best" in model["aliases"] and model["name"] == f"model-{run_record(recs)['run_id']}"
    assert json.loads(model["metadata"])["best_step"] == 4
    name = run_record(recs)["display_name"]
    assert len(name) < 64 and name.startswith("model=tiny_gemma3,synthetic_fraction=0.03"), name
