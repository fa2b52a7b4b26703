"""The README's demo figure is the recorded one (benchmarks/results/demo_metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from breakhis_ft.tools import demo_metrics as tool

ROOT = Path(__file__).resolve().parent.parent


def test_readme_quotes_the_recorded_demo_figures() -> None:
    record = json.loads((ROOT / tool.RECORD).read_text())
    assert tool.readme_figures((ROOT / "README.md").read_text()) == tool.recorded_figures(record)


SENTENCE = (
    "a test balanced accuracy of {} (validation {}); its validation balanced accuracy goes from\n"
    "{} at the first evaluation to {} at the last ({}) here\n"
)


def _demo_run(outputs: Path, name: str, test: float, val: float, status: str = "completed"):
    run = outputs / "runs" / "demo" / name
    run.mkdir(parents=True)
    metrics = {"val": {"balanced_accuracy": val}, "test": {"balanced_accuracy": test}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    curve = [{"step": 0}, {"step": 5, "val/balanced_accuracy": 0.3004, "val/loss": 2.0}]
    curve += [{"step": 6, "train/loss": 1.0}, {"step": 10, "val/balanced_accuracy": val}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in curve))
    info = {"status": status, "git": {"commit": "abc", "dirty": False}, "versions": {}}
    (run / "run_info.json").write_text(json.dumps(info))
    return run


def test_record_comes_from_the_newest_completed_run_and_rewrites_the_sentence(tmp_path) -> None:
    outputs = tmp_path / "outputs"
    _demo_run(outputs, "2026-01-01_10-00-00-000000", 0.30, 0.40)
    newest = _demo_run(outputs, "2026-01-02_10-00-00-000000", 0.3504, 0.4771)
    _demo_run(outputs, "2026-01-03_10-00-00-000000", 0.9, 0.9, status="failed")
    assert tool.newest_demo_run(outputs) == newest
    record = tool.record_of(newest)
    # the first and last evaluation's validation balanced accuracy and the rise between them
    assert tool.recorded_figures(record) == ("0.350", "0.477", "0.300", "0.477", "+0.177")
    readme = tmp_path / "README.md"
    readme.write_text("it reaches " + SENTENCE.format("0.470", "0.500", "0.1", "0.2", "+0.1"))
    with pytest.raises(ValueError, match="found 0"):  # figures of three decimals only
        tool.readme_figures(readme.read_text())
    wrapped = SENTENCE.replace("at the last", "at the\n  last").replace(
        "balanced accuracy goes", "balanced\naccuracy goes"
    )
    readme.write_text("it reaches " + wrapped.format("0.470", "0.500", "0.100", "0.200", "+0.100"))
    assert tool.readme_figures(readme.read_text())[3:] == ("0.200", "+0.100")  # wrapped anywhere
    readme.write_text("it reaches " + SENTENCE.format("0.470", "0.500", "0.100", "0.200", "+0.100"))
    tool.write_readme(readme, tool.recorded_figures(record))
    assert readme.read_text() == "it reaches " + SENTENCE.format(
        "0.350", "0.477", "0.300", "0.477", "+0.177"
    )  # the line break kept
    with pytest.raises(FileNotFoundError, match="no completed demo run"):
        tool.newest_demo_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="found 0"):
        tool.readme_figures("no figure")


def test_installed_tool_compares_from_any_folder_given_the_files(tmp_path, monkeypatch, capsys):
    run = _demo_run(tmp_path / "outputs", "2026-01-02_10-00-00-000000", 0.3504, 0.4771)
    readme = tmp_path / "README.md"
    readme.write_text(SENTENCE.format("0.350", "0.477", "0.300", "0.477", "+0.177"))
    monkeypatch.chdir(tmp_path)  # README.md, outputs/ and the record relative to this folder
    assert tool.main([]) == 0
    assert "the same" in capsys.readouterr().out
    assert tool.main(["--record"]) == 0  # writes benchmarks/results/demo_metrics.json here
    assert json.loads((tmp_path / tool.RECORD).read_text())["run"] == run.name
    readme.write_text(SENTENCE.format("0.350", "0.477", "0.400", "0.477", "+0.077"))
    assert tool.main([str(run)]) == 1  # the quote differs from this run
    monkeypatch.chdir(tmp_path / "outputs")
    with pytest.raises(SystemExit, match="no README here; run from the repository's root"):
        tool.main([str(run)])
