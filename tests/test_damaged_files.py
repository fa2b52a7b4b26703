"""Damaged files the project wrote: checkpoints, best/, cache shards (checked against the sha256
recorded when written, named, skipped or rebuilt), and temporaries of builds that died."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.engine_toy import ToyClassifier, ToyDataset, fit, fresh_accelerator, trainer_config

from breakhis_ft.data import dataset as ds_mod
from breakhis_ft.data.dataset import ImageDataset, build_image_cache
from breakhis_ft.engine import checkpoint as ckpt
from breakhis_ft.engine.checkpoint import list_checkpoints
from breakhis_ft.models.embedding_cache import EmbeddingCache
from breakhis_ft.run.experiment import _resume_step

REPO = Path(__file__).resolve().parent.parent


def toy_run(run_dir: Path, classifier=None, resume: bool = False, val: bool = False):
    """The toy classifier trained 16 steps, a checkpoint every 2 (the last two kept)."""
    cfg = trainer_config(epochs=2, checkpoint_every_steps=2, eval_every_steps=2)
    classifier = classifier or ToyClassifier()
    acc = fresh_accelerator(cfg)
    val_ds = ToyDataset(n=16, seed=1) if val else None
    result = fit(classifier, ToyDataset(n=32), val_ds, cfg, run_dir, acc, resume=resume)
    return classifier, result


def weights(classifier) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in classifier.trainable_state_dict().items()}


def interrupted(run_dir: Path, at: int = 7, val: bool = False) -> None:
    """A toy run stopped by Ctrl-C during batch `at`: the checkpoints of the two steps before."""
    clf = ToyClassifier()
    clf.interrupt_at = at
    with pytest.raises(KeyboardInterrupt):
        toy_run(run_dir, clf, val=val)
    assert [s for s, _ in list_checkpoints(run_dir)] == [at - 3, at - 1]


def garble(path: Path) -> None:
    """Flip bytes in the middle of a file: the same size, another content."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, min(len(data), len(data) // 2 + 8)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the toy run trained without interruption."""
    clf, _ = toy_run(tmp_path_factory.mktemp("ref") / "run")
    return weights(clf)


