"""Atomic safetensors shards of per-image tensors, shared by the embedding and feature caches."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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
    tmp = directory / f".tmp-{name}"  # a crash mid-write leaves only a temporary file behind
    save_file({tensor_name: values.contiguous()}, str(tmp), metadata={"keys": json.dumps(keys)})
    os.replace(tmp, directory / name)
    return name
