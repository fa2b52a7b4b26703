"""Cross-validation as one command: experiment=demo_cv3 at a tiny size, then report.py over it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli_runs import REPO, run_cli

TINY = [
    "logger=none",
    "data.synthetic_fraction=0.03",
    "data.synthetic_size=[48,32]",
    "data.image_size=32",
    "trainer.max_steps=2",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=64",
    "evaluate.bootstrap_resamples=200",
]


@pytest.mark.slow
def test_demo_cv3_is_one_command_and_the_report_averages_its_folds(tmp_path: Path) -> None:
    done = run_cli(["experiment=demo_cv3", *TINY, f"paths.output_dir={tmp_path}"], tmp_path / "c")
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "sweeps" / "demo_cv3").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert jobs == ["job0", "job1", "job2"]
    # every image of the replica is tested exactly once over the three folds
    tested = [
        line.split(",")[0]
        for job in jobs
        for line in (sweep / job / "predictions_test.csv").read_text().splitlines()[1:]
    ]
    assert len(tested) == len(set(tested))
    report = subprocess.run(
        [sys.executable, "-m", "breakhis_ft.tools.report", str(sweep)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    out = report.stdout
    assert "### (all runs): 3 runs over split.fold" in out
    assert "| mean ± std (3 runs) |" in out
    assert f"| pooled out-of-fold, folds 1,2,3 ({len(tested)} images) |" in out
    for fold in (1, 2, 3):
        assert f"| split.fold={fold} |" in out
