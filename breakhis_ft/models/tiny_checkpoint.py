"""Build-once tiny checkpoints: a recipe digest beside the weights; a new recipe rebuilds them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def ensure_checkpoint(path: str | Path, digest: str, build: Callable[[Path], Any]) -> Path:
    """Return `path`, first building it with `build(folder)` when missing or of another recipe.

    `build` must write RECIPE_FILE with `digest`. It builds beside the target, which is then
    swapped in: a reader never sees a half-written checkpoint, and concurrent builders agree.
    """
    path = Path(path).expanduser()
    if stored_digest(path) == digest:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        build(tmp)
        if stored_digest(path) == digest:  # another process finished first
            return path
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
