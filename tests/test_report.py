"""breakhis-ft-report over fake run folders written by the real producers' file formats."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from breakhis_ft.analysis.report import build_report, to_markdown, write_report
from breakhis_ft.analysis.runs import find_runs, load_run
from breakhis_ft.data.records import class_names
from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags
from breakhis_ft.run.tracking import RunTracker, TrackedJob
from breakhis_ft.tools import report as report_tool

CLASSES = class_names("subtype8")


def _split(accuracy: float, seed: int) -> dict:
    """One split's metrics from compute_metrics on random predictions of a given accuracy."""
    gen = torch.Generator().manual_seed(seed)
    n = 96
    labels = torch.arange(n) % len(CLASSES)
    logits = torch.randn(n, len(CLASSES), generator=gen)
    right = torch.rand(n, generator=gen) < accuracy
    logits[right, labels[right]] += 10.0  # these rows predict their true class
    probs = logits.softmax(dim=1)
    patients = [f"p{i % 12}" for i in range(n)]
    mags = [40 if i % 2 else 100 for i in range(n)]
    return compute_metrics(probs, labels, CLASSES, patients, mags, malignant_flags(CLASSES))


def _metrics(accuracy: float, seed: int, val_accuracy: float | None = None) -> dict:
    """metrics.json content: test at `accuracy`, val the same figures unless given."""
    test = _split(accuracy, seed)
    val = test if val_accuracy is None else _split(val_accuracy, seed + 1000)
    return {"val": val, "test": test}


