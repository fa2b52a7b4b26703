"""The single entrypoint, `breakhis-ft` (also `python -m breakhis_ft`).

Composes the Hydra config, validates it, then hands over to `experiment.run_experiment`. Heavy
imports (torch, transformers) happen inside the run, so `--help` and `--cfg job` answer fast.

Past runs: `breakhis-ft rerun=<run folder>` composes that run's saved config into a new folder;
`breakhis-ft resume=<run folder>` continues it in its own folder from its last checkpoint.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from breakhis_ft.config import register_configs
from breakhis_ft.errors import ConfigError
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
    configure_console()  # after Hydra configured this job's logging
    log_config_tree(cfg, HydraConfig.get().runtime.choices)
    from breakhis_ft.run.experiment import run_experiment  # heavy: torch, transformers

    return run_experiment(cfg)


def _config_groups() -> set[str]:
    """The config groups (folders of conf/), as installed."""
    return {p.name for p in files(CONFIG_PACKAGE).iterdir() if p.is_dir() and p.name[0] != "_"}


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
    if key == "resume":
        return rest + [f"hydra.run.dir={run_dir}", f"resume={run_dir}"]
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
    argv = _fixed_run_dir_argv(_past_run_argv(sys.argv[1:]))
    _refuse_used_run_dir(argv)
    sys.argv = [sys.argv[0], *argv]
    _run()


if __name__ == "__main__":
    main()
