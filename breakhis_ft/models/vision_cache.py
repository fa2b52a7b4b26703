"""Frozen MedGemma vision features (projected image soft tokens) computed once and kept on disk.

With the SigLIP tower and the projector frozen and no augmentation changing pixels, each image's
soft tokens are the same in every epoch and every run of a sweep. `configure_feature_cache` gives a
classifier its store where the config allows caching them (the rules, and the compose-time error of
`model.cache_vision_features=true` where they fail, are in `validate.py`); `VisionFeatureStore`
keeps them.

Layout: `<paths.vision_features>/<key>/` where `key` hashes the checkpoint identity (name,
hub commit, config hash, local weight files' size and mtime), the image processor's settings, the
dataset preprocessing (`data.image_size`, resampling), the dtype and a format version;
`identity.json` there says what the key stands for. Inside, append-only shards
`shard-*.safetensors`, each a `features` (N, tokens, hidden) tensor in the model's dtype whose
header metadata lists the N image keys `<path>|<file size>|<mtime ns>`: an edited image gets a
new key and is recomputed. Shards are written under a temporary name and renamed (atomic), so a
concurrent run never reads half a file, and checked against their sha256 when indexed (a damaged
one is named, removed and its features computed again: models/shards.py). Lookups read rows
from the memory-mapped shards, not the whole store.
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

from breakhis_ft.data.dataset import image_key
from breakhis_ft.errors import FeatureCacheError
from breakhis_ft.models.shards import SHARD_GLOB, shard_keys, write_shard
from breakhis_ft.validate import CACHE_OPTIONS, feature_cache_obstacles, feature_cache_setting

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when what a shard holds or how features are computed changes


def feature_identity(
    checkpoint: dict[str, Any], image_processor: Any, image_size: int | None, dtype: torch.dtype
) -> dict[str, Any]:
    """What determines an image's features apart from the image file itself."""
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else {}
    return {
        "version": FORMAT_VERSION,
        "checkpoint": checkpoint,
        "image_processor": {k: v for k, v in settings.items() if not k.startswith("_")},
        "data_image_size": image_size,
        "dataset_resample": "BICUBIC",  # breakhis_ft.data.dataset.RESAMPLE (resize_longest)
        # data.dataset.cached_longest_side: the shorter side kept at the processor's square side
        "dataset_resize": "longest<=data_image_size,shorter>=processor_side",
        "dtype": str(dtype),
        "features": "get_image_features(pixel_values).pooler_output",
    }


class VisionFeatureStore:
    """Image soft tokens by image key, in safetensors shards under `<cache_dir>/<key>/`."""

    def __init__(self, cache_dir: str | Path, identity: dict[str, Any]) -> None:
        blob = json.dumps(identity, sort_keys=True, default=str)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.identity = identity
        self.directory = Path(cache_dir).expanduser() / self.key
        self.index: dict[str, tuple[str, int]] = {}  # image key -> (shard name, row)
        self.paths: dict[str, str] = {}  # image path -> its current key (set by `fill`)
        self._handles: dict[str, Any] = {}
        self.refresh()

    def __getstate__(self) -> dict[str, Any]:
        # open shard handles do not pickle (DataLoader workers): they reopen lazily
        return {**self.__dict__, "_handles": {}}

    def refresh(self) -> None:
        """Index every shard on disk (those written by other runs too)."""
        if not self.directory.is_dir():
            return
        for shard in sorted(self.directory.glob(SHARD_GLOB)):
            if shard.name in self._handles:
                continue
            keys = shard_keys(shard)  # checked against its sha256; None: gone or damaged
            if keys is None:
                continue
            for row, key in enumerate(keys):
                self.index.setdefault(key, (shard.name, row))
            self._handles[shard.name] = None

    def _write_shard(self, keys: list[str], values: list[torch.Tensor]) -> None:
        """One shard, atomically, then indexed."""
        name = write_shard(self.directory, self.identity, "features", keys, torch.stack(values))
        for row, key in enumerate(keys):
            self.index[key] = (name, row)
        self._handles[name] = None

    def missing(self, paths: Sequence[str], data_root: str | Path) -> list[int]:
        """Positions in `paths` whose current file has no stored features (records the keys)."""
        out = []
        for i, path in enumerate(paths):
            key = self.paths[path] = image_key(path, data_root)
            if key not in self.index:
                out.append(i)
        return out

    def fill(
        self,
        paths: Sequence[str],
        data_root: str | Path,
        load: Callable[[int], Image.Image],
        encode: Callable[[list[Image.Image]], torch.Tensor],
        batch_size: int = 8,
        shard_size: int = 256,
    ) -> int:
        """Compute and store the features of the `paths` not stored yet; returns how many.

        `load(i)` gives the preprocessed image of `paths[i]`; `encode` maps images to features
        (N, tokens, hidden). A shard is written every `shard_size` images, so an interrupted run
        keeps its work.
        """
        todo = self.missing(paths, data_root)
        if todo:
            log.info(
                "vision feature cache %s: computing %d of %d images",
                self.key,
                len(todo),
                len(paths),
            )
        keys: list[str] = []
        values: list[torch.Tensor] = []
        for start in tqdm(range(0, len(todo), batch_size), desc="vision features", disable=None):
            chunk = todo[start : start + batch_size]
            features = encode([load(i) for i in chunk]).detach().cpu()
            for i, value in zip(chunk, features, strict=True):
                keys.append(self.paths[paths[i]])
                values.append(value.clone())
            if len(keys) >= shard_size:
                self._write_shard(keys, values)
                keys, values = [], []
        if keys:
            self._write_shard(keys, values)
        return len(todo)

    def lookup(self, paths: Sequence[str]) -> torch.Tensor:
        """Features (B, tokens, hidden) of `paths`, read from the shards' memory maps."""
        rows = []
        for path in paths:
            key = self.paths.get(path)
            if key is None or key not in self.index:
                raise KeyError(
                    f"no cached vision features for image {path!r}: with "
                    "model.cache_vision_features the features are prepared before training; call "
                    "classifier.prepare_cached_inputs(datasets, data_root) first (or set "
                    "model.cache_vision_features=false)"
                )
            shard, row = self.index[key]
            handle = self._handles.get(shard)
            if handle is None:
                handle = self._handles[shard] = safe_open(
                    str(self.directory / shard), framework="pt"
                )
            rows.append(handle.get_slice("features")[row : row + 1])
        return torch.cat(rows)


