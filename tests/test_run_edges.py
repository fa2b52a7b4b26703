"""The rough edges of every run (issue 25): no third-party noise on the terminal, a refused config
leaves nothing behind, known errors end on one message and their exit status."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.cli_runs import FAST, REPO, run_cli, single_run_dir
from hydra import compose, initialize_config_dir
from test_report import _keep_figures, _titles, make_run

from breakhis_ft import errors
from breakhis_ft.analysis.plots import plot_sweep
from breakhis_ft.analysis.runs import find_runs, load_run
from breakhis_ft.config import EvaluateConfig, register_configs
from breakhis_ft.evaluate.calibration import plot_reliability, read_temperature
from breakhis_ft.evaluate.metrics import write_predictions
from breakhis_ft.run.calibrate import calibrate_run
from breakhis_ft.run.experiment import prepare_data
from breakhis_ft.tools import predict as predict_tool
from breakhis_ft.tools import report as report_tool
from breakhis_ft.vram.plan import MemoryBudgetError

# what the terminal showed of every run before: bitsandbytes' kernel warning, transformers'
# FutureWarning and its weight-loading bar
NOISE = ("bitsandbytes", "gemm_4bit", "FutureWarning", "warnings.warn", "Loading weights")
NO_FULL_ERROR = {"HYDRA_FULL_ERROR": "0"}  # cli_env sets it to 1 for the other tests


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_a_run_shows_no_third_party_noise_and_keeps_it_in_its_log(first_run) -> None:
    run_dir, _ = first_run
    base = run_dir.parents[3]
    shown = (base / "first_run.stdout").read_text() + (base / "first_run.stderr").read_text()
    assert not [n for n in NOISE if n in shown], shown[-3000:]
    logged = (run_dir / "breakhis-ft.log").read_text()
    assert "bitsandbytes" not in logged  # not imported: a LoRA run uses no 4-bit or 8-bit code
    assert "[py.warnings][WARNING]" in logged  # Python's warnings are kept in the log file


def test_a_tool_help_prints_no_bitsandbytes_warning_and_4bit_still_gets_it() -> None:
    """`breakhis-ft-explain --help` (its console script's `main`) imports peft with bitsandbytes
    held back: no kernel warning; loading a 4-bit model lets it in and peft and transformers
    then see it (QLoRA still works)."""
    done = _python(
        "import sys\n"
        "from breakhis_ft.tools.explain import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0\n"
        "import peft\n"
        "from peft.import_utils import is_bnb_available, is_bnb_4bit_available\n"
        "assert sys.modules['bitsandbytes'] is None, 'imported'\n"
        "assert not is_bnb_available()\n"
        "from transformers.utils.import_utils import is_bitsandbytes_available\n"
        "assert not is_bitsandbytes_available()  # cached: transformers' 4-bit loader asks it\n"
        "print('--- 4-bit from here ---', file=sys.stderr, flush=True)\n"
        "import torch\n"
        "from breakhis_ft.models.gemma_loading import qlora_quantization\n"
        "qlora_quantization(torch.bfloat16)\n"
        "assert sys.modules['bitsandbytes'] is not None\n"
        "assert is_bnb_available() and is_bnb_4bit_available()\n"
        "assert is_bitsandbytes_available()\n"
        "print('ok')\n"
    )
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), done.stderr[-3000:]
    assert "usage: breakhis-ft-explain" in done.stdout
    before, _, _ = done.stderr.partition("--- 4-bit from here ---")
    assert "bitsandbytes" not in done.stdout + before, before


def test_a_value_typo_leaves_nothing_behind_and_says_one_thing(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    args = ["trainer.scheduler=cosin", "logger=none", f"paths.output_dir={out}"]
    done = run_cli(args, tmp_path / "cache", timeout=300, **NO_FULL_ERROR)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "trainer.scheduler: 'cosin' is not a transformers scheduler" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not out.exists()  # no run folder, no empty parents
    assert find_runs([tmp_path]) == []  # so the report lists no `unknown` row either
    shown = run_cli(args, tmp_path / "cache", timeout=300)  # HYDRA_FULL_ERROR=1
    assert shown.returncode == 2 and "Traceback" in shown.stderr
    assert not out.exists()


def test_a_data_error_in_the_run_prints_its_message_and_keeps_the_traceback_in_the_log(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "BreaKHis"
    empty.mkdir()
    out = tmp_path / "outputs"
    args = ["data=breakhis", f"data.root={empty}", "logger=none", *FAST]
    done = run_cli([*args, f"paths.output_dir={out}"], tmp_path / "cache", **NO_FULL_ERROR)
    assert done.returncode == 3, done.stderr[-3000:]  # a data error (errors.EXIT_CODES)
    assert f"data.root={empty}: no BreakHis tree found" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    log = single_run_dir(out) / "breakhis-ft.log"
    assert f"(the traceback is in {log})" in done.stderr
    assert "Traceback" in log.read_text() and "BadDataError" in log.read_text()


# ---- the temperature: warned about at the start, never applied at its search bound -----------


def _write_split(run_dir: Path, split: str, probs: torch.Tensor, labels: list[int]) -> None:
    rows = [
        {"path": f"{split}/{i}.png", "patient": f"p{i % 3}", "magnification": 100, "label": y}
        for i, y in enumerate(labels)
    ]
    write_predictions(
        run_dir / f"predictions_{split}.csv", rows, probs, probs.argmax(1), ["a", "b"]
    )


def test_a_temperature_at_its_search_bound_is_not_applied(tmp_path: Path, caplog) -> None:
    """Every val image right: val's NLL keeps falling as T -> 0 and the search stops at its lower
    bound, which applied would make every prediction one-hot; it is recorded, warned, not used."""
    labels = [0, 1] * 4
    right = torch.tensor([[0.7, 0.3] if y == 0 else [0.3, 0.7] for y in labels])
    _write_split(tmp_path, "val", right, labels)
    _write_split(tmp_path, "test", right.flip(1), labels)
    metrics = {split: {"calibration": {"before": {"nll": 1.0}}} for split in ("val", "test")}
    settings = EvaluateConfig(temperature_scaling=True, calibration_bins=5)
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.run.calibrate"):
        info = calibrate_run(metrics, tmp_path, settings)
    assert info["temperature"] is None and info["fitted_temperature"] == pytest.approx(0.01)
    assert "sits at its search bound" in info["reason"] and "not applied" in info["reason"]
    assert read_temperature(tmp_path) is None  # predict uses the model's probabilities
    assert "after" not in metrics["test"]["calibration"]
    assert "not applied" in caplog.text


def test_a_run_warns_at_its_start_when_val_is_too_small_for_the_temperature(
    replica_root: Path, tmp_path: Path, caplog
) -> None:
    register_configs()
    overrides = ["data=breakhis", f"data.root={replica_root}", "magnification=100x"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.run.experiment"):
        _, splits = prepare_data(cfg, tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if "temperature" in r.getMessage()]
    assert f"val has {len(splits['val'])} images (fewer than 50)" in warning
    assert "evaluate.temperature_scaling=false" in warning
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        off = compose("train", overrides=[*overrides, "evaluate.temperature_scaling=false"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.run.experiment"):
        prepare_data(off, tmp_path)
    assert not [r for r in caplog.records if "temperature" in r.getMessage()]


# ---- plots: titles, one sweep panel per swept key, the reliability gap --------------------------


def _sweep_of_four_keys(parent: Path) -> list[Path]:
    """Six runs over four keys (the rank, a learning rate over two decades, weight decay, the
    seed), with val/test intervals."""
    paths = []
    grid = [(4, 1e-5, 0.0, 1), (8, 1e-4, 0.01, 2), (16, 1e-3, 0.0, 3), (4, 1e-3, 0.01, 1)]
    for i, (r, lr, decay, seed) in enumerate(grid):
        path = make_run(parent, f"job{i}", "completed", r=r, accuracy=0.3 + 0.1 * i)
        cfg = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
        cfg["trainer"].update(lr=lr, weight_decay=decay)
        cfg["seed"] = seed
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        metrics = json.loads((path / "metrics.json").read_text())
        for split in ("val", "test"):
            value = metrics[split]["balanced_accuracy"]
            metrics[split]["balanced_accuracy_ci95"] = [value - 0.05, value + 0.05]
        (path / "metrics.json").write_text(json.dumps(metrics))
        paths.append(path)
    return paths


def test_report_plots_title_runs_by_their_settings_not_selection_none(
    tmp_path: Path, monkeypatch
) -> None:
    kept = _keep_figures(monkeypatch)
    _sweep_of_four_keys(tmp_path / "sweep")
    assert report_tool.main([str(tmp_path / "sweep"), "--plots", "--out", str(tmp_path)]) == 0
    titles = {stem: _titles(fig) for stem, fig in kept if stem != "sweep"}
    assert titles, kept
    for title in titles.values():
        assert "selection" not in title and "None" not in title, title
        assert "trainer.lr=" in title and "seed=" in title


def test_the_sweep_plot_has_one_panel_per_swept_key_with_log_axes_over_decades(
    tmp_path: Path, monkeypatch
) -> None:
    kept = _keep_figures(monkeypatch)
    runs = [load_run(p) for p in _sweep_of_four_keys(tmp_path)]
    plot_sweep(runs, "val/balanced_accuracy", tmp_path / "sweep.png")
    ((_, fig),) = kept
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    keys = ["peft.r", "trainer.lr", "peft.alpha", "seed", "trainer.weight_decay"]
    assert sorted(panels) == sorted(f"val/balanced_accuracy vs {k}" for k in keys)
    assert panels["val/balanced_accuracy vs trainer.lr"].get_xscale() == "log"  # 1e-5 .. 1e-3
    assert panels["val/balanced_accuracy vs peft.r"].get_xscale() == "linear"  # 4 .. 16
    lr = panels["val/balanced_accuracy vs trainer.lr"]
    plotted = sorted(float(x) for c in lr.containers for x in c.lines[0].get_xdata())
    assert plotted == sorted([1e-5, 1e-4, 1e-3, 1e-3] * 2)  # every run, val and test


def test_the_reliability_gap_over_an_accuracy_bar_has_the_legend_colour(
    tmp_path: Path, monkeypatch
) -> None:
    """A bin more accurate than confident: its gap lies over the accuracy bar; what is drawn there
    is the colour the legend shows for "gap", not a blend of the two."""
    import matplotlib.pyplot as plt

    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)
    bins = {"edges": [0.0, 0.5, 1.0], "accuracy": [0.2, 0.9], "confidence": [0.3, 0.6]}
    plot_reliability({**bins, "count": [5, 5]}, tmp_path / "r.png")
    (fig,) = figures
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    height = pixels.shape[0]
    (ax,) = fig.axes

    def dominant(x0: float, y0: float, x1: float, y1: float) -> tuple[int, ...]:
        """The commonest colour of a block of pixels (display coordinates, y up)."""
        block = pixels[int(height - y1) : int(height - y0), int(x0) : int(x1)].reshape(-1, 3)
        found, counts = np.unique(block, axis=0, return_counts=True)
        return tuple(found[counts.argmax()])

    def around(x: float, y: float) -> tuple[int, ...]:
        px, py = ax.transData.transform((x, y))
        return dominant(px - 8, py - 8, px + 8, py + 8)

    swatch = ax.get_legend().get_patches()[1].get_window_extent()
    legend = dominant(swatch.x0 + 2, swatch.y0 + 2, swatch.x1 - 2, swatch.y1 - 2)
    assert around(0.9, 0.7) == legend  # inside the gap, over the accuracy bar
    assert around(0.9, 0.3) != legend  # the accuracy bar below it


# ---- predict --patient ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,named",
    [
        ("SOB_B_A_14-22549AB/100X", "SOB_B_A_14-22549AB"),
        ("SOB_B_A_14-22549AB/100X/", "SOB_B_A_14-22549AB"),
        ("patient_17", "patient_17"),
    ],
)
def test_predict_patient_names_the_patient_not_its_magnification_folder(
    given: str, named: str, tmp_path: Path, monkeypatch
) -> None:
    """`breakhis-ft-predict RUN <patient>/100X/ --patient`: the fused row's patient is the folder
    above the magnification folder (the model and the fusion are stood in for: only the name is
    checked)."""
    folder = tmp_path / given
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    fused: list[str] = []
    monkeypatch.setattr(predict_tool, "load_predictor", lambda *a, **k: None)

    def fuse(predictor, paths, out, patient, fusion, **kw):
        fused.append(patient)
        return {"pred": "x", "n_images": 1, "fusion": "f", "n_unreadable": 0}

    monkeypatch.setattr(predict_tool, "predict_patient", fuse)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}")
    assert predict_tool.main([str(run), given, "--patient", "--out", "p.csv"]) == 0
    assert fused == [named]


def test_each_known_error_has_its_exit_status() -> None:
    """errors.EXIT_CODES: subclasses by their own class (StainFitError is a data error), any
    other error none (a bug: its traceback is printed)."""
    statuses = {
        errors.ConfigError("x"): 2,
        errors.FeatureCacheError("x"): 2,
        errors.BadDataError("x"): 3,
        errors.StainFitError("x"): 3,
        errors.SplitLeakError("x"): 3,
        errors.ModelLoadError("x"): 4,
        errors.CheckpointError("x"): 4,
        errors.DeviceError("x"): 5,
        MemoryBudgetError("x"): 5,  # batch_size=auto: not even 1 fits the memory budget
        errors.NonFiniteError("x"): 6,
        ValueError("x"): None,
        OSError("x"): None,
    }
    assert {type(e).__name__: errors.exit_code(e) for e in statuses} == {
        type(e).__name__: s for e, s in statuses.items()
    }
