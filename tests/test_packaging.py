"""A built wheel carries the configs: installed into a fresh virtual environment, every preset
composes from a folder outside the repository (slow: builds and installs a wheel)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _run(*args: str, cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    )
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_with_its_configs_and_composes_every_preset(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(wheels), str(REPO)]
    built = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    # every folder that ships files is a declared package: setuptools warns about none
    assert "is absent from the `packages` configuration" not in built.stdout + built.stderr
    (wheel,) = wheels.glob("breakhis_ft-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    pip = str(venv / "bin" / "pip")
    # composing needs only Hydra: the heavy dependencies (torch ...) are not installed here
    _run(pip, "install", "-q", "--no-deps", str(wheel), cwd=tmp_path)
    _run(pip, "install", "-q", "hydra-core>=1.3,<1.4", "omegaconf>=2.3,<2.4", cwd=tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    exe = str(venv / "bin" / "breakhis-ft")
    for experiment in EXPERIMENTS:
        out = _run(
            exe,
            f"experiment={experiment}",
            "data.root=/data/BreaKHis_v1",
            "--cfg",
            "job",
            cwd=outside,
        )
        assert f"experiment_name: {experiment}" in out
    assert not list(outside.iterdir()), "composing a config writes nothing"
