"""Published protocols through the entrypoint, at tiny sizes: the blog notebook verbatim, the
generation evaluation of a MedGemma run, eva's linear probe over 5 seeds and its report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers.cli_runs import FAST, run_cli
from helpers.cli_runs import read_metrics as _metrics
from helpers.cli_runs import single_run_dir as _single_run_dir

from breakhis_ft.analysis.leaderboard import eva_summaries
from breakhis_ft.analysis.runs import find_runs, load_run

TINY_GEMMA = ["data=synthetic", "model=tiny_gemma3", "logger=none", *FAST]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder (replica, tiny models) for the runs of this module."""
    return tmp_path_factory.mktemp("protocols_cache")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _optimizer_state_keys(run_dir: Path) -> set[str]:
    """The per-parameter state keys of the last checkpoint's optimizer (bitsandbytes nests its
    state1/state2 under `__bnb_optimizer_quant_state__`; torch AdamW has exp_avg)."""
    (ckpt,) = sorted((run_dir / "checkpoints").glob("step_*"))[-1:]
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    keys = set()
    for per_param in state.values():
        keys.update(per_param)
        keys.update(per_param.get("__bnb_optimizer_quant_state__", {}))
    return keys


@pytest.mark.slow
def test_blog_notebook_preset_runs_end_to_end_on_the_tiny_model(tmp_path, cache) -> None:
    done = run_cli(
        [
            "experiment=blog_notebook_100x",
            *TINY_GEMMA,
            "trainer.max_steps=2",
            "trainer.batch_size=4",
            "trainer.grad_accum=1",
            "trainer.gradient_checkpointing=false",
            "model.max_new_tokens=3",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        cache,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = _single_run_dir(tmp_path / "out")
    metrics = _metrics(run_dir)
    assert list(metrics) == ["test"]  # no validation set
    test = metrics["test"]
    assert 0 <= test["parse_failures"] <= test["n"]
    assert test["parse_failure_rate"] == test["parse_failures"] / test["n"]
    rows = _rows(run_dir / "predictions_test.csv")
    assert len(rows) == test["n"] and all("raw_answer" in r for r in rows)
    unparseable = [r for r in rows if r["pred"] == "unparseable"]
    assert len(unparseable) == test["parse_failures"]
    # test evaluated during training (logged only), the final model reported
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("test/balanced_accuracy" in row for row in history)
    assert not any(k.startswith("val/") for row in history for k in row)
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["duplicate_kept"] == {"13412": "both"} and set(stats["duplicate_leak"]) == {
        "val",
        "test",
    }
    assert "data.duplicate_keep=both" in (run_dir / "breakhis-ft.log").read_text()
    assert {"state1", "state2"} <= _optimizer_state_keys(run_dir)  # bitsandbytes' AdamW, trained
    assert "exp_avg" not in _optimizer_state_keys(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "completed" and info["value"] is None  # nothing selected on test


@pytest.mark.slow  # training, scoring and generating val and test: about a minute
def test_demo_scored_and_generated_with_an_8bit_optimizer(tmp_path, cache) -> None:
    done = run_cli(
        [
            "experiment=demo",
            *TINY_GEMMA,
            "model.eval_mode=both",
            "model.max_new_tokens=3",
            "trainer/optimizer=adamw_8bit",
            "magnification=40x",  # a quarter of the images: val and test of ~14
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        cache,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = _single_run_dir(tmp_path / "out")
    metrics = _metrics(run_dir)
    for split in ("val", "test"):
        m = metrics[split]
        gen = m["generation"]
        assert m["auroc_macro"] is not None and gen["auroc_macro"] is None  # scores vs answers
        assert 0 <= gen["parse_failures"] <= m["n"] and 0.0 <= m["agreement"] <= 1.0
        rows = _rows(run_dir / f"predictions_{split}.csv")
        assert len(rows) == m["n"]
        assert {"raw_answer", "generated_pred", "prob_adenosis"} <= set(rows[0])
        agree = sum(r["pred"] == r["generated_pred"] for r in rows) / len(rows)
        assert agree == pytest.approx(m["agreement"])
        failures = sum(r["generated_pred"] == "unparseable" for r in rows)
        assert failures == gen["parse_failures"]
    assert {"state1", "state2"} <= _optimizer_state_keys(run_dir)  # bitsandbytes' AdamW8bit


@pytest.mark.slow  # five runs in one multirun: about 30 s on a quiet 2-core machine
def test_eva_probe_runs_its_five_seeds_and_the_report_gives_mean_and_sd(tmp_path, cache) -> None:
    done = run_cli(
        [
            "-m",
            "experiment=eva_medsiglip_linear_probe",
            "data=synthetic",
            "model=tiny_siglip",
            "logger=none",
            "data.synthetic_fraction=0.05",
            "data.synthetic_size=[48,32]",
            "trainer.max_steps=8",
            "trainer.batch_size=16",
            "trainer.early_stopping_patience=3",
            "precision=fp32",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        cache,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [load_run(p) for p in find_runs([tmp_path / "out"])]
    assert sorted(r.config["seed"] for r in runs) == [0, 1, 2, 3, 4]
    assert all(r.config["model.resize"] == "shorter_side_crop" for r in runs)
    assert all("test" not in r.metrics for r in runs)  # eva has no test split
    (summary,) = eva_summaries(runs)
    assert summary.n == 5 and summary.name == "eva_medsiglip_linear_probe"
    report = run_cli_report(tmp_path / "out")
    assert f"| **eva_medsiglip_linear_probe** | {summary.mean:.3f} ± {summary.std:.3f} |" in report


def run_cli_report(root: Path) -> str:
    """The Markdown that breakhis-ft-report prints for the runs under `root`."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "breakhis_ft.tools.report", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout
