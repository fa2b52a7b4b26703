"""The single entrypoint, `breakhis-ft` (also `python -m breakhis_ft`).

Composes the Hydra config, validates it, then hands over to `experiment.run_experiment`. Heavy
imports (torch, transformers) happen inside the run, so `--help` and `--cfg job` answer fast.

Past runs: `breakhis-ft rerun=<run folder>` composes that run's saved config into a new folder;
`breakhis-ft resume=<run folder>` continues it in its own folder from its last checkpoint, leaving
its `.hydra/` record as the first command wrote it (each resume is listed in run_info.json).

Ctrl-C and SIGTERM end a run as `interrupted` (checkpoint saved) with exit status 128 + the
signal's number: 130 and 143, as a shell reports a process the signal ended.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from importlib.resources import files
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from breakhis_ft.config import register_configs
from breakhis_ft.errors import ConfigError
from breakhis_ft.run.run_folder import group_choices, mask_saved_config, set_command_line
from breakhis_ft.run.secrets import mask_secrets
from breakhis_ft.run.summary import configure_console, log_config_tree
from breakhis_ft.validate import validate_config

# conf/ installs as the package breakhis_ft.conf (pyproject.toml), so wheels carry the configs
CONFIG_PACKAGE = "breakhis_ft.conf"
RUN_DIR_ENV = "BREAKHIS_FT_RUN_DIR"  # one run folder for all ranks of a multi-process run


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="train")
def _run(cfg: DictConfig) -> float | None:
    try:
        validate_config(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    _mask_hydra_record()
    configure_console()  # after Hydra configured this job's logging
    log_config_tree(cfg, group_choices(OmegaConf.to_container(HydraConfig.get().runtime)))
    from breakhis_ft.run.experiment import run_experiment  # heavy: torch, transformers

    return run_experiment(cfg)


def _mask_hydra_record() -> None:
    """Mask secret-looking values in the files Hydra just wrote, before anything reads them
    (Hydra writes .hydra/ and the sweep's multirun.yaml before the task function runs), and in
    sys.argv, which Hydra has parsed and which W&B records as the run's arguments."""
    sys.argv = mask_secrets(sys.argv)
    hydra_cfg = HydraConfig.get()
    files = []
    if hydra_cfg.output_subdir is not None:
        saved = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
        files += [saved / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        files.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    mask_saved_config(*files)


def _config_groups() -> set[str]:
    """The config groups (folders of conf/), as installed."""
    return {p.name for p in files(CONFIG_PACKAGE).iterdir() if p.is_dir() and p.name[0] != "_"}


def _saved_job_name(hydra_dir: Path) -> str:
    """The job name (and so the log file) a run was started with; train.yaml's by default."""
    try:
        saved = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())
        return str(saved["hydra"]["job"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "breakhis-ft"


def _past_run_argv(argv: list[str]) -> list[str]:
    """Rewrite `rerun=DIR` / `resume=DIR` into Hydra flags that compose that run's saved config."""
    past = [a for a in argv if a.startswith(("rerun=", "resume="))]
    if not past:
        return argv
    key, _, value = past[-1].partition("=")
    run_dir = Path(value).expanduser().resolve()
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise SystemExit(
            f"{key}={value}: no saved config at {saved}; give a run folder written by "
            "breakhis-ft (it holds .hydra/config.yaml)"
        )
    groups = _config_groups()
    choices = [a for a in argv if a.partition("=")[0].lstrip("+~") in groups]
    if choices:
        raise SystemExit(
            f"{key}=...: the saved config has no groups to choose from; override its keys "
            f"instead of {', '.join(choices)} (e.g. logger.mode=disabled)"
        )
    # flags first: argparse takes the overrides as one positional run that flags may not split
    rest = ["--config-path", str(saved.parent), "--config-name", "config"]
    rest += [a for a in argv if not a.startswith(("rerun=", "resume="))]
    if key == "resume":  # nothing written to .hydra/: the run's record stays as it was
        return rest + [
            f"hydra.run.dir={run_dir}",
            "hydra.output_subdir=null",
            f"hydra.job.name={_saved_job_name(saved.parent)}",  # its log file goes on
            f"resume={run_dir}",
        ]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return rest + [f"hydra.run.dir={run_dir.parent}/{run_dir.name}-rerun-{stamp}", "resume=null"]


def _fixed_run_dir_argv(argv: list[str]) -> list[str]:
    """Give every rank of a multi-process launch the same run folder (each would resolve ${now})."""
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    if os.environ.get(RUN_DIR_ENV):
        return argv + [f"hydra.run.dir={os.environ[RUN_DIR_ENV]}"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "-m" not in argv and "--multirun" not in argv:
        raise SystemExit(
            f"a {os.environ['WORLD_SIZE']}-process launch needs one run folder for all "
            f"ranks: pass hydra.run.dir=outputs/runs/<name> or set {RUN_DIR_ENV}"
        )
    return argv


def _refuse_used_run_dir(argv: list[str]) -> None:
    """A fixed hydra.run.dir that already holds a run is continued only by resume=, never reused:
    Hydra would overwrite that run's .hydra/ before any of our code runs."""
    fixed = [a.partition("=")[2] for a in argv if a.startswith("hydra.run.dir=")]
    resuming = any(a.startswith("resume=") and a != "resume=null" for a in argv)
    if fixed and not resuming and int(os.environ.get("RANK", "0")) == 0:
        if (Path(fixed[-1]) / "run_info.json").exists():
            raise SystemExit(
                f"hydra.run.dir={fixed[-1]} already holds a run: continue it with "
                f"resume={fixed[-1]}, or choose a new folder"
            )


def main() -> None:
    """Console-script entry: prepare argv, register the schema, run Hydra."""
    register_configs()
    set_command_line(sys.argv)
    argv = _fixed_run_dir_argv(_past_run_argv(sys.argv[1:]))
    _refuse_used_run_dir(argv)
    sys.argv = [sys.argv[0], *argv]
    try:
        _run()
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the run folder says where it stopped
        sys.exit(getattr(err, "exit_code", 130))


if __name__ == "__main__":
    main()
