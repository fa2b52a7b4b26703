"""report.py with statistics: intervals in the table, separability, cross-validation, --compare."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from breakhis_ft.analysis.aggregate import cv_groups, cv_markdown
from breakhis_ft.analysis.comparison import COMPARE_RESAMPLES, compare_runs
from breakhis_ft.analysis.report import VS_BEST, build_report, to_markdown
from breakhis_ft.analysis.runs import find_runs, load_run, metric_interval, metric_value
from breakhis_ft.config import EvaluateConfig
from breakhis_ft.data.records import class_names
from breakhis_ft.evaluate.bootstrap import balanced_accuracy
from breakhis_ft.evaluate.compare import paired_bootstrap
from breakhis_ft.evaluate.final import final_metrics
from breakhis_ft.evaluate.metrics import write_predictions
from breakhis_ft.tools import report as report_tool

CLASSES = class_names("subtype8")
METRICS = ["test/balanced_accuracy", "test/auroc_macro", "test/patient_recognition_rate"]
SETTINGS = {"bootstrap_resamples": 200, "ci_level": 0.95, "seed": 0}


def _predictions(patients: list[str], skill: float, seed: int):
    """Probs, labels of 4 images per patient; a patient's class is its number modulo 8."""
    rng = np.random.default_rng(seed)
    # the number in the id (P07 -> 7, 22549AB -> 22549): sibling folders share the class
    labels = np.repeat([int(re.search(r"\d+", p)[0]) % len(CLASSES) for p in patients], 4)
    logits = rng.normal(0, 1, (len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), labels] += skill
    probs = torch.tensor(logits).softmax(dim=1).float()
    return probs, torch.tensor(labels), [p for p in patients for _ in range(4)]


def write_run(
    folder: Path,
    patients: list[str],
    fold: int = 1,
    seed: int = 42,
    skill: float = 1.5,
    r: int = 8,
    group_by: str | None = None,
) -> Path:
    """A completed run folder: config, run_info, predictions_test.csv and its final metrics
    (`group_by`: split.group_by of its config; None: a config without the key)."""
    (folder / ".hydra").mkdir(parents=True)
    split = {"kind": "patient", "n_folds": 3, "fold": fold}
    if group_by is not None:
        split["group_by"] = group_by
    config = {
        "experiment_name": "cv",
        "seed": seed,
        "split": split,
        "peft": {"r": r},
        "evaluate": SETTINGS,
        "optimized_metric": "val/balanced_accuracy",  # the report ranks and selects on it
    }
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"split.fold={fold}"]))
    (folder / "run_info.json").write_text(json.dumps({"status": "completed"}))
    probs, labels, image_patients = _predictions(patients, skill, seed=fold * 100 + seed)
    rows = [
        {"path": f"img/{p}_{i}.png", "patient": p, "magnification": 40, "label": int(y)}
        for i, (p, y) in enumerate(zip(image_patients, labels.tolist(), strict=True))
    ]
    write_predictions(folder / "predictions_test.csv", rows, probs, probs.argmax(1), CLASSES)
    settings = EvaluateConfig(**SETTINGS)
    test = final_metrics(probs, labels, CLASSES, image_patients, [40] * len(rows), settings)
    # validation = the same predictions here: what the report selects on carries intervals too
    (folder / "metrics.json").write_text(json.dumps({"val": test, "test": test}))
    return folder


def _patients(first: int, n: int) -> list[str]:
    return [f"P{i:02d}" for i in range(first, first + n)]


@pytest.fixture
def cv_sweep(tmp_path: Path) -> Path:
    """Three folds with disjoint test patients, and one run of another config (not a group)."""
    for fold in (1, 2, 3):
        write_run(tmp_path / f"job{fold - 1}", _patients(10 * fold, 10), fold=fold)
    write_run(tmp_path / "other", _patients(10, 10), fold=1, r=16)
    return tmp_path


def test_folds_give_mean_std_pooled_and_per_fold_rows(cv_sweep: Path) -> None:
    runs = [load_run(p) for p in find_runs([cv_sweep])]
    (group,) = cv_groups(runs, METRICS)
    assert [r.path.name for r in group.runs] == ["job0", "job1", "job2"]
    assert group.varying == ["split.fold"]
    for metric in METRICS:
        values = [metric_value(r, metric) for r in group.runs]
        assert group.mean[metric] == pytest.approx(statistics.fmean(values))
        assert group.std[metric] == pytest.approx(statistics.stdev(values))
    # pooled: every image once, recomputed from the three predictions files by hand
    (pooled,) = group.pooled
    sklearn = pytest.importorskip("sklearn.metrics")
    labels, preds = [], []
    for run in group.runs:
        rows = (run.path / "predictions_test.csv").read_text().splitlines()[1:]
        labels += [row.split(",")[3] for row in rows]
        preds += [row.split(",")[4] for row in rows]
    assert pooled.metrics["n"] == len(labels) == 120
    assert pooled.metrics["balanced_accuracy"] == pytest.approx(
        sklearn.balanced_accuracy_score(labels, preds), abs=1e-6
    )
    assert pooled.metrics["interval"]["n_groups"] == 30  # no split.group_by: patient folders
    assert pooled.metrics["interval"]["unit"] == "patient"
    text = cv_markdown([group], METRICS)
    mean = group.mean["test/balanced_accuracy"]
    assert f"| mean ± std (3 runs) | {mean:.2f} ± " in text
    assert re.search(r"\| pooled out-of-fold, folds 1,2,3 \(120 images\) \| \d\.\d\d \[", text)
    assert "| split.fold=1 |" in text and "| split.fold=3 |" in text


