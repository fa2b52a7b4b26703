"""A built wheel is the whole product: installed with its dependencies into a fresh virtual
environment, every preset composes and every installed tool answers --help and does one real job
from a folder outside the repository (slow: builds a wheel and installs torch and the rest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers.cli_runs import TINY_RUN

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
TOOLS = (
    "report",
    "predict",
    "explain",
    "export",
    "estimate-vram",
    "data-stats",
    "make-replica",
    "download-breakhis",
    "demo-metrics",
    "stain-preview",
    "cloudrun",
    "workspace",
)
TORCH = "torch==2.13.0"  # as `make setup` installs it: the CPU build on CPU machines
REPLICA = ["--fraction", "0.03", "--size", "48", "32"]  # the tiny run's data.synthetic_*


def _run(*args: str, cwd: Path, env: dict | None = None, code: int = 0) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == code, (
        f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel and its dependencies: its bin/ folder."""
    tmp = tmp_path_factory.mktemp("packaging")
    wheels = tmp / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(wheels), str(REPO)]
    built = _run(*build, cwd=tmp)
    # every folder that ships files is a declared package: setuptools warns about none
    assert "is absent from the `packages` configuration" not in built
    (wheel,) = wheels.glob("breakhis_ft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("benchmarks/")], "benchmarks/ is repository-only"
    assert {f"breakhis_ft/tools/{t.replace('-', '_')}.py" for t in TOOLS if t != "export"} <= set(
        names
    )
    assert "breakhis_ft/conf/train.yaml" in names
    assert "hydra_plugins/breakhis_ft_plugins/array_launcher.py" in names  # Hydra's namespace
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp)
    pip = str(venv / "bin" / "pip")
    _run(pip, "install", "-q", TORCH, cwd=tmp)
    _run(pip, "install", "-q", str(wheel), cwd=tmp)
    return venv / "bin"


@pytest.mark.slow
def test_wheel_composes_every_preset_from_anywhere(venv: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for experiment in EXPERIMENTS:
        out = _run(
            str(venv / "breakhis-ft"),
            f"experiment={experiment}",
            "data.root=/data/BreaKHis_v1",
            "--cfg",
            "job",
            cwd=outside,
        )
        assert f"experiment_name: {experiment}" in out
    assert not list(outside.iterdir()), "composing a config writes nothing"
    # Hydra's own scan of the hydra_plugins namespace finds the plugins the wheel installs
    scan = "from hydra.core.plugins import Plugins; print(Plugins.instance().class_name_to_class)"
    found = _run(str(venv / "python"), "-c", scan, cwd=outside)
    assert "hydra_plugins.breakhis_ft_plugins.array_launcher.ArrayLauncher" in found
    assert "hydra_plugins.breakhis_ft_plugins.shared_study_sweeper.SharedStudySweeper" in found
    plan = _run(
        str(venv / "breakhis-ft"),
        "-m",
        "launcher=array",
        "peft.r=4,8",
        "hydra.launcher.plan_only=true",
        f"hydra.sweep.dir={tmp_path / 'plan'}",
        cwd=outside,
    )
    assert "2 jobs for 2 tasks" in plan and (tmp_path / "plan" / "sweep_plan.json").is_file()
    no_benchmarks = _run(str(venv / "python"), "-c", "import benchmarks", cwd=outside, code=1)
    assert "No module named 'benchmarks'" in no_benchmarks


@pytest.mark.slow
def test_every_installed_tool_runs_outside_the_repository(venv: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        **os.environ,
        "BREAKHIS_FT_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded: tiny models, the packaged MedGemma config
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }

    def tool(name: str, *args: str, code: int = 0) -> str:
        return _run(str(venv / f"breakhis-ft-{name}"), *args, cwd=work, env=env, code=code)

    for name in TOOLS:
        assert "usage: breakhis-ft-" + name in tool(name, "--help")
    assert "data.root=" in tool("make-replica", "replica", *REPLICA)
    stats = json.loads(tool("data-stats", "replica", "--json"))
    assert stats["images"] > 0 and stats["layout"]
    _run(
        str(venv / "breakhis-ft"),
        "experiment=demo",
        "logger=none",
        *TINY_RUN,
        f"data.root={work / 'replica'}",
        "paths.output_dir=outputs",
        cwd=work,
        env=env,
    )
    (run,) = (work / "outputs" / "runs" / "demo").iterdir()
    assert "| demo |" in tool("report", "outputs", "--out", "report")
    assert (work / "report" / "report.md").is_file()
    images = sorted((work / "replica").rglob("*.png"))[:3]
    tool("predict", str(run), *map(str, images), "--out", "preds.csv", "--cpu", "--no-progress")
    assert len((work / "preds.csv").read_text().splitlines()) == 1 + len(images)
    tool("explain", str(run), "--split", "test", "--n", "2", "--out", "expl", "--cpu")
    assert len(list((work / "expl").glob("*.png"))) == 2
    tool("export", str(run), "export", "--adapter-only")
    card = (work / "export" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    assert str(tmp_path) not in card and str(REPO) not in card
    assert "peak allocated" in tool(
        "estimate-vram", "experiment=medgemma_lora_100x", "--json", "vram.json"
    )
    (work / "README.md").write_text(
        "test balanced accuracy of 0.000 (validation 0.000); its validation balanced accuracy "
        "goes from 0.000 at the first evaluation to 0.000 at the last (+0.000)\n"
    )
    tool("demo-metrics", "--record")  # the newest outputs/runs/demo run, README.md here
    assert "the same" in tool("demo-metrics")
    no_extra = tool("workspace", "--entity", "e", "--project", "p", "--dry-run", code=1)
    assert "pip install 'breakhis-ft[workspace]'" in no_extra  # the wheel without its extra
    (work / "dl").mkdir()
    with tarfile.open(work / "dl" / "BreaKHis_v1.tar.gz", "w:gz") as tar:  # no network needed:
        tar.add(work / "replica" / "BreaKHis_v1", "BreaKHis_v1")  # an archive already there
    out = tool("download-breakhis", "dl", code=1)  # unpacked and scanned: not the full set
    assert f"error: {stats['images_scanned']} images found under dl, expected 7909" in out
