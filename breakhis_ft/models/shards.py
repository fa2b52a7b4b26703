"""Atomic, checksummed safetensors shards of per-image tensors, shared by the embedding and
feature caches.

A shard `shard-<id>.safetensors` is written under a temporary name and renamed; its sha256 then
goes to `shard-<id>.safetensors.sha256` beside it (written last). Writers take the folder's build
lock, so a temporary left by a writer that died is removed by the next. Readers check each shard
against its checksum: a damaged one is named, removed, and its images computed again.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from breakhis_ft.files import (
    build_lock,
    file_manifest,
    manifest_problem,
    remove_path,
    temp_beside,
    write_manifest,
)

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.safetensors"


def write_shard(
    directory: Path,
    identity: dict[str, Any],
    tensor_name: str,
    keys: list[str],
    values: torch.Tensor,
) -> str:
    """Write one shard (rows of `values`, image keys in its metadata) atomically; return its name.

    The cache's identity goes to identity.json beside the shards, so a folder says what made it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ident = directory / "identity.json"
    if not ident.exists():
        ident.write_text(json.dumps(identity, indent=1, sort_keys=True, default=str))
    name = f"shard-{uuid.uuid4().hex}.safetensors"
    with build_lock(directory / "shard"):  # temporaries `.tmp-shard-*` of dead writers go
        tmp = temp_beside(directory / "shard")
        try:
            metadata = {"keys": json.dumps(keys)}
            save_file({tensor_name: values.contiguous()}, str(tmp), metadata=metadata)
            os.replace(tmp, directory / name)
        finally:
            tmp.unlink(missing_ok=True)
        write_manifest(file_manifest(directory / name), [directory / name])
    return name


def remove_shard(shard: Path) -> None:
    """Delete a shard and its checksum file."""
    shard.unlink(missing_ok=True)
    file_manifest(shard).unlink(missing_ok=True)


def shard_keys(shard: Path) -> list[str] | None:
    """The image keys of a shard after checking it against its checksum; None when it is gone
    (merged away by a concurrent run) or damaged (then named in a warning and removed). A shard
    written before checksums were recorded is read unchecked, if it opens."""
    checksum = file_manifest(shard)
    problem = manifest_problem(checksum) if checksum.is_file() else None
    if problem is None:
        try:
            with safe_open(str(shard), framework="pt") as f:
                return json.loads(f.metadata()["keys"])
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            problem = f"{shard}: unreadable ({err})"
    if not shard.exists():
        return None
    log.warning("feature cache: damaged shard removed, its images are computed again: %s", problem)
    remove_path(shard)
    checksum.unlink(missing_ok=True)
    return None
