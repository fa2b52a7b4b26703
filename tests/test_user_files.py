"""The user's files are theirs: a folder of real data given as data.root, a folder given as
hydra.run.dir, a name that leaves paths.output_dir and a saved config written by someone else are
read or refused, never written or executed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.cli_runs import FAST, run_cli, run_info
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from breakhis_ft.config import register_configs
from breakhis_ft.data.synthetic import (
    MARKER,
    build_replica,
    check_replica_folder,
    ensure_replica_at,
    replica_complete,
)
from breakhis_ft.errors import BadDataError, ConfigError
from breakhis_ft.run.ownership import (
    STAMP_FILE,
    RunFolderError,
    check_new_run_folder,
    check_resumable,
    stamp_run_folder,
)
from breakhis_ft.run.saved_config import ALLOWED_TARGETS, check_saved_config

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry below `folder`: its bytes (None for a folder) and its mtime in ns."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def fake_breakhis(root: Path, replica_root: Path) -> Path:
    """A user's real-data folder: a few PNGs in the official tree and a Kaggle Folds.csv."""
    images = sorted(replica_root.rglob("*.png"))[:3]
    for image in images:
        dest = root / image.relative_to(replica_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image, dest)
    (root / "BreaKHis_v1" / "Folds.csv").write_text("fold,mag,grp,filename\n1,40,train,x.png\n")
    return root


# ---- 1. data.root with the synthetic data group ------------------------------------------------


def test_a_real_data_folder_as_data_root_of_the_replica_is_refused_untouched(
    first_run, replica_root: Path, tmp_path: Path
) -> None:
    """`breakhis-ft data.root=/data/BreaKHis_v1` (default data group: synthetic) refuses with the
    fix, data=breakhis, and leaves every file as it was (bytes and mtimes)."""
    _, cache = first_run
    real = fake_breakhis(tmp_path / "BreaKHis_v1_download", replica_root)
    before = snapshot(real)
    done = run_cli(
        [f"data.root={real}", "logger=none", *FAST, f"paths.output_dir={tmp_path / 'o'}"], cache
    )
    assert done.returncode == 3, done.stderr[-3000:]  # a data error (errors.EXIT_CODES)
    assert "holds BreakHis data" in done.stderr
    assert f"data=breakhis data.root={real}" in done.stderr  # the fix
    assert snapshot(real) == before
    assert not (tmp_path / "o").exists()  # refused before Hydra made a run folder


