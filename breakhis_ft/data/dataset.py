"""The image cache (decoded, resized images in `datasets` Arrow files) and the torch Dataset.

Decoding a 700x460 PNG and resizing it costs far more than reading raw pixels from a memory-mapped
Arrow file, and every epoch of every run would repeat it. The cache stores each image resized for
the model (`cached_size`) as raw RGB bytes.

Layout: `<cache_dir>/images/<key>/shard-<id>/` where `key` hashes the preprocessing only (size
limits, resampling, format version, stain normaliser): every split, fold, seed and magnification
of one dataset reads the same folder. Each shard holds `data.arrow` (rows: image key, path, height,
width, pixels), `shard.json` (its image keys, and the images a stain normaliser passed through
unchanged) and `SHA256SUMS`, written last. An image is found by its key `path|size|mtime_ns` (the
file's identity, as the feature caches key it): an edited image gets a new key and is cached
again, and images not cached yet are built into one new shard, under a lock (a concurrent run
waits, then finds them built). A shard is checked against its checksums when a run reads it; a
damaged one is named, removed and its images rebuilt (a cache is ours and can always be rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from PIL import Image
from tqdm.auto import tqdm

from breakhis_ft.config import AugmentConfig
from breakhis_ft.data.augment import Augmenter, is_identity
from breakhis_ft.data.png import load_image
from breakhis_ft.data.records import ImageRecord, Task, as_task
from breakhis_ft.data.stain import StainNormalizer
from breakhis_ft.files import (
    MANIFEST,
    build_lock,
    fsync_dir,
    manifest_problem,
    remove_dead_builds,
    remove_path,
    temp_beside,
    write_folder_manifest,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the stored format or the resizing changes
RESAMPLE = Image.Resampling.BICUBIC
FEATURES = datasets.Features(
    {
        "key": datasets.Value("string"),  # image_key: path|size|mtime_ns
        "path": datasets.Value("string"),
        "height": datasets.Value("int32"),
        "width": datasets.Value("int32"),
        "pixels": datasets.Value("binary"),  # raw RGB bytes, height x width x 3
    }
)
SHARD_INFO = "shard.json"
SHARD_GLOB = "shard-*"
BATCH = 256  # images decoded and written per batch: bounded memory


def image_key(path: str, data_root: str | Path) -> str:
    """`path|size|mtime_ns` of an image file: changes whenever the file does."""
    try:
        stat = (Path(data_root) / path).stat()
    except OSError as err:
        raise FileNotFoundError(f"image {path!r} not found under data root {data_root}") from err
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def cached_longest_side(
    width: int, height: int, image_size: int | None, model_side: int | None = None
) -> int | None:
    """The longest side an image is resized to: at most `image_size`, and no smaller than keeps
    its shorter side at `model_side` (the square the model reads; None: no model limit).

    A model whose processor reads S x S pixels never sees more than S along either side, so an
    image need not be cached larger than that: 700x460 is cached at 170x112 for a 112 px model,
    at 896x589 for MedGemma's 896 (data.image_size=896). Keeping the shorter side at S loses
    nothing whether the processor pads, stretches or crops to its square.
    """
    if image_size is None:
        return None
    if model_side is None:
        return image_size
    longest, shortest = max(width, height), max(1, min(width, height))
    return min(image_size, max(1, round(longest * model_side / shortest)))


def resize_longest(image: Image.Image, size: int | None) -> Image.Image:
    """Resize so that the longest side is `size`, keeping the aspect ratio (None: unchanged)."""
    if size is None or max(image.size) == size:
        return image
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new, RESAMPLE)


def preprocess_image(
    image: Image.Image,
    image_size: int | None,
    stain: StainNormalizer | None = None,
    model_side: int | None = None,
) -> tuple[Image.Image, str | None]:
    """Training's preprocessing: stain-normalise at full size (when given), then resize (see
    `cached_longest_side`). Returns (image, why the normaliser passed it through, or None)."""
    reason = None
    if stain is not None:
        image, reason = stain.normalize(image)
    longest = cached_longest_side(image.width, image.height, image_size, model_side)
    return resize_longest(image, longest), reason


def cache_key(
    image_size: int, stain: StainNormalizer | None = None, model_side: int | None = None
) -> str:
    """Hash of the preprocessing a cache folder holds (never of the images or their order)."""
    spec: dict = {
        "version": CACHE_VERSION,
        "image_size": image_size,
        "model_side": model_side,
        "resample": RESAMPLE.name,
    }
    if stain is not None:
        spec["stain"] = stain.identity()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class ImageCache:
    """The cached images of some records: rows of the shards holding them, by image path."""

    table: datasets.Dataset  # the shards that hold these records, concatenated
    rows: dict[str, int]  # image path -> its row in `table`
    directory: Path  # the cache folder (one per preprocessing)
    built: int = 0  # images decoded by the call that returned it (0: all were cached)
    passed_through: list[list[str]] = field(default_factory=list)  # [path, reason]: stain left

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, path: str) -> Image.Image:
        """The cached (resized, normalised) image of a path."""
        row = self.table[self.rows[path]]
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], 3)
        return Image.fromarray(pixels)

    def megabytes(self) -> float:
        """The pixel bytes of these images, in MB."""
        picked = self.table.select_columns(["height", "width"]).select(list(self.rows.values()))
        return 3 * sum(h * w for h, w in zip(picked["height"], picked["width"], strict=True)) / 1e6


@dataclass
class _Shard:
    folder: Path
    keys: dict[str, int]  # image key -> row
    passed_through: dict[str, str]  # path -> why the stain normaliser left it unchanged


class _ShardIndex:
    """The shards of one cache folder, each checked against its SHA256SUMS once, when first used."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.checked: dict[str, _Shard | None] = {}  # shard name -> shard (None: damaged)

    def find(self, keys: set[str]) -> dict[str, _Shard]:
        """Image key -> the (verified) shard holding it, for the keys that are cached."""
        found: dict[str, _Shard] = {}
        for folder in sorted(self.folder.glob(SHARD_GLOB)) if self.folder.is_dir() else []:
            shard = self._read(folder, keys)
            if shard is not None:
                for key in shard.keys.keys() & keys:
                    found.setdefault(key, shard)
        return found

    def _read(self, folder: Path, keys: set[str]) -> _Shard | None:
        if folder.name in self.checked:
            return self.checked[folder.name]
        try:
            info = json.loads((folder / SHARD_INFO).read_text())
            shard = _Shard(
                folder, {k: i for i, k in enumerate(info["keys"])}, info["passed_through"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            shard = None
        if shard is not None and not shard.keys.keys() & keys:
            return shard  # not needed now: not read, not checked
        problem = manifest_problem(folder / MANIFEST)
        if problem is not None or shard is None:
            log.warning(
                "image cache: damaged shard %s (%s); removed, its images are cached again",
                folder,
                problem or f"{SHARD_INFO} unreadable",
            )
            remove_path(folder)
            shard = None
        self.checked[folder.name] = shard
        return shard


def _decode(
    root: Path,
    record: ImageRecord,
    image_size: int,
    stain: StainNormalizer | None,
    model_side: int | None,
) -> tuple[dict, str | None]:
    image = load_image(root / record.path)
    img, reason = preprocess_image(image, image_size, stain, model_side)
    row = {
        "path": record.path,
        "height": img.height,
        "width": img.width,
        "pixels": np.asarray(img, dtype=np.uint8).tobytes(),
    }
    return row, reason


def _write_shard(
    folder: Path,
    todo: Sequence[tuple[str, ImageRecord]],
    root: Path,
    spec: dict,
    workers: int,
    progress: bool,
) -> None:
    """Decode and resize `todo` ([(key, record)]) into a new shard of `folder`, atomically."""
    tmp = temp_beside(folder)
    tmp.mkdir(parents=True)
    try:
        writer = ArrowWriter(features=FEATURES, path=str(tmp / "data.arrow"))
        size, stain, side = spec["image_size"], spec["stain"], spec["model_side"]
        bar = tqdm(total=len(todo), desc=f"caching images at <= {size}px", disable=not progress)
        passed: dict[str, str] = {}
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(todo), BATCH):
                batch = todo[start : start + BATCH]
                done = list(pool.map(lambda kr: _decode(root, kr[1], size, stain, side), batch))
                rows = [{"key": key, **row} for (key, _), (row, _) in zip(batch, done, strict=True)]
                passed.update({row["path"]: why for row, why in done if why is not None})
                writer.write_batch({k: [row[k] for row in rows] for k in FEATURES})
                bar.update(len(rows))
        bar.close()
        writer.finalize()
        info = {
            "keys": [key for key, _ in todo],
            "passed_through": passed,
            "image_size": size,
            "model_side": side,
            "root": str(root),
            "stain": None if stain is None else stain.to_dict(),
        }
        (tmp / SHARD_INFO).write_text(json.dumps(info))
        write_folder_manifest(tmp)  # last: the shard is whole once its checksums are written
        folder.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, folder / f"shard-{uuid.uuid4().hex[:12]}")
        fsync_dir(folder)
    finally:
        remove_path(tmp)


