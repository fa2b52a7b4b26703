"""The single entrypoint, `breakhis-ft` (also `python -m breakhis_ft`).

Composes the Hydra config, validates it, then hands over to `experiment.run_experiment`. Heavy
imports (torch, transformers) happen inside the run, so `--help` and `--cfg job` answer fast.

Past runs: `breakhis-ft rerun=<run folder>` composes that run's saved config into a new folder;
`breakhis-ft resume=<run folder>` continues it in its own folder from its last checkpoint, leaving
its `.hydra/` record as the first command wrote it (each resume is listed in run_info.json).

Ctrl-C and SIGTERM end a run as `interrupted` (checkpoint saved) with exit status 128 + the
signal's number: 130 and 143, as a shell reports a process the signal ended.

What a run may write (run/ownership.py): a folder given as `hydra.run.dir` (or made by `rerun=`)
is checked, stamped and locked here, before Hydra writes into it; a folder Hydra makes from the
time of day is stamped and locked as the job's first act. A saved config is checked before Hydra
composes it (run/saved_config.py). Refusals exit with status 2 and say what to do instead.

The config checks (validate.py) run on the composed config before Hydra makes the run folder
(the `ConfigChecks` callback, train.yaml's hydra.callbacks); where a folder exists already (a
given hydra.run.dir, a rerun=, a sweep's job) a refused config takes back what was written
(`discard_unstarted_run`). A run that ends on one of the project's known errors prints its
message and exits with its status (errors.EXIT_CODES: 2 config, 3 data, 4 model, 5 device,
6 non-finite loss); its traceback goes to the run's log file (and to the terminal as well with
HYDRA_FULL_ERROR=1). Any other error prints its traceback and exits with status 1.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from importlib.resources import files
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from breakhis_ft.config import folder_name, is_folder_name, register_configs
from breakhis_ft.errors import BadDataError, ConfigError, exit_code
from breakhis_ft.run.array import register_sweep_name_resolver
from breakhis_ft.run.ownership import (
    RunFolderError,
    check_resumable,
    claim_job_folder,
    claim_run_folder,
    discard_unstarted_run,
    holding_run_folder,
    wait_for_launch_holder,
)
from breakhis_ft.run.run_folder import (
    command_line,
    group_choices,
    is_main_process,
    mask_saved_config,
    set_command_line,
)
from breakhis_ft.run.saved_config import load_saved_config
from breakhis_ft.run.secrets import mask_secrets
from breakhis_ft.run.summary import FILE_ONLY, configure_console, log_config_tree
from breakhis_ft.third_party import defer_bitsandbytes, route_library_logs
from breakhis_ft.validate import validate_config

log = logging.getLogger(__name__)

# conf/ installs as the package breakhis_ft.conf (pyproject.toml), so wheels carry the configs
CONFIG_PACKAGE = "breakhis_ft.conf"
RUN_DIR_ENV = "BREAKHIS_FT_RUN_DIR"  # one run folder for all ranks of a multi-process run
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"  # "1": tracebacks on the terminal too (Hydra's own switch)
_made_run_dirs: set[Path] = set()  # given run folders this command made (before Hydra ran)
# Hydra flags after which no job runs in hydra.run.dir (help, config printing, sweeps)
_NO_RUN_DIR_FLAGS = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-c",
    "--cfg",
    "-i",
    "--info",
    "-sc",
    "--shell-completion",
    "-m",
    "--multirun",
}


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="train")
def _run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    with ExitStack() as held:
        if is_main_process():  # the other ranks' rank 0 holds the folder for them
            claim_job_folder(run_dir, _hydra_files(hydra_cfg))
            held.enter_context(holding_run_folder(run_dir, command_line()))
        try:
            check_config(cfg)  # again: a sweep's job, a rerun's saved config, a given folder
        except (BadDataError, ConfigError):
            if is_main_process():
                made = run_dir in _made_run_dirs or _folder_made_by_hydra(hydra_cfg)
                discard_unstarted_run(run_dir, _hydra_files(hydra_cfg), remove_folder=made)
            raise
        _mask_hydra_record()
        configure_console()  # after Hydra configured this job's logging
        route_library_logs()  # third-party records and warnings to the log file, not the terminal
        log_config_tree(cfg, group_choices(OmegaConf.to_container(hydra_cfg.runtime)))
        from breakhis_ft.run.experiment import run_experiment  # heavy: torch, transformers

        try:
            return run_experiment(cfg)
        except Exception as err:
            _log_failure(err)
            raise


def check_config(cfg: DictConfig) -> None:
    """The checks a composed config passes before anything is made or loaded."""
    validate_config(cfg)
    _check_data_root(cfg)


class RefusedConfig(BaseException):  # noqa: N818 - carries the error, is none itself
    """A config the checks refused before Hydra made the run folder: a BaseException, because
    Hydra's callbacks turn an Exception into a warning and run the job anyway; `main` ends on
    the error it carries."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class ConfigChecks(Callback):
    """Hydra callback (train.yaml's hydra.callbacks): `check_config` on the composed config before
    Hydra makes the run folder. A sweep's jobs are checked each in its own job (the sweep's base
    config, its swept keys unset, is no job's config)."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        """Check the config of a single run; a refusal stops Hydra (RefusedConfig)."""
        try:
            check_config(config)
        except (BadDataError, ConfigError) as err:
            raise RefusedConfig(err) from err


def _folder_made_by_hydra(hydra_cfg: DictConfig) -> bool:
    """Whether Hydra made the job's folder for this job: a sweep's job folder, or a run folder
    named from the time of day (no hydra.run.dir given)."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return True
    return not any(str(o).startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)


