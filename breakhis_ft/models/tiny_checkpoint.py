"""Build-once tiny checkpoints: a recipe digest beside the weights; a new recipe rebuilds them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from breakhis_ft.errors import ModelLoadError
from breakhis_ft.files import build_once

RECIPE_FILE = "tiny_recipe.json"


def recipe_digest(recipe: dict[str, Any]) -> str:
    """A short hash of a checkpoint's recipe (sizes, vocabulary, library major version...)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def stored_digest(path: Path) -> str | None:
    """The recipe digest a built checkpoint folder records, or None."""
    try:
        return json.loads((path / RECIPE_FILE).read_text()).get("hash")
    except (OSError, ValueError):
        return None


def _check_ours(path: Path, cache_root: Path) -> None:
    """Refuse to build anywhere but a folder of ours under the project's model cache."""
    root = cache_root.expanduser().resolve()
    if not path.resolve().is_relative_to(root):
        raise ModelLoadError(
            f"model.build_tiny: {path} is outside the project's model cache {root}; a tiny "
            "checkpoint is only built there. To load your own checkpoint, choose its model group: "
            f"model=medgemma_4b_it model.name_or_path={path} (or model=medsiglip_448 ...)"
        )
    if path.exists() and not (path / RECIPE_FILE).is_file():
        raise ModelLoadError(
            f"model.build_tiny: {path} exists and was not built by breakhis-ft (no {RECIPE_FILE}); "
            "it is left untouched. Point model.name_or_path at a new folder under "
            f"{root}, or load it as a checkpoint: model=medgemma_4b_it model.name_or_path={path}"
        )


def ensure_checkpoint(
    path: str | Path, digest: str, build: Callable[[Path], Any], cache_root: str | Path
) -> Path:
    """Return `path`, first building it with `build(folder)` when missing or of another recipe.

    Only a folder under `cache_root` that is missing, or that a build stamped with RECIPE_FILE, is
    ever written. `build` must write RECIPE_FILE with `digest`; it builds beside the target, which
    is then swapped in under a lock: a reader never sees a half-written checkpoint, and concurrent
    first builds wait for one another instead of racing.
    """
    path = Path(path).expanduser()
    if stored_digest(path) == digest:
        return path
    _check_ours(path, Path(cache_root))
    # an existing folder holds an older recipe of ours (checked above): it is replaced
    return build_once(path, build, lambda folder: stored_digest(folder) == digest)
