"""What a run is called on the dashboard: its name, group, tags and notes.

A name is built from what differs: a sweep job's swept values (a grid's or Optuna's), else the
command's overrides; keys shortened to their last part where that is unambiguous (`peft.r=8` ->
`r=8`), numbers to 4 significant digits (`trainer.lr=0.000500000001` -> `lr=0.0005`), and the whole
kept under 64 characters (a longer one ends in a hash of the whole, so two names stay apart). The
group is the experiment, or `<experiment>/<sweep folder>` for a sweep's jobs; tags say which sweep
(`sweep:<folder>`), which Optuna study (`optuna:<study>`) and whether the run reruns another
(`rerun`, named in its notes and its name). Pure functions of the config and Hydra's record; the
entrypoint's experiment module calls `job_identity` with both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from breakhis_ft.run.secrets import mask_secrets

MAX_NAME = 63  # characters of a run name (W&B's runs table shows it whole)
MAX_TAG = 64  # W&B refuses longer tags
SIGNIFICANT = 4  # significant digits of a number in a name
# overrides that say nothing about the experiment: where files go, logging, the launcher, the
# experiment itself (the group says it), the run a rerun reruns (its notes and tag say it), the
# folder a resumed run continues (it keeps its first name)
UNNAMED = ("experiment", "hydra", "paths", "data.root", "logger", "launcher", "rerun_of", "resume")


@dataclass(frozen=True)
class RunIdentity:
    """A run's name, group, tags and notes on the dashboard."""

    name: str
    group: str
    tags: tuple[str, ...] = ()
    notes: str | None = None


def short_value(value: Any) -> str:
    """A parsed override value as a name shows it: floats to 4 significant digits, lists and
    mappings element by element, Hydra's spelling of booleans and null."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT}g}"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{short_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(short_value(v) for v in value) + "]"
    return str(value)


def _parsed(overrides: Iterable[str]) -> list[tuple[str, str]]:
    """(key, value as shown) of each override Hydra's parser reads (secret values masked)."""
    parser = OverridesParser.create()
    pairs = []
    for text in overrides:
        text = mask_secrets(text)
        try:
            override = parser.parse_override(text)
            value = short_value(override.value())
        except HydraException:  # a value only Hydra's full grammar reads: shown as typed
            key, _, value = text.partition("=")
            pairs.append((key.lstrip("+~"), value))
            continue
        pairs.append((override.key_or_group, value))
    return pairs


def _is_named(key: str) -> bool:
    return not any(key == u or key.startswith(f"{u}.") or key.startswith(f"{u}/") for u in UNNAMED)


def capped(name: str, limit: int = MAX_NAME) -> str:
    """`name` when it fits `limit` characters; else its start and a hash of the whole."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:6]
    return f"{name[: limit - len(digest) - 1]}~{digest}"


def short_name(pairs: Sequence[tuple[str, str]]) -> str:
    """`r=8,lr=0.0005`: each key by its last dotted part unless two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key, _ in pairs]
    shown = [
        short if last.count(short) == 1 else key
        for (key, _), short in zip(pairs, last, strict=True)
    ]
    return ",".join(f"{k}={v}" for k, (_, v) in zip(shown, pairs, strict=True))


def swept_keys(argv: Sequence[str], sweeper_params: Mapping[str, Any] | None) -> set[str]:
    """The keys a sweep varies: the sweeper's `params` (a grid's or Optuna's search space) and
    the sweeps of the command line (`peft.r=4,8`, `trainer.lr=interval(1e-5,1e-3)`)."""
    keys = set(sweeper_params or {})
    parser = OverridesParser.create()
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def _source_run(folder: str) -> tuple[str, str | None]:
    """(name, W&B run id) of the run a rerun reruns: its W&B name, else its folder's name."""
    try:
        info = json.loads((Path(folder) / "run_info.json").read_text())
        wandb = info.get("wandb") or {}
    except (OSError, ValueError, AttributeError):
        wandb = {}
    return str(wandb.get("name") or Path(folder).name), wandb.get("id")


def job_identity(cfg: DictConfig, hydra_cfg: DictConfig, argv: Sequence[str]) -> RunIdentity:
    """The identity of the job Hydra runs: `hydra_cfg` is its Hydra config (HydraConfig.get()),
    `argv` the command line that started it (a sweep's, for a sweep's job)."""
    pairs = [(k, v) for k, v in _parsed(hydra_cfg.overrides.task) if _is_named(k)]
    tags: list[str] = []
    group = str(cfg.experiment_name)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = Path(str(hydra_cfg.sweep.dir)).name
        group = f"{group}/{sweep}"
        tags.append(f"sweep:{sweep}")
        sweeper = OmegaConf.to_container(hydra_cfg.sweeper, resolve=False)
        if isinstance(sweeper, dict) and sweeper.get("study_name"):
            tags.append(f"optuna:{sweeper['study_name']}")
        params = sweeper.get("params") if isinstance(sweeper, dict) else None
        swept = swept_keys(argv, params if isinstance(params, dict) else None)
        pairs = [(k, v) for k, v in pairs if k in swept] or pairs
    name = short_name(pairs) or str(cfg.experiment_name)
    notes = None
    rerun_of = cfg.get("rerun_of")
    if rerun_of:
        source, source_id = _source_run(str(rerun_of))
        name = f"rerun of {source}" + (f": {name}" if pairs else "")
        notes = f"rerun of {rerun_of}" + (f" (W&B run {source_id})" if source_id else "")
        tags.append("rerun")
    return RunIdentity(capped(name), group, tuple(capped(t, MAX_TAG) for t in tags), notes)


def recorded_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides a run records as its own (the W&B config's `hydra.overrides`): a rerun's
    are the ones given beside `rerun=` (the source, `rerun_of`, and the fresh start `resume=null`
    are the command's rewriting of `rerun=`)."""
    return [
        o
        for o in overrides
        if o.lstrip("+~").partition("=")[0] != "rerun_of" and o != "resume=null"
    ]