def test_cli_prints_the_cross_validation_table(cv_sweep: Path, tmp_path: Path, capsys) -> None:
    assert report_tool.main([str(cv_sweep), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "## Runs that differ only in fold or seed" in printed
    assert "mean ± std (3 runs)" in printed
    rows = (tmp_path / "out" / "report_cv.csv").read_text().splitlines()
    assert rows[0].startswith("group,row,run,test/balanced_accuracy,test/balanced_accuracy_std")
    assert len(rows) == 1 + 1 + 1 + 3  # header, mean, pooled, three folds


def test_seeds_on_one_test_set_are_averaged_but_not_pooled(tmp_path: Path) -> None:
    for seed in (1, 2):
        write_run(tmp_path / f"seed{seed}", _patients(0, 8), seed=seed)
    (group,) = cv_groups([load_run(p) for p in find_runs([tmp_path])], METRICS)
    assert group.varying == ["seed"] and group.pooled == []
    assert "not pooled" in group.note


def test_table_shows_intervals_and_marks_runs_not_separable_from_the_best(tmp_path: Path) -> None:
    write_run(tmp_path / "good", _patients(0, 30), skill=6.0, r=4)
    write_run(tmp_path / "close", _patients(0, 30), skill=5.0, r=8, seed=1)
    write_run(tmp_path / "bad", _patients(0, 30), skill=-1.0, r=16, seed=2)
    runs = [load_run(p) for p in find_runs([tmp_path])]
    report = build_report(runs, METRICS)
    assert VS_BEST in report.columns
    # good and close are nearly as skilled: either may come first, the other overlaps it
    assert [r["run"] for r in report.rows][2] == "bad"
    assert [r[VS_BEST] for r in report.rows] == ["best", "not separable", "separable"]
    lo, hi = metric_interval(runs[[r.path.name for r in runs].index("bad")], METRICS[0])
    assert lo <= hi
    assert re.search(r"\| \d\.\d\d \[\d\.\d\d, \d\.\d\d\] \|", to_markdown(report))


def test_compare_two_identical_runs_gives_a_difference_of_zero(tmp_path: Path, capsys) -> None:
    a = write_run(tmp_path / "a", _patients(0, 12))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    result = compare_runs(a, b, n_resamples=100)
    for name in ("balanced_accuracy", "auroc_macro"):
        r = result["metrics"][name]
        assert r["difference"] == 0.0 and r["ci95"] == [0.0, 0.0]
        assert (r["share_a_wins"], r["share_ties"]) == (0.0, 1.0)
    assert result["n_images"] == 48 and result["n_patients"] == 12
    assert report_tool.main(["--compare", str(a), str(b), "--resamples", "50"]) == 0
    out = capsys.readouterr().out
    assert (
        "| balanced_accuracy |" in out
        and "| +0.000 | [+0.000, +0.000] | 0.0% | 0.0% | 100.0% |" in out
    )
    other = write_run(tmp_path / "c", _patients(20, 12))
    with pytest.raises(ValueError, match="not on the same images: 48 only in A"):
        compare_runs(a, other)


def test_compare_resamples_the_stems_within_classes_as_many_times_as_measured(
    tmp_path: Path, capsys
) -> None:
    # 32 folders: 16 stems (1000-1015), each with sibling slides AB and CD; 2 stems a class
    patients = [f"{1000 + i}{sibling}" for i in range(16) for sibling in ("AB", "CD")]
    a = write_run(tmp_path / "a", patients, group_by="stem")
    b = write_run(tmp_path / "b", patients, seed=7, skill=1.0, group_by="stem")
    result = compare_runs(a, b, n_resamples=300)
    assert result["interval"] == {
        "method": "paired percentile bootstrap",
        "unit": "stem",
        "stratified_by": "class",
        "n_groups": 16,
    }
    assert result["n_patients"] == 32 and result["resamples"] == 300
    # the same as the paired bootstrap of the stems given by hand (siblings as one unit)
    rows = (a / "predictions_test.csv").read_text().splitlines()[1:]
    stems = [row.split(",")[1][:4] for row in rows]
    probs_a, labels, _ = _predictions(patients, 1.5, seed=100 + 42)
    probs_b, _, _ = _predictions(patients, 1.0, seed=100 + 7)
    by_hand = paired_bootstrap(balanced_accuracy, probs_a, probs_b, labels, stems, 300)
    assert result["metrics"]["balanced_accuracy"]["ci95"] == pytest.approx(by_hand["ci95"])
    # without --resamples: the measured default (10 s here: not run); the output says how many
    assert COMPARE_RESAMPLES == 10000
    args = report_tool.build_parser().parse_args(["--compare", str(a), str(b)])
    assert args.resamples == COMPARE_RESAMPLES
    assert inspect.signature(compare_runs).parameters["n_resamples"].default == COMPARE_RESAMPLES
    assert report_tool.main(["--compare", str(a), str(b), "--resamples", "40"]) == 0
    out = capsys.readouterr().out
    assert "40 paired resamples of the stems, stratified by class, seed 0" in out


def test_runs_written_before_the_rename_still_report_the_recognition_rate(tmp_path: Path) -> None:
    run = write_run(tmp_path / "old", _patients(0, 4))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"]["patient_accuracy"] = metrics["test"].pop("patient_recognition_rate")
    (run / "metrics.json").write_text(json.dumps(metrics))
    value = metric_value(load_run(run), "test/patient_recognition_rate")
    assert value == metrics["test"]["patient_accuracy"]
