"""Comparing runs never selects on test; absent classes are marked; eva's leaderboard rows."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from test_report import _png_size, make_run

from breakhis_ft.analysis.leaderboard import (
    EVA_LEADERBOARD,
    eva_summaries,
    leaderboard_markdown,
    leaderboard_rows,
    summarise,
)
from breakhis_ft.analysis.report import build_report, to_markdown
from breakhis_ft.analysis.runs import find_runs, load_run


def _runs(root: Path) -> list:
    return [load_run(p) for p in find_runs([root])]


def test_best_run_is_picked_by_validation_not_test(tmp_path: Path) -> None:
    # job0: better on validation, worse on test; job1 the opposite
    make_run(tmp_path, "job0", "completed", r=4, accuracy=0.3, val_accuracy=0.9)
    make_run(tmp_path, "job1", "completed", r=8, accuracy=0.95, val_accuracy=0.4)
    runs = _runs(tmp_path)
    report = build_report(runs)
    rows = {r["run"]: r for r in report.rows}
    assert rows["job1"]["test/balanced_accuracy"] > rows["job0"]["test/balanced_accuracy"]
    assert rows["job0"]["selection"] > rows["job1"]["selection"]
    assert rows["job0"]["selection"] == runs[0].metrics["val"]["balanced_accuracy"]
    assert [r["run"] for r in report.rows] == ["job0", "job1"]
    assert [b["run"] for b in report.best] == ["job0"]
    assert "optimized_metric (val/balanced_accuracy)" in to_markdown(report)
    with pytest.raises(ValueError, match="never selects on test"):
        build_report(runs, sort_by="test/balanced_accuracy")
    by_f1 = build_report(runs, sort_by="val/f1_macro")
    assert by_f1.columns[-5] == "val/f1_macro" and by_f1.best[0]["run"] == "job0"


def test_each_run_is_ranked_by_its_own_optimized_metric(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a", "completed", r=4, accuracy=0.5, val_accuracy=0.6)
    make_run(tmp_path, "b", "completed", r=8, accuracy=0.5, val_accuracy=0.7)
    cfg = yaml.safe_load((a / ".hydra" / "config.yaml").read_text())
    cfg["optimized_metric"] = "val/f1_macro"
    (a / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = _runs(tmp_path)
    report = build_report(runs)
    rows = {r["run"]: r for r in report.rows}
    assert rows["a"]["selected_by"] == "val/f1_macro" and "selected_by" in report.columns
    assert rows["a"]["selection"] == runs[0].metrics["val"]["f1_macro"]
    assert rows["b"]["selection"] == runs[1].metrics["val"]["balanced_accuracy"]


def test_report_warns_about_classes_without_patients_and_runs_without_validation(
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path, "a", "completed", r=4, accuracy=0.6)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"]["per_class"]["lobular_carcinoma"]["support"] = 0
    (run / "metrics.json").write_text(json.dumps(metrics))
    no_val = make_run(tmp_path, "b", "completed", r=8, accuracy=0.6)
    metrics = json.loads((no_val / "metrics.json").read_text())
    del metrics["val"]
    (no_val / "metrics.json").write_text(json.dumps(metrics))
    report = build_report(_runs(tmp_path))
    assert report.warnings == [
        "a: no patient of lobular_carcinoma in test: their test figures are undefined, and the "
        "split's macro averages cover the other classes only",
        "b: no validation split: nothing selects this run (its criterion is -)",
    ]
    assert "## Warnings" in to_markdown(report)
    assert [b["run"] for b in report.best] == ["a"]  # b has no criterion: it cannot be picked


def test_absent_class_is_marked_not_drawn_as_zero(tmp_path: Path) -> None:
    from breakhis_ft.evaluate.figures import bar_text, plot_per_class_f1

    assert bar_text(None, 0) == bar_text(0.0, 0) == "absent from this split"
    assert bar_text(0.0, 5) == "0.00" and bar_text(None, 5) == "n/a"
    split = {
        "per_class": {
            "adenosis": {"f1": 0.5, "support": 4},
            "lobular_carcinoma": {"f1": 0.0, "support": 0},
        },
        "f1_macro": 0.5,
    }
    path = plot_per_class_f1(split, tmp_path / "f1.png", "absent")
    assert _png_size(path)[0] > 400


def test_summary_is_eva_s_mean_and_sample_sd() -> None:
    values = [0.61, 0.65, 0.58, 0.70, 0.66]
    s = summarise("probe", values)
    assert s.mean == pytest.approx(statistics.mean(values))
    assert s.std == pytest.approx(statistics.stdev(values))  # sample SD, as eva's recorder
    assert summarise("one", [0.5]).std == 0.0
    rows = leaderboard_rows([summarise("ours", [0.80, 0.81])])
    names = [r["model"] for r in rows]
    # 0.805 ranks between H-optimus-0 (0.801) and Virchow2 (0.821)
    assert names.index("**ours**") == names.index("Virchow2") + 1
    assert names.index("H-optimus-0") == names.index("**ours**") + 1
    assert len(rows) == len(EVA_LEADERBOARD) + 1
    assert "| **ours** | 0.805 ± 0.007 | this project, 2 seed(s) |" in leaderboard_markdown(
        [summarise("ours", [0.80, 0.81])]
    )


def test_eva_runs_are_summarised_per_experiment(tmp_path: Path) -> None:
    for seed, acc in enumerate([0.5, 0.7, 0.6]):
        run = make_run(tmp_path, f"job{seed}", "completed", r=4, accuracy=acc, experiment="eva_x")
        cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        cfg["split"]["kind"] = "eva"
        cfg["seed"] = seed
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    make_run(tmp_path, "other", "completed", r=4, accuracy=0.9)  # not eva's protocol
    runs = _runs(tmp_path)
    (summary,) = eva_summaries(runs)
    values = [r.metrics["val"]["balanced_accuracy"] for r in runs if r.path.name != "other"]
    assert summary.name == "eva_x" and summary.n == 3
    assert summary.mean == pytest.approx(statistics.mean(values))
    assert summary.std == pytest.approx(statistics.stdev(values))
    assert "## eva leaderboard" in to_markdown(build_report(runs))