@pytest.mark.parametrize("damage", [garble, truncate])
def test_resume_skips_a_damaged_checkpoint_for_the_older_one(
    damage, reference, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    interrupted(run_dir)
    damaged = run_dir / "checkpoints" / "step_000006" / "model.safetensors"
    damage(damaged)
    cfg = SimpleNamespace(resume=str(run_dir))
    with caplog.at_level(logging.WARNING):
        assert _resume_step(cfg, run_dir) == 4  # the tracker keeps metrics up to step 4
    assert f"skipping checkpoint step_000006: {damaged}: damaged" in caplog.text
    resumed, result = toy_run(run_dir, ToyClassifier(seed=123), resume=True)
    assert result.global_step == 16
    # continued from step 4, not from the garbled weights: the uninterrupted run's result
    assert all(torch.equal(reference[k], v) for k, v in weights(resumed).items())


def test_resume_refuses_when_no_checkpoint_verifies(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    interrupted(run_dir)
    garble(run_dir / "checkpoints" / "step_000006" / "optimizer.bin")
    truncate(run_dir / "checkpoints" / "step_000004" / "model.safetensors")
    with pytest.raises(RuntimeError) as err:  # CheckpointError
        _resume_step(SimpleNamespace(resume=str(run_dir)), run_dir)
    assert "step_000006/optimizer.bin: damaged" in str(err.value)
    assert "step_000004/model.safetensors: damaged" in str(err.value)
    with pytest.raises(RuntimeError, match="no checkpoint of .* verifies"):
        toy_run(run_dir, resume=True)


def test_best_interrupted_between_its_two_renames_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    interrupted(run_dir, at=9, val=True)  # evaluations at steps 2..8: best/ saved
    before = (run_dir / "best" / "trainable.safetensors").read_bytes()
    real_replace = os.replace

    def dies_after_the_first_rename(src, dst):  # SIGKILL between the two renames
        real_replace(src, dst)
        if Path(dst).name == ".old-best":
            raise SystemExit("killed")

    monkeypatch.setattr(ckpt.os, "replace", dies_after_the_first_rename)
    with pytest.raises(SystemExit):
        ckpt.save_trained_atomic(ToyClassifier(seed=5), run_dir / "best")
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not (run_dir / "best").exists() and (run_dir / ".old-best").is_dir()
    assert _resume_step(SimpleNamespace(resume=str(run_dir)), run_dir) == 8
    assert (run_dir / "best" / "trainable.safetensors").read_bytes() == before
    assert not (run_dir / ".old-best").exists() and not (run_dir / ".tmp-best").exists()
    assert ckpt.checkpoint_problem(run_dir / "best") is None  # its checksums match
    ToyClassifier().load_trained(run_dir / "best")


@pytest.fixture
def small(tmp_path: Path, replica_scan):
    """A private copy of 8 replica images."""
    records = replica_scan.records[::50][:8]
    for r in records:
        (tmp_path / "data" / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(replica_scan.root / r.path, tmp_path / "data" / r.path)
    return records, tmp_path / "data", tmp_path / "cache"


@pytest.mark.parametrize("damage", [garble, truncate])
def test_a_damaged_image_cache_shard_is_named_and_rebuilt(
    damage, small, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    records, root, cache_dir = small
    labels = [0] * len(records)
    first = ImageDataset(records, labels, build_image_cache(records, root, 24, cache_dir))
    expected = [first.load(i).tobytes() for i in range(len(records))]
    (arrow,) = (cache_dir / "images").rglob("data.arrow")
    damage(arrow)
    decoded = []
    real = ds_mod._decode
    monkeypatch.setattr(ds_mod, "_decode", lambda *a: decoded.append(a) or real(*a))
    with caplog.at_level(logging.WARNING):
        again = ImageDataset(records, labels, build_image_cache(records, root, 24, cache_dir))
    assert f"damaged shard {arrow.parent}" in caplog.text and "data.arrow: damaged" in caplog.text
    assert len(decoded) == len(records) and not arrow.parent.exists()  # rebuilt, not reused
    assert [again.load(i).tobytes() for i in range(len(records))] == expected


def test_a_damaged_embedding_shard_is_named_and_recomputed(
    small, caplog: pytest.LogCaptureFixture
) -> None:
    records, root, cache_dir = small
    paths = [r.path for r in records]
    calls = []

    def encode(images):
        calls.append(len(images))
        return torch.stack(
            [torch.tensor(img.getpixel((0, 0)), dtype=torch.float32) for img in images]
        )

    table, computed = EmbeddingCache(cache_dir, {"id": 1}).get_or_compute(paths, root, encode)
    assert computed == len(paths)
    (shard,) = cache_dir.rglob("shard-*.safetensors")
    garble(shard)
    with caplog.at_level(logging.WARNING):
        again, recomputed = EmbeddingCache(cache_dir, {"id": 1}).get_or_compute(paths, root, encode)
    assert recomputed == len(paths) and str(shard) in caplog.text
    assert torch.equal(again.lookup(paths), table.lookup(paths))


KILLED_BUILD = """
import os, signal, sys
from breakhis_ft.data import dataset
from breakhis_ft.data.breakhis import scan_breakhis
records = scan_breakhis(sys.argv[1]).records[:4]
real = dataset._decode
def dies(*args):  # SIGKILL half-way through the build, its temporary folder written
    os.kill(os.getpid(), signal.SIGKILL)
dataset._decode = dies
dataset.build_image_cache(records, sys.argv[1], 24, sys.argv[2], workers=1, progress=False)
"""

LIVE_BUILD = """
import sys, time
from pathlib import Path
from breakhis_ft.files import build_lock, temp_beside
with build_lock(Path(sys.argv[1])):
    temp_beside(Path(sys.argv[1])).mkdir()
    print("building", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_temporaries_of_a_killed_cache_build_are_removed(replica_root: Path, tmp_path: Path):
    cache_dir = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(replica_root), str(cache_dir)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    images = cache_dir / "images"
    assert len(temporaries(images)) == 1  # what the killed build left
    from breakhis_ft.data.breakhis import scan_breakhis

    records = scan_breakhis(replica_root).records[:4]
    cache = build_image_cache(records, replica_root, 24, cache_dir, progress=False)
    assert temporaries(images) == [] and len(cache) == 4


def test_a_live_builders_temporary_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "images" / "key"
    child = subprocess.Popen(
        [sys.executable, "-c", LIVE_BUILD, str(target), "3"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "building"
    (live,) = temporaries(target.parent)
    from breakhis_ft.files import build_lock, remove_dead_builds

    remove_dead_builds(target)  # a reader: the builder is alive, its folder stays
    assert live.is_dir()
    entered = threading.Event()

    def second_builder():
        with build_lock(target):
            entered.set()

    thread = threading.Thread(target=second_builder)
    thread.start()
    time.sleep(1.0)
    assert not entered.is_set() and live.is_dir()  # it waits for the live builder
    child.kill()  # the first builder dies mid-build: its temporary is stale now
    child.wait()
    thread.join(timeout=30)
    assert entered.is_set() and not live.exists()


def test_the_replica_build_removes_temporaries_of_dead_builds(tmp_path: Path) -> None:
    from breakhis_ft.data.synthetic import ensure_replica, replica_key

    synthetic = tmp_path / "synthetic"
    stale = synthetic / f".tmp-{replica_key(0.01, (16, 10), 0)}-deadbeef"
    (stale / "BreaKHis_v1").mkdir(parents=True)  # what a SIGKILLed build left
    root = ensure_replica(synthetic, 0.01, (16, 10), 0)
    assert root.is_dir() and not stale.exists() and temporaries(synthetic) == []


def test_folder_manifest_of_a_relative_folder_names_files_inside_it(tmp_path, monkeypatch):
    from breakhis_ft.files import manifest_problem, write_folder_manifest

    monkeypatch.chdir(tmp_path)  # a run folder given relative to the working directory
    folder = Path("runs") / "r" / "step_1"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "sub" / "state.json").write_text("{}")
    manifest = write_folder_manifest(folder)
    names = [line.split()[1] for line in manifest.read_text().splitlines()]
    assert names == ["model.safetensors", "sub/state.json"]
    assert manifest_problem(manifest) is None