def build_image_cache(
    records: Sequence[ImageRecord],
    root: str | Path,
    image_size: int,
    cache_dir: str | Path,
    workers: int | None = None,
    progress: bool = True,
    stain: StainNormalizer | None = None,
    model_side: int | None = None,
) -> ImageCache:
    """The cached images of these records (see the module docstring): those not cached yet are
    decoded, resized (`cached_longest_side` with `model_side`) and stored; the rest are reused.

    `stain`: normalise each image before resizing; `passed_through` of the result lists
    [path, reason] of the images it left unchanged.
    """
    if not records:
        raise ValueError("build_image_cache: no records")
    if image_size < 1:
        raise ValueError(f"data.image_size={image_size}: must be a positive number of pixels")
    root = Path(root)
    folder = Path(cache_dir).expanduser() / "images" / cache_key(image_size, stain, model_side)
    keys = {r.path: image_key(r.path, root) for r in records}
    remove_dead_builds(folder)  # temporaries of builds killed mid-way (SIGKILL, power loss)
    index = _ShardIndex(folder)
    found = index.find(set(keys.values()))
    built = 0
    if len(found) < len(set(keys.values())):
        with build_lock(folder):  # one builder at a time; temporaries of dead ones removed
            found = index.find(set(keys.values()))  # another run may have built them meanwhile
            todo = {keys[r.path]: r for r in records if keys[r.path] not in found}
            if todo:
                spec = {"image_size": image_size, "stain": stain, "model_side": model_side}
                workers = workers or min(4, os.cpu_count() or 1)  # PIL works without the GIL
                _write_shard(folder, list(todo.items()), root, spec, workers, progress)
                built = len(todo)
                found = index.find(set(keys.values()))
    return _assemble(folder, keys, found, built)