@pytest.mark.parametrize(
    "content",
    [
        {"BreaKHis_v1/histology_slides/breast/benign/.keep": b""},  # the tree, no image yet
        {"Folds.csv": b"fold,mag,grp,filename\n"},
        {"slide.tif": b"II*\x00"},
        {"notes.txt": b"mine"},  # not BreakHis, but not empty and not a replica either
    ],
)
def test_a_replica_is_built_only_into_a_new_empty_or_replica_folder(
    content: dict[str, bytes], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    for name, data in content.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    before = snapshot(root)
    with pytest.raises(BadDataError, match="nothing was written") as refused:
        ensure_replica_at(root, 0.01, (16, 10), 0)
    assert ("holds BreakHis data" in str(refused.value)) == ("notes.txt" not in content)
    with pytest.raises(BadDataError):
        build_replica(root, 0.01, (16, 10), 0)
    assert snapshot(root) == before


def test_an_empty_folder_gets_the_replica_and_is_reused(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    assert ensure_replica_at(root, 0.01, (16, 10), 0) == root
    assert replica_complete(root) and json.loads((root / MARKER).read_text())["complete"]
    stamped = snapshot(root)
    assert ensure_replica_at(root, 0.01, (16, 10), 0) == root  # reused, nothing rewritten
    assert snapshot(root) == stamped
    with pytest.raises(BadDataError, match="other settings"):
        ensure_replica_at(root, 0.01, (16, 10), 1)
    check_replica_folder(root)  # a replica's own folder may be rebuilt
    check_replica_folder(tmp_path / "new")


def test_an_interrupted_build_is_ours_and_rebuilt(tmp_path: Path) -> None:
    """A build stamps the folder (complete: false) before writing images: a crash leaves a folder
    that is recognisably a replica's, rebuilt on next use instead of refused or used half-built."""
    root = tmp_path / "root"
    root.mkdir()
    (root / MARKER).write_text(json.dumps({"complete": False}))
    (root / "BreaKHis_v1").mkdir()
    (root / "BreaKHis_v1" / "half.png").write_bytes(b"\x89PNG")
    assert not replica_complete(root)
    ensure_replica_at(root, 0.01, (16, 10), 0)
    assert replica_complete(root) and not (root / "BreaKHis_v1" / "half.png").exists()


# ---- 2. hydra.run.dir --------------------------------------------------------------------------


def user_folder(root: Path) -> Path:
    """A user's folder that looks like a run: best/notes.txt, checkpoints/x, metrics.json."""
    (root / "best").mkdir(parents=True)
    (root / "best" / "notes.txt").write_text("my notes")
    (root / "checkpoints" / "x").mkdir(parents=True)
    (root / "metrics.json").write_text('{"mine": 1}')
    return root


def test_a_user_folder_as_hydra_run_dir_is_refused_before_anything_is_written(
    first_run, tmp_path: Path
) -> None:
    _, cache = first_run
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    done = run_cli([f"hydra.run.dir={folder}", "logger=none", *FAST], cache, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"hydra.run.dir={folder} holds files that breakhis-ft did not write" in done.stderr
    assert snapshot(folder) == before  # no .hydra/, no log, nothing deleted or rewritten


def test_which_folders_a_new_run_may_take(tmp_path: Path) -> None:
    check_new_run_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_new_run_folder(tmp_path / "empty")
    stamp_run_folder(tmp_path / "stamped")  # a run that never started (a config error)
    (tmp_path / "stamped" / ".hydra").mkdir()
    check_new_run_folder(tmp_path / "stamped")
    (tmp_path / "stamped" / "run_info.json").write_text("{}")
    with pytest.raises(RunFolderError, match="already holds a run: continue it with resume="):
        check_new_run_folder(tmp_path / "stamped")
    with pytest.raises(RunFolderError, match="did not write"):
        check_new_run_folder(user_folder(tmp_path / "mine"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        check_new_run_folder(tmp_path / "file")
    # run_info.json alone does not make a folder ours: the stamp does
    (tmp_path / "mine" / "run_info.json").write_text('{"status": "interrupted"}')
    with pytest.raises(RunFolderError, match=f"no {STAMP_FILE}"):
        check_resumable(tmp_path / "mine")
    (tmp_path / "fake" / STAMP_FILE).parent.mkdir()
    (tmp_path / "fake" / STAMP_FILE).write_text('{"created_by": "someone else"}')
    with pytest.raises(RunFolderError):
        check_resumable(tmp_path / "fake")
    check_resumable(tmp_path / "stamped")


# ---- 14. another project's folder: refused with our words, not Hydra's `+resume=` ---------------


def test_another_projects_run_folder_is_refused_without_suggesting_plus_resume(
    tmp_path: Path,
) -> None:
    other = tmp_path / "other_project_run"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("lr: 0.1\nmodel: {name: resnet}\n")
    (other / "run_info.json").write_text("{}")
    before = snapshot(other)
    for key in ("resume", "rerun"):
        done = run_cli([f"{key}={other}"], tmp_path / "cache", timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "+resume" not in done.stderr and "breakhis-ft" in done.stderr
    assert snapshot(other) == before
    assert [p.name for p in tmp_path.iterdir()] == ["other_project_run"]  # no rerun folder


# ---- 4. a saved config is data -----------------------------------------------------------------


def shipped_targets() -> set[str]:
    """Every `_target_` the shipped conf/ names outside Hydra's own settings."""
    found = set()
    for path in (REPO / "conf").rglob("*.yaml"):
        text = yaml.safe_load(path.read_text()) or {}
        stack = [{k: v for k, v in text.items() if k != "hydra"}]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                found |= {node["_target_"]} if "_target_" in node else set()
                stack += list(node.values())
            elif isinstance(node, list):
                stack += node
    return found


def test_the_allowed_targets_are_the_shipped_configs_targets() -> None:
    assert shipped_targets() == ALLOWED_TARGETS


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (["trainer", "optimizer", "_target_"], "trainer.optimizer._target_=shutil.copyfile"),
        (["model", "builder", "_target_"], "model.builder._target_=shutil.copyfile"),
        (["extra", "list", 1, "_target_"], "extra.list[1]._target_=shutil.copyfile"),
    ],
)
def test_a_foreign_target_is_refused_by_its_key_path(edit: list, named: str) -> None:
    config = {
        "resume": None,
        "model": {"builder": {"_target_": sorted(ALLOWED_TARGETS)[0]}},
        "trainer": {"optimizer": {"_target_": "breakhis_ft.engine.optim.adamw"}},
        "extra": {"list": [{}, {}]},
    }
    check_saved_config(config, "config.yaml")  # the project's own targets pass
    node = config
    for key in edit[:-1]:
        node = node[key]
    node[edit[-1]] = "shutil.copyfile"
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        check_saved_config(config, "config.yaml")


@pytest.mark.parametrize(
    "config",
    [
        {"resume": None, "hydra": {"callbacks": {"x": {"_target_": "os.system"}}}},
        {"resume": None, "defaults": ["evil"]},
        {"resume": None, "trainer": {"optimizer": "${oc.create:{_tar${t}get_: os.system}}"}},
        {"resume": None, "trainer": {"optimizer": '${oc.decode:"{a: 1}"}'}},
        {"model": {}},  # not a breakhis-ft config
    ],
)
def test_hydra_settings_node_building_and_foreign_configs_are_refused(config: dict) -> None:
    with pytest.raises(ConfigError):
        check_saved_config(config, "config.yaml")


@pytest.mark.parametrize(
    ("target", "args"),
    [
        ("shutil.copyfile", {"src": "__SRC__", "dst": "__OUT__"}),
        ("builtins.open", {"file": "__OUT__", "mode": "w"}),
    ],
)
def test_rerun_and_resume_of_a_planted_config_execute_nothing(
    first_run, tmp_path: Path, target: str, args: dict
) -> None:
    """A run folder whose saved config names shutil.copyfile / builtins.open (Hydra's own guard
    lets both through): rerun= and resume= refuse it, naming the key, and nothing runs."""
    run_dir, cache = first_run
    planted = tmp_path / "planted"
    (planted / ".hydra").mkdir(parents=True)
    stamp_run_folder(planted)
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    out = tmp_path / "written_by_the_config"
    src = run_dir / "metrics.json"
    text = {
        k: str(v).replace("__SRC__", str(src)).replace("__OUT__", str(out)) for k, v in args.items()
    }
    config["trainer"]["optimizer"] = {"_target_": target, **text}
    (planted / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    for key in ("rerun", "resume"):
        done = run_cli([f"{key}={planted}", "train=false", "test=false"], cache, timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"trainer.optimizer._target_={target} is not one of the project's" in done.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["planted"]


# ---- 5. experiment_name --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../..", "..", "/tmp/elsewhere", "a/b", "a\\b", ""])
def test_an_experiment_name_that_leaves_the_output_folder_is_refused(
    name: str, tmp_path: Path
) -> None:
    register_configs()
    cfg = OmegaConf.create(
        {"experiment_name": name, "dir": "out/${folder_name:${experiment_name}}"}
    )
    with pytest.raises(InterpolationResolutionError, match="must be one folder name"):
        cfg.dir  # noqa: B018 - resolving is the check (Hydra resolves the run folder so)


@pytest.mark.parametrize(
    "args", [["experiment_name=../../.."], ["-m", "experiment_name=ok,../../.."]]
)
def test_the_entrypoint_refuses_it_before_writing(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "outputs"
    args += ["logger=none", *FAST]  # were it accepted, a short run
    done = run_cli([*args, f"paths.output_dir={out}"], tmp_path / "cache", timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "experiment_name='../../..': it names the run's folder" in done.stderr
    assert list(tmp_path.rglob("*")) == []  # nothing written anywhere


# ---- 13. any path a file system takes ------------------------------------------------------------


def test_resume_and_rerun_of_a_folder_with_non_ascii_characters_and_spaces(
    first_run, tmp_path: Path
) -> None:
    run_dir, cache = first_run
    folder = tmp_path / "données ü" / "l'essai" / "run"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("wandb"))
    done = run_cli(
        [f"resume={folder}", "train=false", "test=false", "logger.mode=disabled"],
        cache,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (entry,) = run_info(folder)["history"]
    assert entry["command"][1] == f"resume={folder}"
    done = run_cli(
        [f"rerun={folder}", "train=false", "test=false", "logger.mode=disabled"], cache, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (rerun,) = folder.parent.glob("run-rerun-*")
    assert (rerun / "splits.csv").is_file() and (rerun / STAMP_FILE).is_file()
    assert run_info(rerun)["status"] == "completed"