def configure_feature_cache(classifier: Any, cfg: Any, stain_identity: str | None = None) -> bool:
    """Give a MedGemma classifier its feature store where `model.cache_vision_features` and the
    config allow it (`<paths.vision_features>/<key>`); log why not under `auto`.

    `stain_identity`: the run's stain normaliser, whose images get a subfolder of their own
    (features are keyed by image file, and the same file gives other pixels under another
    normaliser)."""
    setting = feature_cache_setting(cfg.model.cache_vision_features)
    if setting is False:
        return False
    obstacles = feature_cache_obstacles(cfg.peft, cfg.data.augment, classifier.vision_trainable)
    if obstacles:
        why = "; ".join(obstacles)
        if setting is True:
            raise FeatureCacheError(
                f"model.cache_vision_features=true needs a frozen vision tower and no pixel "
                f"augmentation, but {why}. {CACHE_OPTIONS}"
            )
        log.info("vision features not cached (model.cache_vision_features=auto): %s", why)
        return False
    folder = str(cfg.paths.vision_features)
    if stain_identity is not None:
        folder = f"{folder}/stain-{stain_identity}"
    store = classifier.use_feature_cache(folder, str(cfg.model.name_or_path), cfg.data.image_size)
    log.info("vision features cached under %s", store.directory)
    return True


class PromptTokens:
    """input_ids / attention_mask / token_type_ids as the processor gives them, without images.

    Batches of cached features carry no pixels; every prompt is one of a few fixed texts, so each
    is tokenized once (with a blank image, for the processor to expand the image placeholder) and
    batches are right padded from them.
    """

    def __init__(self, processor: Any, add_special_tokens: bool = False) -> None:
        self.processor = processor
        self.add_special_tokens = add_special_tokens  # as MedGemmaClassifier.collate's
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The token tensors of a batch of prompt texts, right padded."""
        rows = []
        for text in texts:
            if text not in self.rows:
                out = self.processor(
                    text=[text],
                    images=[[Image.new("RGB", (32, 32))]],
                    return_tensors="pt",
                    add_special_tokens=self.add_special_tokens,
                )
                self.rows[text] = (out["input_ids"][0], out["token_type_ids"][0])
            rows.append(self.rows[text])
        width = max(len(ids) for ids, _ in rows)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (row_ids, row_types) in enumerate(rows):
            ids[row, : len(row_ids)] = row_ids
            mask[row, : len(row_ids)] = 1
            types[row, : len(row_ids)] = row_types
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
