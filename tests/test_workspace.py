"""The W&B dashboard as code (breakhis-ft-workspace): built offline, it groups runs by experiment,
shows the swept keys and the validation headline +- its interval as columns, validation curves,
parallel coordinates over the swept keys and the per-class tables; --dry-run prints it and sends
nothing (no W&B key, no network)."""

from __future__ import annotations

import json

from breakhis_ft.analysis.workspace import VAL_METRICS, preset_swept_keys
from breakhis_ft.run.tracking import STEP
from breakhis_ft.tools import workspace


def _panels(spec: dict) -> dict[str, list[dict]]:
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    return {s["name"]: s["panels"] for s in sections}


def test_dry_run_prints_the_workspace_of_a_group_offline(capsys, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any request would fail
    argv = ["--entity", "team", "--project", "breakhis-ft", "--group", "demo/2026-12-07"]
    assert workspace.main([*argv, "--dry-run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert (spec["entity"], spec["project"]) == ("team", "breakhis-ft")
    (runset,) = spec["spec"]["section"]["runSets"]
    assert runset["grouping"] == [{"section": "config", "name": "experiment_name.value"}]
    (group,) = runset["filters"]["filters"]
    assert (
        group["key"] == {"section": "run", "name": "group"} and group["value"] == "demo/2026-12-07"
    )
    columns = runset["runFeed"]["columnOrder"]
    keys, log_scale = preset_swept_keys()
    assert {"peft.r", "trainer.lr"} <= set(keys) and "trainer.lr" in log_scale
    assert {"config:peft.value.r", "config:trainer.value.lr"} <= set(columns)
    for metric in VAL_METRICS:  # the headline and its interval, side by side
        i = columns.index(f"summary:{metric}")
        assert columns[i + 1] == f"summary:{metric}_ci95"
    panels = _panels(spec)
    curves = panels["validation curves"]
    assert {p["config"]["xAxis"] for p in curves} == {STEP}
    # each curve one quantity: the class NLL never on a panel of metrics or the training loss
    assert all(len(p["config"]["metrics"]) == 1 for p in curves)
    assert {p["config"]["metrics"][0] for p in curves} == {*VAL_METRICS, "val/class_nll"}
    (parallel,) = panels["sweep: parameters against validation"]
    axes = {c["accessor"]: c.get("log") for c in parallel["config"]["columns"]}
    assert axes["config:trainer.value.lr"] is True and "config:peft.value.r" in axes
    assert "summary:val/balanced_accuracy" in axes
    per_class = json.dumps(panels["per-class F1 (tables: overall and per magnification)"])
    assert "val/per_class" in per_class and "test/per_class" in per_class


def test_swept_keys_given_replace_the_presets(capsys) -> None:
    argv = ["--entity", "e", "--project", "p", "--swept", "model.name_or_path", "--dry-run"]
    assert workspace.main(argv) == 0
    spec = json.loads(capsys.readouterr().out)
    (runset,) = spec["spec"]["section"]["runSets"]
    columns = runset["runFeed"]["columnOrder"]
    assert "config:model.value.name_or_path" in columns and "config:peft.value.r" not in columns
    assert "group" not in json.dumps(runset["filters"])  # the whole project
