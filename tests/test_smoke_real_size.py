"""`python -m benchmarks real-size --reduced`: MedGemma 4B's widths, vocabulary and image size with
6 + 2 layers, one real step each on the CPU, measured against estimate_vram (minutes: slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_reduced_real_size_smoke_matches_the_estimator(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "before\n<!-- real_size_cpu_reduced: begin -->\nold\n<!-- real_size_cpu_reduced: end -->\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "real-size", "--reduced", "--threads", "1"]
        + ["--out", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # nothing is downloaded
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "real_size_cpu_reduced.json").read_text())
    phases = report["phases"]
    assert phases["medgemma processor"]["image_tokens_per_image"] == [256, 256]
    assert phases["medgemma processor"]["train_labelled_tokens_per_image"] == [2, 2]
    assert all(
        abs(sum(row) - 1) < 1e-3 for row in phases["medgemma label scoring"]["probabilities"]
    )
    for name in ("medgemma train step, pixels", "medgemma train step, cached features"):
        step = phases[name]
        assert math.isfinite(step["loss"]) and step["flops"] > 0 and step["cpu_mfu"] > 0
        assert abs(step["static_ratio"] - 1) <= 0.02, step["static_ratio"]
        assert abs(step["activations_ratio"] - 1) <= 0.15, step["activations_ratio"]
    pixels = phases["medgemma train step, pixels"]["flops"]
    assert pixels > phases["medgemma train step, cached features"]["flops"]  # + the vision tower
    probe = phases["medsiglip probe step"]
    assert math.isfinite(probe["loss"]) and abs(probe["static_ratio"] - 1) <= 0.02
    table = (tmp_path / "real_size_cpu_reduced.md").read_text()
    assert readme.read_text() == (
        "before\n<!-- real_size_cpu_reduced: begin -->\n"
        f"{table}<!-- real_size_cpu_reduced: end -->\n"
    )
