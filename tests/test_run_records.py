"""What a run records and what reads it back: runs with `+key=value` overrides load in predict and
export, secret-looking keys by a documented rule, offline W&B artifacts, the step of an
interruption, the printed commands, `make demo`'s threads and the package list."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers.cli_runs import ADDED_SECRETS, REPO, SECRET_OVERRIDE, run_info
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from breakhis_ft.analysis.runs import load_run
from breakhis_ft.deploy.export import export_adapter, export_merged, upload_adapter_artifact
from breakhis_ft.deploy.loading import load_run_config
from breakhis_ft.deploy.predict import load_predictor, predict_to_csv
from breakhis_ft.engine.stop import RunInterrupted
from breakhis_ft.run import experiment
from breakhis_ft.run.secrets import is_secret_key, mask_secrets
from breakhis_ft.run.summary import summary_block

# ---- 10. runs with added keys load again ------------------------------------------------------


def test_a_run_trained_with_added_keys_predicts_and_exports(
    first_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run had `+hf_token=...` (and three more added keys, all masked in its saved
    config): predict and both exports rebuild its config on the schema and work."""
    run_dir, cache = first_run
    monkeypatch.setenv("BREAKHIS_FT_CACHE", str(cache))
    cfg = load_run_config(run_dir)
    assert cfg.hf_token == "***" and cfg.credentials == "***"
    with pytest.raises(ConfigKeyError):  # the schema still refuses a key it does not know
        load_run_config(run_dir, ["model.no_such_key=1"])
    images = sorted((cache / "synthetic").rglob("*.png"))[:3]
    done, failed = predict_to_csv(
        load_predictor(run_dir=run_dir), images, tmp_path / "run.csv", cpu=True, progress=False
    )
    assert (done, failed) == (3, 0)
    merged = export_merged(run_dir, tmp_path / "merged")
    export_adapter(run_dir, tmp_path / "adapter")
    for folder in (merged, tmp_path / "adapter"):
        predictor = load_predictor(model_dir=folder)
        out = tmp_path / f"{folder.name}.csv"
        assert predict_to_csv(predictor, images, out, cpu=True, progress=False) == (3, 0)
        assert json.loads((folder / "export_info.json").read_text())["config"]["hf_token"] == "***"


# ---- 11. the secret rule -----------------------------------------------------------------------

