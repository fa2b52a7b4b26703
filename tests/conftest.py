"""Shared fixtures: synthetic BreakHis replicas, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from breakhis_ft.data.breakhis import BreakhisScan, scan_breakhis
from breakhis_ft.data.synthetic import build_replica

REPLICA_FRACTION = 0.05  # ~480 images, every patient folder at every magnification
REPLICA_SIZE = (48, 32)
FULL_REPLICA_SIZE = (16, 10)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked `gpu` where torch sees no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def replica_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small replica (fraction 0.05 at 48x32) in the official layout with a Folds.csv."""
    return build_replica(tmp_path_factory.mktemp("replica"), REPLICA_FRACTION, REPLICA_SIZE, 0)


@pytest.fixture(scope="session")
def replica_scan(replica_root: Path) -> BreakhisScan:
    """The scan of `replica_root` (13412's lobular copy dropped)."""
    return scan_breakhis(replica_root)


@pytest.fixture(scope="session")
def full_replica_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 7,909 images of the real counts, at a tiny 16x10 (for the count tests)."""
    return build_replica(tmp_path_factory.mktemp("full_replica"), 1.0, FULL_REPLICA_SIZE, 0)


@pytest.fixture(scope="session")
def full_replica_scan(full_replica_root: Path) -> BreakhisScan:
    """The scan of `full_replica_root`."""
    return scan_breakhis(full_replica_root)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private BREAKHIS_FT_CACHE for one test module (set while its tests run): the run folders
    its tiny runs write resolve their model and data paths through it."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BREAKHIS_FT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny MedGemma run through the entrypoint with W&B offline, given secrets in its
    environment and in `+key=value` overrides: (run folder, cache folder)."""
    from helpers.cli_runs import (
        ADDED_SECRETS,
        FAST,
        SECRET_ENV,
        SECRET_OVERRIDE,
        run_cli,
        single_run_dir,
    )

    base = tmp_path_factory.mktemp("entry")
    args = ["model=tiny_gemma3", "logger.mode=offline", *FAST, "=".join(SECRET_OVERRIDE)]
    args += [f"{key}={value}" for key, value in ADDED_SECRETS.items()]
    done = run_cli([*args, f"paths.output_dir={base / 'a'}"], base / "cache", **SECRET_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    (base / "first_run.stdout").write_text(done.stdout)  # what the terminal showed
    (base / "first_run.stderr").write_text(done.stderr)
    return single_run_dir(base / "a"), base / "cache"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine more threads only contend (5 s vs 40+ s)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each test builds its own Accelerator: accelerate's state is a process-wide singleton that
    refuses a second configuration (e.g. bf16 then fp32), which a separate process never meets."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