def _log_failure(err: Exception) -> None:
    """The traceback of a failed run into its log file only (the terminal shows the message); a
    note on the error says where it is."""
    log.error("the run failed: %s", err, exc_info=err, extra=FILE_ONLY)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if files:
        err.add_note(f"(the traceback is in {files[0].baseFilename})")


def _check_data_root(cfg: DictConfig) -> None:
    """data=synthetic with data.root: the folder the replica would be built in must be new, empty
    or a replica; a folder of real data (or anything else) is refused here, before the run."""
    if cfg.data.source == "synthetic" and cfg.data.root:
        from breakhis_ft.data.synthetic import check_replica_folder  # numpy, PIL

        check_replica_folder(Path(cfg.data.root).expanduser(), "data.root")


def _exit_status(err: Exception) -> int | None:
    """The exit status of a known error: errors.EXIT_CODES; a refused folder or Hydra's own
    composition errors (an unknown key, a missing option) 2; None for any other error."""
    if isinstance(err, RunFolderError | CompactHydraException):
        return 2
    return exit_code(err)


def _message(err: Exception) -> str:
    """A known error as the terminal shows it: its message, its cause where Hydra's message
    leaves it out (as Hydra prints them), its notes."""
    lines = [str(err)]
    cause = err.__cause__
    if isinstance(err, CompactHydraException) and cause is not None and str(cause) not in lines[0]:
        lines.append(str(cause))
    return "\n".join([*lines, *getattr(err, "__notes__", [])])


def _end_on(err: Exception, full_error: bool) -> None:
    """End the command on `err`: a known error prints its message and exits with its status,
    after taking back a given run folder in which no run started; any other is raised on."""
    status = _exit_status(err)
    if status is None:
        raise err
    for run_dir in _made_run_dirs:  # a config refused before Hydra wrote into it
        discard_unstarted_run(run_dir, set(), remove_folder=True)
    if full_error:
        traceback.print_exception(err)
    print(_message(err), file=sys.stderr)
    sys.exit(status)


