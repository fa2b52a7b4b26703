"""Frozen-encoder embeddings computed once per image and kept on disk, for linear-probe sweeps.

Layout: `<cache_dir>/<key>/` where `key` hashes the identity of the encoder (checkpoint name,
hub commit, config hash, local weight files' size and mtime), the preprocessing (processor
settings, resize mode) and the dtype; `identity.json` there says what the key stands for. Inside,
append-only shards `shard-*.safetensors`, each an `embeddings` (N, D) tensor whose header metadata
lists the N image keys `<path relative to the data root>|<file size>|<mtime ns>`: an edited or
replaced image gets a new key and is recomputed, a changed preprocessing setting selects another
folder. Shards are written to a temporary name and renamed, so concurrent runs never read half a
file (at worst both compute an image), and checked against their sha256 when loaded (a damaged
one is named, removed and its embeddings computed again: models/shards.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from breakhis_ft.data.breakhis import load_image
from breakhis_ft.data.dataset import image_key
from breakhis_ft.models.shards import SHARD_GLOB, remove_shard, shard_keys, write_shard

log = logging.getLogger(__name__)

MAX_SHARDS = 16  # more than this: merge them into one on the next load


class EmbeddingTable:
    """Embeddings by image path: a (N, D) float32 tensor and a path -> row index."""

    def __init__(self, rows: dict[str, int], values: torch.Tensor) -> None:
        self.rows = rows
        self.values = values

    @classmethod
    def empty(cls, dim: int) -> EmbeddingTable:
        """A table with no rows."""
        return cls({}, torch.zeros(0, dim))

    def __len__(self) -> int:
        return len(self.rows)

    def merged(self, other: EmbeddingTable) -> EmbeddingTable:
        """This table with `other`'s rows added (other wins for a path in both)."""
        if not len(other):
            return self
        if not len(self):
            return other
        keep = [p for p in self.rows if p not in other.rows]
        values = torch.cat([self.values[[self.rows[p] for p in keep]], other.values])
        rows = {p: i for i, p in enumerate(keep + list(other.rows))}
        return EmbeddingTable(rows, values)

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        """Embeddings (B, D) of `paths`; a missing one is an error that names it and the fix."""
        missing = [p for p in paths if p not in self.rows]
        if missing:
            raise KeyError(
                f"no cached embedding for {len(missing)} image(s), e.g. {missing[0]!r}: a linear "
                "probe (model.freeze_encoder=true, peft=none) trains on embeddings prepared first; "
                "call classifier.prepare_embeddings(paths of every split, data_root) before "
                "training"
            )
        return self.values[[self.rows[p] for p in paths]]


class EmbeddingCache:
    """Embeddings keyed by encoder + preprocessing (folder) and image file (entry)."""

    def __init__(self, cache_dir: str | Path | None, identity: dict[str, Any]) -> None:
        blob = json.dumps(identity, sort_keys=True, default=str)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.identity = identity
        self.directory = None if cache_dir is None else Path(cache_dir).expanduser() / self.key
        self._store: dict[str, torch.Tensor] | None = None  # image key -> embedding

    def _shards(self) -> list[Path]:
        return sorted(self.directory.glob(SHARD_GLOB)) if self.directory else []

    def _write_shard(self, entries: dict[str, torch.Tensor]) -> None:
        assert self.directory is not None
        write_shard(
            self.directory,
            self.identity,
            "embeddings",
            list(entries),
            torch.stack(list(entries.values())),
        )

    def load(self) -> dict[str, torch.Tensor]:
        """Every stored embedding by image key (merging the shards when there are many)."""
        if self._store is not None:
            return self._store
        store: dict[str, torch.Tensor] = {}
        shards = self._shards()
        for shard in shards:
            keys = shard_keys(shard)  # checked against its sha256; None: gone or damaged
            try:
                if keys is None:
                    continue
                with safe_open(str(shard), framework="pt") as f:
                    values = f.get_tensor("embeddings")
            except FileNotFoundError:  # merged away by a concurrent run: recomputed if needed
                continue
            store.update(zip(keys, values, strict=True))
        if len(shards) > MAX_SHARDS and store:
            self._write_shard(store)
            for shard in shards:
                remove_shard(shard)
        self._store = store
        return store

    def get_or_compute(
        self,
        paths: Sequence[str],
        data_root: str | Path,
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int = 32,
        shard_size: int = 1024,
    ) -> tuple[EmbeddingTable, int]:
        """The embeddings of `paths` (relative to `data_root`), computing only the missing ones.

        `encode` maps a list of PIL images to (N, D) embeddings. Returns (table, number computed).
        New embeddings are written every `shard_size` images, so an interrupted run keeps its work.
        """
        paths = list(dict.fromkeys(paths))
        keys = {p: image_key(p, data_root) for p in paths}
        store = self.load()
        missing = [p for p in paths if keys[p] not in store]
        if missing:
            log.info(
                "embedding cache %s: computing %d of %d images", self.key, len(missing), len(paths)
            )
        pending: dict[str, torch.Tensor] = {}
        for start in tqdm(range(0, len(missing), batch_size), desc="embeddings", disable=None):
            chunk = missing[start : start + batch_size]
            values = encode([load_image(Path(data_root) / p) for p in chunk]).float().cpu()
            for path, value in zip(chunk, values, strict=True):
                store[keys[path]] = pending[keys[path]] = value.clone()
            if self.directory is not None and len(pending) >= shard_size:
                self._write_shard(pending)
                pending = {}
        if self.directory is not None and pending:
            self._write_shard(pending)
        if not paths:
            return EmbeddingTable({}, torch.zeros(0, 0)), 0
        values = torch.stack([store[keys[p]] for p in paths])
        return EmbeddingTable({p: i for i, p in enumerate(paths)}, values), len(missing)
