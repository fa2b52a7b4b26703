"""The image cache (decoded, resized images in a `datasets` Arrow file) and the torch Dataset.

Decoding a 700x460 PNG and resizing it costs far more than reading raw pixels from a memory-mapped
Arrow file, and every epoch of every run would repeat it. The cache stores each image resized so its
longest side is `image_size` (aspect kept), as raw RGB bytes. Its folder name is a hash of the
preprocessing (size, resampling, version, stain normaliser) and the file list (paths, sizes,
modification times): a change in any of them selects a new cache, and an existing one is reused as
is. With a stain normaliser (data.stain_norm) each image is normalised at full size, then resized;
images it passes through unchanged (no stain to estimate) are listed in the cache's cache.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.arrow_writer import ArrowWriter
from PIL import Image
from tqdm.auto import tqdm

from breakhis_ft.config import AugmentConfig
from breakhis_ft.data.augment import Augmenter, is_identity
from breakhis_ft.data.breakhis import load_image
from breakhis_ft.data.records import ImageRecord, Task, as_task
from breakhis_ft.data.stain import StainNormalizer

CACHE_VERSION = 1  # bump when the stored format or the resizing changes
RESAMPLE = Image.Resampling.BICUBIC
FEATURES = datasets.Features(
    {
        "path": datasets.Value("string"),
        "height": datasets.Value("int32"),
        "width": datasets.Value("int32"),
        "pixels": datasets.Value("binary"),  # raw RGB bytes, height x width x 3
    }
)
DONE = "cache.json"


def image_key(path: str, data_root: str | Path) -> str:
    """`path|size|mtime_ns` of an image file: changes whenever the file does."""
    try:
        stat = (Path(data_root) / path).stat()
    except OSError as err:
        raise FileNotFoundError(f"image {path!r} not found under data root {data_root}") from err
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def resize_longest(image: Image.Image, size: int | None) -> Image.Image:
    """Resize so that the longest side is `size`, keeping the aspect ratio (None: unchanged)."""
    if size is None or max(image.size) == size:
        return image
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new, RESAMPLE)


def preprocess_image(
    image: Image.Image, image_size: int | None, stain: StainNormalizer | None = None
) -> tuple[Image.Image, str | None]:
    """Training's preprocessing: stain-normalise at full size (when given), then resize.

    Returns (image, why the normaliser passed it through unchanged, or None).
    """
    reason = None
    if stain is not None:
        image, reason = stain.normalize(image)
    return resize_longest(image, image_size), reason


def cache_key(
    records: Sequence[ImageRecord],
    root: str | Path,
    image_size: int,
    stain: StainNormalizer | None = None,
) -> str:
    """Hash of the preprocessing and of the files (path, size, mtime) that a cache holds."""
    root = Path(root)
    files = []
    for r in records:
        st = os.stat(root / r.path)
        files.append((r.path, st.st_size, st.st_mtime_ns))
    spec = {
        "version": CACHE_VERSION,
        "image_size": image_size,
        "resample": RESAMPLE.name,
        "root": str(root.resolve()),
        "files": files,
    }
    if stain is not None:  # absent without one: caches built before stain normalisation stay valid
        spec["stain"] = stain.identity()
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:20]


def _decode(
    root: Path, record: ImageRecord, image_size: int, stain: StainNormalizer | None
) -> tuple[dict, str | None]:
    img, reason = preprocess_image(load_image(root / record.path), image_size, stain)
    row = {
        "path": record.path,
        "height": img.height,
        "width": img.width,
        "pixels": np.asarray(img, dtype=np.uint8).tobytes(),
    }
    return row, reason


def cache_info(cache: datasets.Dataset) -> dict:
    """The cache.json of an image cache: images, image_size, root, stain, stain_passed_through."""
    return json.loads((Path(cache.cache_files[0]["filename"]).parent / DONE).read_text())


def build_image_cache(
    records: Sequence[ImageRecord],
    root: str | Path,
    image_size: int,
    cache_dir: str | Path,
    workers: int | None = None,
    progress: bool = True,
    stain: StainNormalizer | None = None,
) -> datasets.Dataset:
    """The Arrow cache of these records' resized images: built once (atomically), then reused.

    Pass all the records of a scan to have one cache serve every split and magnification.
    `stain`: normalise each image before resizing; `cache_info(cache)["stain_passed_through"]`
    lists [path, reason] of the images it left unchanged.
    """
    if not records:
        raise ValueError("build_image_cache: no records")
    if image_size < 1:
        raise ValueError(f"data.image_size={image_size}: must be a positive number of pixels")
    root = Path(root)
    final = Path(cache_dir).expanduser() / "images" / cache_key(records, root, image_size, stain)
    if (final / DONE).is_file():
        return datasets.Dataset.from_file(str(final / "data.arrow"))
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = ArrowWriter(features=FEATURES, path=str(tmp / "data.arrow"))
        workers = workers or min(4, os.cpu_count() or 1)  # PIL decodes and resizes without the GIL
        bar = tqdm(
            total=len(records), desc=f"caching images at {image_size}px", disable=not progress
        )
        passed: list[list[str]] = []  # [path, reason] of images the normaliser left unchanged
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(records), 256):  # bounded memory: 256 images per batch
                batch = records[start : start + 256]
                done = list(pool.map(lambda r: _decode(root, r, image_size, stain), batch))
                rows = [row for row, _ in done]
                passed += [[row["path"], why] for row, why in done if why is not None]
                writer.write_batch({k: [row[k] for row in rows] for k in FEATURES})
                bar.update(len(rows))
        bar.close()
        writer.finalize()
        info = {"images": len(records), "image_size": image_size, "root": str(root)}
        if stain is not None:
            info.update(stain=stain.to_dict(), stain_passed_through=passed)
        (tmp / DONE).write_text(json.dumps(info))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / DONE).is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.Dataset.from_file(str(final / "data.arrow"))


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

    `image_source` is the Arrow cache of `build_image_cache` (fast) or the data root (decode each
    PNG on the fly, stain-normalised with `stain` and resized to `image_size` when given).
    Augmentation is seeded by (seed, epoch, index): call `set_epoch` before each epoch; with
    DataLoader workers keep `persistent_workers=False` so that workers see the new epoch.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        labels: Sequence[int],
        image_source: datasets.Dataset | str | Path,
        augment: AugmentConfig | None = None,
        with_images: bool = True,
        image_size: int | None = None,
        stain: StainNormalizer | None = None,
    ) -> None:
        if len(labels) != len(records):
            raise ValueError(f"{len(records)} records but {len(labels)} labels")
        self.records = list(records)
        self.labels = [int(x) for x in labels]
        self.with_images = with_images
        self.image_size = image_size
        self.stain = stain  # decoding from the root only: a cache holds normalised images
        self.augmenter = None if is_identity(augment) else Augmenter(augment)
        self.epoch = 0
        self.cache: datasets.Dataset | None = None
        self.root: Path | None = None
        if isinstance(image_source, datasets.Dataset):
            self.cache = image_source
            row_of = {p: i for i, p in enumerate(image_source["path"])}
            missing = [r.path for r in self.records if r.path not in row_of]
            if missing:
                raise ValueError(
                    f"{len(missing)} image(s) are not in the image cache, e.g. {missing[0]}; "
                    "build the cache over these records (build_image_cache)"
                )
            self.rows = [row_of[r.path] for r in self.records]
        else:
            self.root = Path(image_source)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Image.Image:
        """The preprocessed (not augmented) image of an item."""
        if self.cache is not None:
            row = self.cache[self.rows[index]]
            pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], 3)
            return Image.fromarray(pixels)
        image = load_image(self.root / self.records[index].path)
        return preprocess_image(image, self.image_size, self.stain)[0]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {"label": self.labels[index], "index": index, "path": record.path}
        if self.with_images:
            image = self.load(index)
            if self.augmenter is not None:
                image = self.augmenter(image, self.epoch, index)
            item["image"] = image
        return item