SECRET_KEYS = [
    "hf_token",
    "+hf_token",
    "HF_TOKEN",
    "my_token_value",
    "+my_token_value",
    "auth_tokens",
    "+auth_tokens",
    "credentials",
    "+credentials",
    "gcp_credential_file",
    "wandb_api_key",
    "WANDB_API_KEY",
    "apiKey",
    "api_keys",
    "client_secret",
    "my_secret_id",
    "Password",
    "db_passwd",
    "ssh_key",
    "auth",
    "hydra.job.env_set.HF_TOKEN",
]
VISIBLE_KEYS = [
    "max_new_tokens",  # a real model key: the generation's limit
    "model.max_new_tokens",
    "tokenizer",
    "token_budget",  # a count of tokens, not one
    "pad_token_id",
    "token_type_ids",
    "n_tokens",
    "exclude_keys",
    "keyboard",
    "monitor",
    "experiment_name",
    "name_or_path",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_looking_keys(key: str) -> None:
    assert is_secret_key(key)
    assert mask_secrets([f"{key}=v"]) == [f"{key}=***"]


@pytest.mark.parametrize("key", VISIBLE_KEYS)
def test_keys_that_stay_readable(key: str) -> None:
    assert not is_secret_key(key)
    assert mask_secrets({key: 8}) == {key: 8}


def test_no_added_secret_is_written_anywhere_in_the_run_folder(first_run) -> None:
    """`+my_token_value`, `+auth_tokens`, `+credentials` on the first run's command line: their
    values are in no file of the run (run_info.json, .hydra/, the log, W&B's files)."""
    run_dir, _ = first_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "breakhis-ft.log" in names and "run_info.json" in names
    assert any(p.suffix == ".wandb" for p in files)
    values = [v.encode() for v in ADDED_SECRETS.values()]
    leaks = [str(p.relative_to(run_dir)) for p in files if any(v in p.read_bytes() for v in values)]
    assert leaks == []
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert {key.lstrip("+"): saved[key.lstrip("+")] for key in ADDED_SECRETS} == {
        key.lstrip("+"): "***" for key in ADDED_SECRETS
    }
    assert saved["model"]["max_new_tokens"] == 40  # a model key, not masked
    assert all(f"{key}=***" in run_info(run_dir)["command"] for key in ADDED_SECRETS)


# ---- 12. export --wandb-artifact offline -------------------------------------------------------


@pytest.mark.parametrize("trained_with", ["disabled", "online"])
def test_wandb_mode_offline_keeps_the_artifact_in_the_offline_run(
    trained_with: str, first_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, cache = first_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    saved = copy / ".hydra" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    config["logger"]["mode"] = trained_with
    for key in [*ADDED_SECRETS, SECRET_OVERRIDE[0]]:  # keys of its own test (added keys load)
        del config[key.lstrip("+")]
    saved.write_text(yaml.safe_dump(config))
    for key, value in {
        "BREAKHIS_FT_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(key, value)
    import wandb

    try:
        name = upload_adapter_artifact(copy, name="offline-adapter")
    finally:
        wandb.teardown()
    assert name == "offline-adapter"
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    content = log.read_bytes()
    for expected in (b"offline-adapter", b"adapter_model.safetensors", b"export_info.json"):
        assert expected in content


# ---- 14. smaller records -----------------------------------------------------------------------


def test_an_interruption_outside_training_records_the_latest_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM during the final evaluation (RunInterrupted without a step): run_info.json gets the
    step of the checkpoint resume= continues from, and the printed command is shell-quoted."""
    run_dir = tmp_path / "my runs" / "run"
    for step in (1, 2):
        (run_dir / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").write_text("{}")
    hydra = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(run_dir)))
    monkeypatch.setattr(experiment.HydraConfig, "get", staticmethod(lambda: hydra))

    def evaluation_interrupted(*_args: object) -> None:
        raise RunInterrupted(None, "SIGTERM")

    monkeypatch.setattr(experiment, "_run", evaluation_interrupted)
    with pytest.raises(RunInterrupted):
        experiment.run_experiment(OmegaConf.create({"resume": None}))
    info = run_info(run_dir)
    assert (info["status"], info["step"], info["signal"]) == ("interrupted", 2, "SIGTERM")
    assert f"breakhis-ft 'resume={run_dir}'" in caplog.text


def test_last_step_counts_checkpoints_a_run_did_not_log(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "model/parameters": 10}\n')
    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000002" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-step_000003").mkdir()  # a save that never completed
    assert load_run(tmp_path).last_step == 2


def test_the_printed_commands_paste_into_a_shell() -> None:
    block = summary_block(Path("/data/my runs/run 1"), {})
    assert "breakhis-ft-report '/data/my runs/run 1'" in block
    assert "breakhis-ft-predict '/data/my runs/run 1' IMAGES" in block


def test_make_demo_sets_the_threads() -> None:
    def dry_run(*args: str) -> str:
        done = subprocess.run(
            ["make", "-n", "demo", *args], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "OMP_NUM_THREADS=3 .venv/bin/breakhis-ft experiment=demo" in dry_run("THREADS=3")
    assert "OMP_NUM_THREADS=" in dry_run()


def test_every_folder_that_ships_files_is_a_declared_package() -> None:
    """conf's group folders and resources/ are packages, so setuptools neither warns about them
    (17 BuildBackendWarnings before) nor, in later versions, drops their files."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    conf = {
        "breakhis_ft.conf" + "".join(f".{part}" for part in p.relative_to(REPO / "conf").parts)
        for p in (REPO / "conf").rglob("*")
        if p.is_dir() and any(p.glob("*.yaml"))
    }
    code = {  # the package and its Hydra plugins (in Hydra's namespace package hydra_plugins)
        ".".join(p.relative_to(REPO).parts)
        for top in ("breakhis_ft", "hydra_plugins")
        for p in (REPO / top).rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(f.is_file() for f in p.iterdir())
    }
    assert conf | code | {"breakhis_ft", "breakhis_ft.conf"} == declared