def make_run(
    parent: Path,
    name: str,
    status: str,
    r: int,
    accuracy: float | None = None,
    steps: int = 4,
    choices: dict | None = None,
    overrides: list[str] | None = None,
    experiment: str = "demo",
    val_accuracy: float | None = None,
) -> Path:
    """A run folder as the entrypoint writes it: .hydra/, run_info.json, metrics.jsonl/json."""
    run = parent / name
    (run / ".hydra").mkdir(parents=True)
    config = {
        "data": {"source": "synthetic", "image_size": 64},
        "paths": {"cache_dir": f"/cache/{name}", "output_dir": "outputs"},
        "split": {"kind": "patient", "seed": 0},
        "magnification": {"name": "all", "factors": [40, 100, 200, 400]},
        "task": {"name": "subtype8"},
        "model": {"kind": "medgemma", "name_or_path": "tiny/gemma3"},
        "peft": {"method": "lora", "r": r, "alpha": 2 * r},
        "precision": {"name": "fp32"},
        "trainer": {"lr": 2e-3, "epochs": 2},
        "logger": {"kind": "none", "tags": [name]},
        "experiment_name": experiment,
        "seed": 42,
        "optimized_metric": "val/balanced_accuracy",
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = overrides if overrides is not None else [f"experiment={experiment}", f"peft.r={r}"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if choices is not None:
        hydra = {"hydra": {"runtime": {"choices": {"hydra/launcher": "basic", **choices}}}}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    info = {
        "status": status,
        "start_time": "2025-01-01T10:00:00+00:00",
        "git": {"commit": "abc"},
        "command": ["breakhis-ft", *overrides],
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }  # this test process: alive, so a "running" run stays running
    if status != "running":
        info["end_time"] = "2025-01-01T10:05:00+00:00"
    (run / "run_info.json").write_text(json.dumps(info))
    tracker = RunTracker(run, TrackedJob(config, name, "demo"), SimpleNamespace(kind="none"))
    for step in range(1, steps + 1):
        tracker.log(
            {
                "train/loss": 2.0 / step,
                "train/lr": 2e-3 * (1 - step / 10),
                "train/images_per_s": 10.0,
                "train/epoch": step / 2,
            },
            step,
        )
        if step % 2 == 0:
            tracker.log(
                {
                    "val/balanced_accuracy": 0.2 * step / 2,
                    "val/f1_macro": 0.15 * step / 2,
                    "val/class_nll": 1.5 / step,
                    "val/binary/auroc": 0.6,
                },
                step,
            )
    if status == "failed":
        (run / "FAILED").write_text("non-finite loss at step 3\n")
    if accuracy is not None:
        tracker.log_final(_metrics(accuracy, seed=r, val_accuracy=val_accuracy), {})
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep of 4 jobs: two completed (r=4 worse, r=16 better), one failed, one running."""
    root = tmp_path / "outputs" / "sweeps" / "demo" / "2025-01-01_10-00-00-000000"
    choices = {"model": "tiny_gemma3", "peft": "lora", "experiment": "demo"}
    make_run(root, "job0", "completed", r=4, accuracy=0.4, choices=choices)
    make_run(root, "job1", "completed", r=16, accuracy=0.9, choices=choices)
    make_run(root, "job2", "failed", r=8, steps=3, choices=choices)
    make_run(root, "job3", "running", r=32, steps=2, choices=choices)
    (root / "job1" / "checkpoints" / "step_000004").mkdir(parents=True)  # not a run
    return root


def test_table_shows_differing_overrides_sorted_with_status(sweep: Path) -> None:
    runs = [load_run(p) for p in find_runs([sweep.parent.parent.parent])]
    assert [r.path.name for r in runs] == ["job0", "job1", "job2", "job3"]
    report = build_report(runs)
    # paths.cache_dir, logger.tags and peft.alpha-with-r differ too: the ignored ones stay out
    assert report.columns == [
        "run",
        "status",
        "last_step",
        "peft.alpha",
        "peft.r",
        "selection",  # each run's optimized_metric: val/balanced_accuracy
        "test/balanced_accuracy",
        "test/f1_macro",
        "test/auroc_macro",
        "test/patient_recognition_rate",
    ]
    rows = {r["run"]: r for r in report.rows}
    assert [r["run"] for r in report.rows] == ["job1", "job0", "job2", "job3"]
    ba1, ba0 = rows["job1"]["test/balanced_accuracy"], rows["job0"]["test/balanced_accuracy"]
    assert ba1 > ba0 > 0
    assert ba1 == pytest.approx(runs[1].metrics["test"]["balanced_accuracy"])
    assert rows["job1"]["peft.r"] == 16 and rows["job0"]["peft.r"] == 4
    assert rows["job2"]["status"] == "failed" and rows["job3"]["status"] == "running"
    assert rows["job2"]["test/balanced_accuracy"] is None  # not zero
    assert rows["job3"]["last_step"] == 2 and rows["job2"]["last_step"] == 3
    assert report.best == [
        {
            "group": "demo",
            "run": "job1",
            "status": "completed",
            **{m: rows["job1"][m] for m in report.metrics},
        }
    ]


def test_best_per_group_keeps_groups_without_a_value(sweep: Path) -> None:
    runs = [load_run(p) for p in find_runs([sweep])]
    report = build_report(runs, ["test/f1_macro"], group_by="peft.r")
    assert [b["group"] for b in report.best] == ["4", "8", "16", "32"]  # numeric order
    best = {b["group"]: (b["run"], b["status"]) for b in report.best}
    assert best == {
        "16": ("job1", "completed"),
        "32": ("", "running"),
        "4": ("job0", "completed"),
        "8": ("", "failed"),
    }
    with pytest.raises(ValueError, match="--group-by 'nope'.*peft.r"):
        build_report(runs, group_by="nope")
    with pytest.raises(ValueError, match="--sort-by"):
        build_report(runs, ["test/f1_macro"], sort_by="test/accuracy")


def test_group_choice_column_replaces_its_keys_and_overrides_fallback(tmp_path: Path) -> None:
    a = make_run(
        tmp_path,
        "a",
        "completed",
        r=8,
        accuracy=0.5,
        overrides=["model=tiny_siglip", "magnification=40x"],
    )
    b = make_run(
        tmp_path,
        "b",
        "completed",
        r=8,
        accuracy=0.6,
        experiment="other",
        overrides=["trainer.lr=1e-3"],
    )
    cfg = yaml.safe_load((a / ".hydra" / "config.yaml").read_text())
    cfg["model"] = {"kind": "siglip", "name_or_path": "tiny/siglip"}
    cfg["magnification"] = {"name": "40x", "factors": [40]}
    (a / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    cfg = yaml.safe_load((b / ".hydra" / "config.yaml").read_text())
    cfg["trainer"]["lr"] = 1e-3
    (b / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = build_report([load_run(a), load_run(b)])
    settings = report.columns[3:-5]
    # no hydra.yaml: the group choices come from the overrides; model.kind etc. are explained by
    # the `model` column, magnification.* by `magnification`
    assert settings == ["magnification", "model", "experiment_name", "trainer.lr"]
    rows = {r["run"]: r for r in report.rows}
    assert rows["a"]["model"] == "tiny_siglip" and rows["b"]["model"] is None
    assert rows["a"]["magnification"] == "40x" and rows["b"]["trainer.lr"] == 1e-3
    assert [b["group"] for b in report.best] == ["demo", "other"]


def test_stale_running_run_is_reported_stopped(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", "running", r=4)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads((run / "run_info.json").read_text())
    info["pid"] = int(gone.stdout)
    (run / "run_info.json").write_text(json.dumps(info))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "train/lo')  # killed mid-write
    loaded = load_run(run)
    assert loaded.status == "stopped" and loaded.last_step == 4


def test_markdown_and_csv_written(sweep: Path, tmp_path: Path) -> None:
    report = build_report([load_run(p) for p in find_runs([sweep])])
    paths = write_report(report, tmp_path / "out")
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["job1", "job0", "job2", "job3"]
    assert rows[2]["status"] == "failed" and rows[2]["test/balanced_accuracy"] == ""
    assert float(rows[0]["test/balanced_accuracy"]) == report.rows[0]["test/balanced_accuracy"]
    md = paths["markdown"].read_text()
    assert md == to_markdown(report)
    assert "| job2 | failed | 3 | 16 | 8 | - | - | - | - | - |" in md
    top = report.rows[0]
    assert f"| demo | job1 | completed | {top['selection']:.4f} | " in md
    assert f" | {top['test/balanced_accuracy']:.4f} |" in md
    with paths["best_csv"].open() as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["job1"]


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_cli_writes_report_and_readable_plots(sweep: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    code = report_tool.main(
        [
            str(sweep),
            "--plots",
            "--by-magnification",
            "--out",
            str(out),
            "--metrics",
            "balanced_accuracy",
            "binary/auroc",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test/by_magnification/40/balanced_accuracy" in printed
    assert "test/by_magnification/100/binary/auroc" in printed
    header = next(csv.reader((out / "report.csv").open()))
    assert header[-6:] == [
        "test/balanced_accuracy",
        "test/by_magnification/40/balanced_accuracy",
        "test/by_magnification/100/balanced_accuracy",
        "test/binary/auroc",
        "test/by_magnification/40/binary/auroc",
        "test/by_magnification/100/binary/auroc",
    ]
    for job in ("job0", "job1"):
        width, height = _png_size(sweep / job / "confusion_matrix_test.png")
        assert width > 1200 and height > 500  # two 8x8 panels with room for the class names
        width, height = _png_size(sweep / job / "per_class_f1_test.png")
        assert width > 500 and height > 300
    assert _png_size(sweep / "job2" / "curves.png")[0] > 800  # failed runs still have curves
    assert not (sweep / "job2" / "confusion_matrix_test.png").exists()
    width, height = _png_size(out / "sweep.png")
    assert width > 500 and height > 300


def test_sweep_plot_over_two_axes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from breakhis_ft.analysis.plots import plot_sweep, sweep_axes

    runs = []
    for i, (r, lr) in enumerate([(4, 1e-4), (8, 1e-4), (4, 1e-3), (8, 1e-3)]):
        path = make_run(tmp_path, f"job{i}", "completed", r=r, accuracy=0.3 + 0.1 * i)
        cfg = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
        cfg["trainer"]["lr"] = lr
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        runs.append(load_run(path))
    assert sweep_axes(runs) == ["peft.r", "trainer.lr", "peft.alpha"]  # make_run: alpha = 2r
    assert plot_sweep(runs[:1], "val/f1_macro", tmp_path / "none.png") is None
    path = plot_sweep(runs, "selection", tmp_path / "sweep.png", beside="test/f1_macro")
    assert path is not None and _png_size(path)[0] > 500
    with pytest.raises(ValueError, match="not test"):
        plot_sweep(runs, "test/f1_macro", tmp_path / "bad.png")


def test_missing_matplotlib_names_the_extra(monkeypatch) -> None:
    from breakhis_ft.analysis import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[plots\]'"):
        plots._pyplot()


def test_log_plots_to_wandb_logs_images(tmp_path: Path, monkeypatch) -> None:
    from breakhis_ft.run import tracking

    png = tmp_path / "curves.png"
    Image.new("RGB", (8, 8)).save(png)
    logged = []
    fake = SimpleNamespace(Image=lambda p: ("image", p))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracking._log_images(SimpleNamespace(log=logged.append), [png])
    assert logged == [{"plots/curves": ("image", str(png))}]


def test_failed_run_with_partial_metrics_never_wins_its_group(sweep: Path) -> None:
    (sweep / "job2" / "metrics.json").write_text(json.dumps(_metrics(1.0, seed=8)))
    report = build_report([load_run(p) for p in find_runs([sweep])])
    assert report.rows[0]["run"] == "job2" and report.rows[0]["status"] == "failed"
    assert [(b["group"], b["run"]) for b in report.best] == [("demo", "job1")]


def _keep_figures(monkeypatch) -> list:
    """Capture the figures the plot functions would save (open, to inspect), by file stem."""
    from breakhis_ft.analysis import plots
    from breakhis_ft.evaluate import figures

    kept: list = []

    def keep(fig, path):
        kept.append((Path(path).stem, fig))
        return Path(path)

    monkeypatch.setattr(figures, "_save", keep)
    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _titles(fig) -> str:
    texts = [ax.get_title() for ax in fig.axes]
    if fig._suptitle is not None:
        texts.append(fig._suptitle.get_text())
    return " | ".join(texts)


def test_plot_titles_name_what_differs_not_the_job_folder(sweep: Path, monkeypatch) -> None:
    from breakhis_ft.analysis.plots import plot_run, run_label

    kept = _keep_figures(monkeypatch)
    runs = [load_run(p) for p in find_runs([sweep])]
    report = build_report(runs)
    settings = report.columns[3 : len(report.columns) - len(report.metrics)]
    job1 = next(r for r in runs if r.path.name == "job1")
    assert run_label(job1, settings) == "peft.alpha=32, peft.r=16"
    assert run_label(job1) == "experiment=demo, peft.r=16"  # alone: its overrides
    plot_run(job1, "test", settings)
    assert {stem for stem, _ in kept} == {"confusion_matrix_test", "per_class_f1_test", "curves"}
    for _, fig in kept:
        assert "peft.r=16" in _titles(fig) and "job1" not in _titles(fig)


def test_sweep_plot_starts_at_zero_and_shows_intervals(sweep: Path, monkeypatch) -> None:
    from breakhis_ft.analysis.plots import plot_sweep

    metrics = json.loads((sweep / "job1" / "metrics.json").read_text())
    value = metrics["val"]["balanced_accuracy"]
    metrics["val"]["balanced_accuracy_ci95"] = [value - 0.1, value + 0.05]
    (sweep / "job1" / "metrics.json").write_text(json.dumps(metrics))
    kept = _keep_figures(monkeypatch)
    runs = [load_run(p) for p in find_runs([sweep])]
    plot_sweep(runs, "val/balanced_accuracy", "s.png", beside=None)
    ((_, fig),) = kept
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.02)  # not a 0.002 gap stretched to the full height
    (bars,) = ax.containers  # one line: r=4 (no interval) and r=16 (its interval)
    segments = bars.lines[2][0].get_segments()
    spans = sorted((float(s[0][1]), float(s[1][1])) for s in segments)
    assert spans[-1] == pytest.approx((value - 0.1, value + 0.05))


def test_curves_plot_the_training_loss_and_the_class_nll_in_panels_of_their_own(
    tmp_path, monkeypatch
) -> None:
    pytest.importorskip("matplotlib")
    from breakhis_ft.evaluate import figures

    kept = _keep_figures(monkeypatch)
    # MedGemma's token loss sits far above the class NLL: one axis would read as a bug
    history = [{"step": s, "train/loss": 6.0 - s, "val/class_nll": 2.0 / s} for s in (1, 2)]
    history.append({"step": 3, "val/loss": 0.5})  # a run folder's earlier name of the class NLL
    figures.plot_curves(history, tmp_path / "curves.png", "t")
    ((_, fig),) = kept
    on_axis = [{line.get_label() for line in ax.get_lines()} for ax in fig.axes]
    assert {"train/loss"} in on_axis
    assert {"val/class_nll", "val/loss"} in on_axis
