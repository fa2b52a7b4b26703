"""A run folder's saved config is data, never code.

`rerun=` and `resume=` compose a run's `.hydra/config.yaml`, and predict, export and explain build
a model from it (or from an export's `export_info.json`); the folder may come from someone else.
Before anything is composed or instantiated, every `_target_` in it must be one that the project's
own configs name (ALLOWED_TARGETS), it may hold no Hydra settings (`hydra`, whose callbacks and
logging handlers Hydra would build) and no `defaults` list (other config files to compose), and no
value may build a config node when resolved (`${oc.create:...}`, `${oc.decode:...}`: a node with a
`_target_` could be assembled from text).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from breakhis_ft.errors import ConfigError

# Every `_target_` of the shipped conf/ (a test keeps the two in agreement); nothing else is built
# from a saved config
ALLOWED_TARGETS = frozenset(
    {
        "breakhis_ft.models.gemma_loading.build_medgemma_classifier",  # model=medgemma_4b_it, tiny
        "breakhis_ft.models.siglip.build_siglip_classifier",  # model=medsiglip_448, tiny_siglip
        "breakhis_ft.engine.optim.adamw",  # trainer/optimizer=adamw
        "bitsandbytes.optim.AdamW8bit",  # trainer/optimizer=adamw_8bit
        "bitsandbytes.optim.PagedAdamW8bit",  # trainer/optimizer=paged_adamw_8bit
    }
)
# top-level keys Hydra would act on; a config.yaml Hydra saved never has them
_NOT_IN_A_SAVED_CONFIG = ("hydra", "defaults")
# OmegaConf resolvers that turn text into config nodes
_NODE_BUILDING = re.compile(r"\$\{\s*oc\.(create|decode)\s*:")


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, value) of every leaf below `value`, in lists too; a `_target_` is a leaf."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            yield from [(here, item)] if key == "_target_" else _leaves(item, here)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def check_saved_config(config: Any, source: str | Path) -> None:
    """Refuse a saved config (a plain mapping) that is not breakhis-ft's, sets Hydra settings or
    names a `_target_` outside ALLOWED_TARGETS; `source` names the file in the message."""
    if not isinstance(config, Mapping) or "resume" not in config:
        raise ConfigError(
            f"{source}: not the saved config of a breakhis-ft run (it has no `resume` key); give "
            "a run folder that breakhis-ft wrote"
        )
    for key in _NOT_IN_A_SAVED_CONFIG:
        if key in config:
            raise ConfigError(
                f"{source}: `{key}` at the top level: a config Hydra saved for a run never has "
                "one, and it would make Hydra compose or build more than the run's own settings; "
                "nothing was run"
            )
    for path, value in _leaves(config):
        target = path.rpartition(".")[2] == "_target_"
        if target and not (isinstance(value, str) and value in ALLOWED_TARGETS):
            raise ConfigError(
                f"{source}: {path}={value} is not one of the project's own targets; a saved "
                "config is data, and only these are built from it: "
                f"{', '.join(sorted(ALLOWED_TARGETS))}. Nothing was run"
            )
        if isinstance(value, str) and _NODE_BUILDING.search(value):
            raise ConfigError(
                f"{source}: {path}={value}: a saved config may not build config nodes from text "
                "(oc.create, oc.decode); nothing was run"
            )


def load_saved_config(path: str | Path) -> dict[str, Any]:
    """Read a run's saved config.yaml as plain data and check it (`check_saved_config`)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); is the run folder damaged?") from err
    check_saved_config(config, path)
    return config