@contextmanager
def _errors_reach_main() -> Iterator[None]:
    """Hydra hands an error on only with HYDRA_FULL_ERROR=1 (otherwise it prints a traceback of
    its own and exits 1): set while Hydra runs, so that main ends on the error (`_end_on`)."""
    saved = os.environ.get(FULL_ERROR_ENV)
    os.environ[FULL_ERROR_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[FULL_ERROR_ENV]
        else:
            os.environ[FULL_ERROR_ENV] = saved


def _hydra_files(hydra_cfg: DictConfig) -> set[str]:
    """What Hydra writes into a job's folder before the job runs: .hydra/ and the job's log."""
    files = {f"{hydra_cfg.job.name}.log"}
    if hydra_cfg.output_subdir is not None:
        files.add(str(hydra_cfg.output_subdir))
    return files


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
    """The job name (and so the log file) a run was started with; train.yaml's by default, and
    for a saved name that is no plain file name (the log goes into the run folder, nowhere else)."""
    try:
        saved = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())
        name = str(saved["hydra"]["job"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "breakhis-ft"
    return name if is_folder_name(name) else "breakhis-ft"


def hydra_quoted(value: str) -> str:
    """`value` quoted for Hydra's override lexer, which reads any character inside quotes (an
    unquoted value may hold only ASCII): backslashes before a quote doubled, quotes and `${`
    escaped, so the value arrives as it is."""
    escaped = re.sub(r"(\\*)(?='|$)", r"\1\1", value).replace("'", "\\'")
    return "'" + escaped.replace("${", "\\${") + "'"


def _override_value(arg: str) -> str | None:
    """The value of a `key=value` argument as Hydra reads it (quotes removed); None when Hydra's
    lexer cannot read it, or it is no single string (a sweep, null, an interpolation)."""
    try:
        value = OverridesParser.create().parse_override(arg).value()
    except HydraException:
        return None
    return value if isinstance(value, str) and "${" not in value else None


def _past_run_argv(argv: list[str]) -> list[str]:
    """Rewrite `rerun=DIR` / `resume=DIR` into Hydra flags that compose that run's saved config,
    once it is checked: a breakhis-ft config naming only the project's targets (resume=: in a
    stamped run folder). Paths go to Hydra quoted (any character a file system takes)."""
    past = [a for a in argv if a.startswith(("rerun=", "resume="))]
    if not past:
        return argv
    key, _, value = past[-1].partition("=")
    run_dir = Path(_override_value(past[-1]) or value).expanduser().resolve()
    if key == "resume":
        check_resumable(run_dir)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"{key}={value}: no saved config at {saved}; give a run folder written by "
            "breakhis-ft (it holds .hydra/config.yaml)"
        )
    config = load_saved_config(saved)  # data: refused before Hydra composes anything from it
    groups = _config_groups()
    choices = [a for a in argv if a.partition("=")[0].lstrip("+~") in groups]
    if choices:
        raise ConfigError(
            f"{key}=...: the saved config has no groups to choose from; override its keys "
            f"instead of {', '.join(choices)} (e.g. logger.mode=disabled)"
        )
    # flags first: argparse takes the overrides as one positional run that flags may not split
    rest = ["--config-path", str(saved.parent), "--config-name", "config"]
    rest += [a for a in argv if not a.startswith(("rerun=", "resume="))]
    if key == "resume":  # nothing written to .hydra/: the run's record stays as it was
        return rest + [
            f"hydra.run.dir={hydra_quoted(str(run_dir))}",
            "hydra.output_subdir=null",
            f"hydra.job.name={hydra_quoted(_saved_job_name(saved.parent))}",  # its log goes on
            f"resume={hydra_quoted(str(run_dir))}",
        ]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    new_dir = run_dir.parent / f"{run_dir.name}-rerun-{stamp}"
    return [
        *rest,
        f"hydra.run.dir={hydra_quoted(str(new_dir))}",
        f"hydra.job.name={hydra_quoted(_saved_job_name(saved.parent))}",  # its log's name
        # the source, named in the new run's config, W&B name, notes and tags (++: a config saved
        # before the key existed lacks it)
        f"++rerun_of={hydra_quoted(str(run_dir))}",
        # a rerun starts afresh (resume= saves no config, so a saved resume is null already)
        *([] if config.get("resume") is None else ["resume=null"]),
    ]


def _fixed_run_dir_argv(argv: list[str]) -> list[str]:
    """Give every rank of a multi-process launch the same run folder (each would resolve ${now})."""
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    if os.environ.get(RUN_DIR_ENV):
        return argv + [f"hydra.run.dir={hydra_quoted(os.environ[RUN_DIR_ENV])}"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "-m" not in argv and "--multirun" not in argv:
        raise ConfigError(
            f"a {os.environ['WORLD_SIZE']}-process launch needs one run folder for all "
            f"ranks: pass hydra.run.dir=outputs/runs/<name> or set {RUN_DIR_ENV}"
        )
    return argv


def _check_experiment_names(argv: list[str]) -> None:
    """Refuse an experiment_name on the command line that would leave paths.output_dir (train.yaml's
    folder_name resolver refuses one a preset sets, as Hydra resolves the run folder)."""
    for arg in argv:
        if arg.lstrip("+~").startswith("experiment_name="):
            try:
                override = OverridesParser.create().parse_override(arg)
            except HydraException:
                continue  # Hydra reports it
            for name in (
                override.sweep_string_iterator()
                if override.is_sweep_override()
                else [override.value()]
            ):
                folder_name(name)


def _claim_given_run_dir(argv: list[str]) -> None:
    """Check, stamp and lock a hydra.run.dir given on the command line (or by resume= / rerun=)
    before Hydra writes into it: new, empty, or (resume=) a stamped run folder no process uses.
    The other ranks of a multi-process launch wait until their rank 0 holds it."""
    if any(a.partition("=")[0] in _NO_RUN_DIR_FLAGS for a in argv if a.startswith("-")):
        return
    given = [a for a in argv if a.startswith("hydra.run.dir=")]
    value = _override_value(given[-1]) if given else None
    if value is None:  # none given, or an interpolation: the job stamps what Hydra made
        return
    run_dir = Path(value).expanduser().resolve()
    if not is_main_process():
        wait_for_launch_holder(run_dir)
        return
    resuming = any(a.startswith("resume=") and a != "resume=null" for a in argv)
    new = not run_dir.exists()
    claim_run_folder(run_dir, resuming, command_line())
    if new:
        _made_run_dirs.add(run_dir)


def _register_plugins() -> None:
    """Make the project's Hydra plugins (hydra_plugins/breakhis_ft_plugins) known to Hydra even
    where its scan of the `hydra_plugins` namespace package cannot list them: an editable install
    maps them through an import hook that pkgutil does not walk (an installed wheel is scanned)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.breakhis_ft_plugins.array_launcher import ArrayLauncher
    from hydra_plugins.breakhis_ft_plugins.shared_study_sweeper import SharedStudySweeper

    plugins = Plugins.instance()
    for plugin in (ArrayLauncher, SharedStudySweeper):
        plugins.register(plugin)


def main() -> None:
    """Console-script entry: prepare argv, register the schema and plugins, claim the run folder,
    run Hydra; end on a known error with its message and exit status."""
    defer_bitsandbytes()  # before anything imports peft (third_party.py says why)
    register_configs()
    register_sweep_name_resolver()
    _register_plugins()
    set_command_line(sys.argv)
    full_error = os.environ.get(FULL_ERROR_ENV) == "1"
    try:
        argv = _fixed_run_dir_argv(_past_run_argv(sys.argv[1:]))
        _check_experiment_names(argv)
        _claim_given_run_dir(argv)
        sys.argv = [sys.argv[0], *argv]
        with _errors_reach_main():
            _run()
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the run folder says where it stopped
        sys.exit(getattr(err, "exit_code", 130))
    except RefusedConfig as refused:
        _end_on(refused.error, full_error)
    except Exception as err:
        _end_on(err, full_error)


if __name__ == "__main__":
    main()
