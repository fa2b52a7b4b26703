"""The README's demo figure is the recorded one (benchmarks/demo_metrics.json, from a run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location(
        "demo_metrics", ROOT / "scripts" / "demo_metrics.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_quotes_the_recorded_demo_figures() -> None:
    tool = _tool()
    record = json.loads((ROOT / "benchmarks" / "demo_metrics.json").read_text())
    assert tool.readme_figures((ROOT / "README.md").read_text()) == tool.recorded_figures(record)


def _demo_run(outputs: Path, name: str, test: float, val: float, status: str = "completed"):
    run = outputs / "runs" / "demo" / name
    run.mkdir(parents=True)
    metrics = {"val": {"balanced_accuracy": val}, "test": {"balanced_accuracy": test}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    info = {"status": status, "git": {"commit": "abc", "dirty": False}, "versions": {}}
    (run / "run_info.json").write_text(json.dumps(info))
    return run


def test_record_comes_from_the_newest_completed_run_and_rewrites_the_sentence(tmp_path) -> None:
    tool = _tool()
    outputs = tmp_path / "outputs"
    _demo_run(outputs, "2026-01-01_10-00-00-000000", 0.30, 0.40)
    newest = _demo_run(outputs, "2026-01-02_10-00-00-000000", 0.3504, 0.4771)
    _demo_run(outputs, "2026-01-03_10-00-00-000000", 0.9, 0.9, status="failed")
    assert tool.newest_demo_run(outputs) == newest
    record = tool.record_of(newest)
    assert tool.recorded_figures(record) == ("0.350", "0.477")
    readme = tmp_path / "README.md"
    readme.write_text("it reaches a test balanced accuracy of 0.470 (validation 0.500) here\n")
    tool.write_readme(readme, *tool.recorded_figures(record))
    assert readme.read_text() == (
        "it reaches a test balanced accuracy of 0.350 (validation 0.477) here\n"
    )
    with pytest.raises(FileNotFoundError, match="no completed demo run"):
        tool.newest_demo_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="found 0"):
        tool.readme_figures("no figure")
