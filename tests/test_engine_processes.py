"""Separate processes: SIGKILL mid-run then resume equals uninterrupted; two ranks over gloo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import engine_driver
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from breakhis_ft.engine.checkpoint import find_latest_checkpoint, list_checkpoints
from breakhis_ft.evaluate.metrics import compute_metrics, malignant_flags, read_predictions

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "engine_driver.py"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def drive(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), str(run_dir), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def run_in_process(run_dir: Path, *args: str) -> None:
    """The driver in this process (saves an interpreter start); same single-thread arithmetic."""
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        engine_driver.main([str(run_dir), *args])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # three processes; the entrypoint test covers SIGKILL + resume
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    common = ("--grad-accum", "2", "--checkpoint-every", "3")
    run_in_process(tmp_path / "ref", *common)
    # 8 batches an epoch, 2 per update, checkpoints every 3 updates: the 11th loss call is in
    # epoch 1 (update 6); the last checkpoint (step 3) sits mid-epoch 0, so resume skips batches
    killed = drive(tmp_path / "cut", *common, "--kill-at", "11")
    assert killed.returncode == -signal.SIGKILL
    assert find_latest_checkpoint(tmp_path / "cut").name == "step_000003"
    assert not (tmp_path / "cut" / "result.json").exists()
    resumed = drive(tmp_path / "cut", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(str(tmp_path / "ref" / "final.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_result = json.loads((tmp_path / "ref" / "result.json").read_text())
    cut_result = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert ref_result["global_step"] == cut_result["global_step"] == 8
    assert ref_result["history"] == cut_result["history"]
    assert (tmp_path / "ref" / "metrics.json").read_text() == (
        tmp_path / "cut" / "metrics.json"
    ).read_text()


@pytest.mark.slow  # two processes (torchrun)
def test_two_processes_share_one_run_folder(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun not found beside the Python interpreter"
    run_dir = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(DRIVER), str(run_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads((run_dir / "result.json").read_text())
    assert result["num_processes"] == 2
    # 32 images, batch 4 per rank: 4 updates an epoch (a single process makes 8)
    assert result["global_step"] == 8
    # DDP kept both ranks' weights identical
    assert result["weight_sums"][0] == result["weight_sums"][1]
    # only the main process logged; one folder; each rank saved its RNG state in the checkpoint
    assert sorted(p.name for p in run_dir.glob("log_rank*.jsonl")) == ["log_rank0.jsonl"]
    last = list_checkpoints(run_dir)[-1][1]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in last.iterdir()}
    # predictions: all 21 test images once, none duplicated by the padding of uneven shards
    back = read_predictions(run_dir / "predictions_test.csv")
    assert len(back["paths"]) == 21 and len(set(back["paths"])) == 21
    metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert metrics["n"] == 21
    again = compute_metrics(
        back["probs"],
        back["labels"],
        back["classes"],
        back["patients"],
        back["magnifications"],
        malignant_flags(back["classes"]),
    )
    assert json.loads(json.dumps(again)) == metrics