def _assemble(
    folder: Path, keys: dict[str, str], found: dict[str, _Shard], built: int
) -> ImageCache:
    """One ImageCache over the shards that hold `keys` (path -> image key)."""
    missing = [path for path, key in keys.items() if key not in found]
    if missing:  # a shard removed by a concurrent run between its build and this read
        raise RuntimeError(f"image cache {folder}: {missing[0]} is missing; run again")
    shards = sorted({shard.folder for shard in found.values()})
    tables = [datasets.Dataset.from_file(str(s / "data.arrow")) for s in shards]
    offsets, total = {}, 0
    for shard_folder, table in zip(shards, tables, strict=True):
        offsets[shard_folder], total = total, total + len(table)
    rows = {path: offsets[found[key].folder] + found[key].keys[key] for path, key in keys.items()}
    passed = [
        [path, found[key].passed_through[path]]
        for path, key in keys.items()
        if path in found[key].passed_through
    ]
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    return ImageCache(table, rows, folder, built, passed)


def labels_for(records: Sequence[ImageRecord], task: Task | str) -> list[int]:
    """The class index of every record under a task (records outside the task are an error)."""
    task = as_task(task)
    labels = [task.label_of(r) for r in records]
    if None in labels:
        bad = records[labels.index(None)]
        raise ValueError(f"{bad.path}: subtype {bad.subtype} is not a class of task={task.name}")
    return labels  # type: ignore[return-value]


class ImageDataset(torch.utils.data.Dataset):
    """Items {"image": PIL RGB, "label", "index", "path"}; training augmentation per epoch.

    `image_source` is the ImageCache of `build_image_cache` (fast) or the data root (decode each
    PNG on the fly, stain-normalised with `stain` and resized by `image_size` and `model_side`
    as the cache does). Augmentation is seeded by (seed, epoch, index): call `set_epoch` before
    each epoch; with DataLoader workers keep `persistent_workers=False` so that workers see the
    new epoch.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        labels: Sequence[int],
        image_source: ImageCache | str | Path,
        augment: AugmentConfig | None = None,
        with_images: bool = True,
        image_size: int | None = None,
        stain: StainNormalizer | None = None,
        model_side: int | None = None,
    ) -> None:
        if len(labels) != len(records):
            raise ValueError(f"{len(records)} records but {len(labels)} labels")
        self.records = list(records)
        self.labels = [int(x) for x in labels]
        self.with_images = with_images
        self.image_size = image_size
        self.model_side = model_side
        self.stain = stain  # decoding from the root only: a cache holds normalised images
        self.augmenter = None if is_identity(augment) else Augmenter(augment)
        self.epoch = 0
        self.cache: ImageCache | None = None
        self.root: Path | None = None
        if isinstance(image_source, ImageCache):
            missing = [r.path for r in self.records if r.path not in image_source.rows]
            if missing:
                raise ValueError(
                    f"{len(missing)} image(s) are not in the image cache, e.g. {missing[0]}; "
                    "build the cache over these records (build_image_cache)"
                )
            self.cache = image_source
        else:
            self.root = Path(image_source)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Image.Image:
        """The preprocessed (not augmented) image of an item."""
        path = self.records[index].path
        if self.cache is not None:
            return self.cache.image(path)
        image = load_image(self.root / path)
        return preprocess_image(image, self.image_size, self.stain, self.model_side)[0]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {"label": self.labels[index], "index": index, "path": record.path}
        if self.with_images:
            image = self.load(index)
            if self.augmenter is not None:
                image = self.augmenter(image, self.epoch, index)
            item["image"] = image
        return item
