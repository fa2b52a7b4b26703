"""A synthetic replica of BreakHis: the real tree, names and counts, with learnable fake histology.

The class signal lives in structure (nuclei density, size and arrangement; glands, lumens, cords,
clefts, mucin), not in colour: stain colour and intensity vary per patient (and a little per image),
as between real slides, so a model that learns colour learns the patient, not the class.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import zlib
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from breakhis_ft.data.records import SUBTYPES
from breakhis_ft.errors import BadDataError
from breakhis_ft.files import build_once

GENERATOR_VERSION = 1  # bump when images or Folds.csv change, so cached replicas are rebuilt
TREE = Path("BreaKHis_v1", "histology_slides", "breast")
MAG_ZOOM = {40: 1.0, 100: 1.5, 200: 2.2, 400: 3.2}  # structure scale per magnification
MARKER = "replica.json"  # the stamp of a replica's folder: its settings, and whether it is complete
_BUILD_LOCK = ".replica.lock"  # data.root builds: concurrent first builds wait for one
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# Per subtype, in pixels of a 700-wide image at 40X. scatter: loose nuclei per 10k px; radius:
# nucleus radius; pleo: share of enlarged nuclei; glands/lumen: ringed lumens and their radius;
# cords: single-file lines; fronds: double rows (papillary); clusters/cluster_n: dense sheets;
# mucin/white: share of pale mucin / empty space; stroma: eosin level; clefts: elongated gaps.
STYLE: dict[str, dict[str, float]] = {
    "adenosis": dict(scatter=9, radius=2.6, glands=26, lumen=7, stroma=0.55),
    "fibroadenoma": dict(scatter=5, radius=2.4, glands=3, lumen=5, cords=9, stroma=0.85, clefts=4),
    "phyllodes_tumor": dict(scatter=24, radius=2.7, cords=2, stroma=0.75, clefts=7),
    "tubular_adenoma": dict(scatter=7, radius=2.4, glands=55, lumen=4, stroma=0.5),
    "ductal_carcinoma": dict(
        scatter=12, radius=3.8, pleo=0.4, glands=2, lumen=6, clusters=6, cluster_n=70, stroma=0.5
    ),
    "lobular_carcinoma": dict(scatter=9, radius=2.5, cords=24, stroma=0.65),
    "mucinous_carcinoma": dict(
        scatter=2, radius=3.0, clusters=6, cluster_n=22, mucin=0.6, stroma=0.35
    ),
    "papillary_carcinoma": dict(
        scatter=5, radius=3.2, pleo=0.15, fronds=6, white=0.35, stroma=0.45
    ),
}
# Ruifrok & Johnston optical densities of haematoxylin and eosin (unit RGB vectors).
H_OD = np.array([0.650, 0.704, 0.286])
E_OD = np.array([0.072, 0.990, 0.105])
# Fields of real slides that the replica's styles never draw, for the stain-normalisation checks
# and previews (render_batch with one of these styles; the replica itself does not use them):
# grey_lumen: share of the image under pale green-grey unstained fluid (RGB about 193-206);
# blank: share of empty glass (a mucinous field that is 82% white, a few cells in the rest).
HARD_FIELDS: dict[str, dict[str, float]] = {
    "green_grey_lumen": {**STYLE["adenosis"], "grey_lumen": 0.6},
    "mostly_white_mucinous": {**STYLE["mucinous_carcinoma"], "mucin": 0.0, "blank": 0.82},
}
LUMEN_OD = np.array([0.24, 0.17, 0.21])  # green-grey fluid: red absorbed most, green least


@dataclass(frozen=True)
class ReplicaImage:
    """One image to write: where, and what it shows."""

    rel_path: str  # relative to the replica root
    subtype: str
    patient_dir: str
    magnification: int


def read_inventory() -> list[tuple[str, str, int, int]]:
    """The shipped inventory rows (subtype_dir, patient_dir, magnification, images)."""
    text = (resources.files("breakhis_ft") / "resources" / "breakhis_inventory.tsv").read_text()
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    return [
        (r["subtype_dir"], r["patient_dir"], int(r["magnification"].rstrip("X")), int(r["images"]))
        for r in rows
    ]


def plan_replica(fraction: float = 1.0) -> list[ReplicaImage]:
    """Every image of a replica: inventory counts scaled by `fraction`, >= 1 per folder/mag."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.synthetic_fraction={fraction}: must be in (0, 1]")
    plan = []
    for subtype, patient_dir, mag, n in sorted(read_inventory()):
        tumor_class = SUBTYPES[subtype][1]
        prefix = patient_dir.replace(f"_{patient_dir.split('_')[-1]}", "")  # SOB_B_A
        year_slide = patient_dir.split("_")[-1]  # 14-22549AB
        for seq in range(1, max(1, round(n * fraction)) + 1):
            name = f"{prefix}-{year_slide}-{mag}-{seq:03d}.png"
            rel = TREE / tumor_class / "SOB" / subtype / patient_dir / f"{mag}X" / name
            plan.append(ReplicaImage(rel.as_posix(), subtype, patient_dir, mag))
    return plan


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def _blur(a: np.ndarray, r: int) -> np.ndarray:
    """Box blur of radius r, twice per axis (a cheap Gaussian), zero-padded; a is (n, h, w)."""
    if r < 1:
        return a
    w = 2 * r + 1
    for _ in range(2):
        for _ in range(2):  # blur the last axis, then swap the two image axes
            n, rows, cols = a.shape
            padded = np.concatenate(
                [np.zeros((n, rows, r + 1), np.float32), a, np.zeros((n, rows, r), np.float32)], 2
            )
            c = np.cumsum(padded, axis=2, dtype=np.float32)
            a = ((c[:, :, w:] - c[:, :, :-w]) / w).transpose(0, 2, 1)
    return a


def _peak_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Blur scaled so that one isolated point peaks at 1."""
    return _blur(a, r) * (2 * r + 1) ** 2


def _smooth_noise(rng: np.random.Generator, n: int, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], (n, h, w): coarse random grids upsampled bilinearly."""
    gh, gw = max(3, round(cells * h / w)), cells
    grid = rng.random((n, gh, gw), dtype=np.float32)
    fy, fx = np.linspace(0, gh - 1, h), np.linspace(0, gw - 1, w)
    y0, x0 = np.minimum(fy.astype(int), gh - 2), np.minimum(fx.astype(int), gw - 2)
    wy, wx = (fy - y0).astype(np.float32)[:, None], (fx - x0).astype(np.float32)[None, :]
    top = grid[:, y0][:, :, x0] * (1 - wx) + grid[:, y0][:, :, x0 + 1] * wx
    bottom = grid[:, y0 + 1][:, :, x0] * (1 - wx) + grid[:, y0 + 1][:, :, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def _share_mask(rng: np.random.Generator, n: int, h: int, w: int, share: float) -> np.ndarray:
    """(n, h, w) smooth random regions covering `share` of each image's pixels."""
    field = _smooth_noise(rng, n, h, w, 4)
    return field < np.quantile(field.reshape(n, -1), share, axis=1)[:, None, None]


def _splat(n: int, h: int, w: int, idx, ys, xs) -> np.ndarray:
    """Count points per pixel, (n, h, w); points outside the image are dropped."""
    ys, xs = np.round(ys).astype(np.int64), np.round(xs).astype(np.int64)
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat = (idx[ok] * h + ys[ok]) * w + xs[ok]
    return np.bincount(flat, minlength=n * h * w).reshape(n, h, w).astype(np.float32)


def _lines(rng, counts, h, w, length, step, jitter, rows=1, gap=0.0):
    """Points along random gently curving segments, `rows` parallel rows `gap` apart."""
    k, m = int(counts.sum()), max(2, int(length / step))
    img = np.repeat(np.arange(counts.size), counts)
    ang = rng.uniform(0, np.pi, k) + rng.normal(0, 0.15, (m, k)).cumsum(0)
    ys = rng.uniform(0, h, k) + (np.sin(ang) * step).cumsum(0)
    xs = rng.uniform(0, w, k) + (np.cos(ang) * step).cumsum(0)
    out = []
    for row in range(rows):
        off = (row - (rows - 1) / 2) * gap
        out.append(
            (
                np.broadcast_to(img, ys.shape).ravel(),
                (ys + off * np.cos(ang) + rng.normal(0, jitter, ys.shape)).ravel(),
                (xs - off * np.sin(ang) + rng.normal(0, jitter, xs.shape)).ravel(),
            )
        )
    return [np.concatenate(parts) for parts in zip(*out, strict=True)]


def _work_size(out_w: int, out_h: int) -> tuple[int, int, int]:
    """Working size and how it maps to the output: factor f > 1 box-downsamples, 0 upsamples."""
    if out_w < 96:  # render larger, then average f x f blocks: structure survives as statistics
        f = min(4, -(-96 // out_w))
        return out_w * f, out_h * f, f
    if out_w > 384:  # render at half size, then resize up: 4x fewer pixels to compute
        return -(-out_w // 2), -(-out_h // 2), 0
    return out_w, out_h, 1


def render_batch(style: dict, stain: dict, mag: int, size: tuple[int, int], n: int, rng):
    """n synthetic H&E images (uint8, n x H x W x 3) of one subtype, patient and magnification."""
    out_w, out_h = size
    w, h, f = _work_size(out_w, out_h)
    u = w / 700 * MAG_ZOOM[mag]  # working pixels per style unit
    area = h * w / (u * u) / 1e4  # image area in units of 10k style pixels

    def count(key: str, scale: float = 1.0) -> np.ndarray:  # per image, with per-image variation
        return rng.poisson(style.get(key, 0.0) * scale * area * rng.lognormal(0, 0.3, n))

    r = max(0.5, style["radius"] * u * rng.lognormal(0, 0.1))
    pts = []  # (image index, y, x) arrays of nuclei centres
    c = count("scatter")
    pts.append((np.repeat(np.arange(n), c), rng.uniform(0, h, c.sum()), rng.uniform(0, w, c.sum())))
    white = np.zeros((n, h, w), bool)
    if style.get("glands"):  # lumens ringed by nuclei
        c, lum = count("glands", 0.1), style["lumen"] * u
        g_img = np.repeat(np.arange(n), c)
        cy, cx = rng.uniform(0, h, c.sum()), rng.uniform(0, w, c.sum())
        rl = max(0, round(0.77 * lum - 0.5))
        white |= _peak_blur(_splat(n, h, w, g_img, cy, cx), rl) > 0.35
        per = max(4, int(2 * np.pi * lum / (2.3 * r)))
        gi = np.repeat(np.arange(c.sum()), per)
        t = rng.uniform(0, 2 * np.pi, gi.size)
        rad = lum + r * (1 + rng.normal(0, 0.3, gi.size))
        pts.append((g_img[gi], cy[gi] + rad * np.sin(t), cx[gi] + rad * np.cos(t)))
    for key, rows in (("cords", 1), ("fronds", 2)):
        if style.get(key):
            pts.append(_lines(rng, count(key, 0.1), h, w, 70 * u, 2.4 * r, 0.3 * r, rows, 3.5 * r))
    if style.get("clusters"):  # dense sheets / floating clusters
        c = count("clusters", 0.1)
        m = rng.poisson(style["cluster_n"] * rng.lognormal(0, 0.3, c.sum()))
        ci = np.repeat(np.arange(c.sum()), m)
        spread = (np.sqrt(m) * 1.3 * r)[ci]
        cy, cx = rng.uniform(0, h, c.sum())[ci], rng.uniform(0, w, c.sum())[ci]
        pts.append(
            (
                np.repeat(np.arange(n), c)[ci],
                cy + rng.normal(0, 1, ci.size) * spread,
                cx + rng.normal(0, 1, ci.size) * spread,
            )
        )
    if style.get("clefts"):  # long thin gaps in the stroma
        ci, cy, cx = _lines(rng, count("clefts", 0.1), h, w, 70 * u, max(1.0, u), 0.2 * u)
        white |= _peak_blur(_splat(n, h, w, ci, cy, cx), max(1, round(1.5 * u))) > 0.4
    idx, ys, xs = (np.concatenate(p) for p in zip(*pts, strict=True))
    big = rng.random(idx.size) < style.get("pleo", 0.1)
    ri, rb = max(0, round(r / 1.5)), max(1, round(1.6 * r / 1.5))
    small_pts, big_pts = (
        _splat(n, h, w, idx[~big], ys[~big], xs[~big]),
        _splat(n, h, w, idx[big], ys[big], xs[big]),
    )
    nuc = np.clip((_peak_blur(small_pts, ri) + _peak_blur(big_pts, rb)) * 1.5, 0, 1)
    rc = max(1, round(2 * r))
    cyto = np.clip(_peak_blur(small_pts + big_pts, rc) * 0.12, 0, 1)
    pale = np.zeros((n, h, w), bool)
    for key in ("mucin", "white"):  # pale regions where a smooth field is below the share
        if style.get(key):
            share = style[key] * rng.lognormal(0, 0.15, (n, 1, 1))
            pale |= _smooth_noise(rng, n, h, w, 4) < share
    vary = lambda s: rng.lognormal(0, s, (n, 1, 1)).astype(np.float32)  # noqa: E731
    stroma = style["stroma"] * (0.6 + 0.8 * _smooth_noise(rng, n, h, w, 6)) * vary(0.12)
    e_conc = np.where(white | pale, np.float32(0.05), stroma) + 0.35 * cyto
    mucin = np.float32(0.12 if style.get("mucin") else 0.0)
    h_conc = 0.04 + 1.1 * nuc + 0.1 * cyto + np.where(pale, mucin, np.float32(0))
    h_conc *= vary(0.05)
    e_conc *= vary(0.05)
    h_vec, e_vec = (stain["h"] * stain["kh"]).tolist(), (stain["e"] * stain["ke"]).tolist()
    bg = stain["bg"].tolist()  # Python floats keep the arithmetic in float32
    # channel by channel: Beer-Lambert, transmitted light = exp(-optical density)
    img = np.stack([np.exp(-(h_conc * h_vec[c] + e_conc * e_vec[c] + bg[c])) for c in range(3)], -1)
    if f > 1:
        img = img.reshape(n, out_h, f, out_w, f, 3).mean((2, 4), dtype=np.float32)
    noise = rng.standard_normal(img.shape[1:], dtype=np.float32) * (4.0 / 255)
    for i in range(n):  # sensor noise: one field per batch, shifted per image (much cheaper)
        img[i] += np.roll(noise, (rng.integers(img.shape[1]), rng.integers(img.shape[2])), (0, 1))
    if style.get("grey_lumen"):  # unstained fluid over part of the field, a little uneven
        lumen = _share_mask(rng, n, img.shape[1], img.shape[2], style["grey_lumen"])
        depth = 0.9 + 0.2 * _smooth_noise(rng, n, img.shape[1], img.shape[2], 8)
        fluid = np.exp(-(depth[..., None] * LUMEN_OD + stain["bg"])).astype(np.float32)
        img = np.where(lumen[..., None], fluid + noise * 0.5, img)
    if style.get("blank"):  # empty glass: the background tint only
        glass = _share_mask(rng, n, img.shape[1], img.shape[2], style["blank"])
        empty = np.exp(-stain["bg"]).astype(np.float32)
        img = np.where(glass[..., None], empty + noise * 0.5, img)
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if f == 0:
        img = np.stack(
            [
                np.asarray(Image.fromarray(a).resize((out_w, out_h), Image.Resampling.BICUBIC))
                for a in img
            ]
        )
    return img


def patient_stain(seed: int, slide: str) -> dict:
    """A patient's stain: perturbed H and E vectors, intensities and a background tint."""
    rng = _rng(seed, "stain", slide)

    def unit(v):
        return v / np.linalg.norm(v)

    return {
        "h": unit(np.clip(H_OD + rng.normal(0, 0.1, 3), 0.05, None)),
        "e": unit(np.clip(E_OD + rng.normal(0, 0.1, 3), 0.02, None)),
        "kh": 1.4 * rng.lognormal(0, 0.25),
        "ke": 0.55 * rng.lognormal(0, 0.3),
        "bg": np.clip(rng.normal(0.04, 0.025, 3), 0, None),
    }


def _slide_key(patient_dir: str) -> str:
    """The generation key of a slide: the 13412 copies share one, so their images are identical."""
    return patient_dir.split("-")[-1]


def _write_folders(args: tuple[str, list[list[ReplicaImage]], tuple[int, int], int]) -> int:
    """Render and write whole folder/magnification groups of images."""
    dest, groups, size, seed = args
    for items in groups:
        it = items[0]
        key = _slide_key(it.patient_dir)
        # the 13412 copies must agree: both render as the ductal copy (eva's choice of its subtype)
        subtype = "ductal_carcinoma" if key == "13412" else it.subtype
        rng = _rng(seed, "images", key, str(it.magnification))
        imgs = render_batch(
            STYLE[subtype], patient_stain(seed, key), it.magnification, size, len(items), rng
        )
        folder = Path(dest) / Path(it.rel_path).parent
        folder.mkdir(parents=True, exist_ok=True)
        for item, img in zip(items, imgs, strict=True):
            Image.fromarray(img).save(Path(dest) / item.rel_path, "PNG", compress_level=1)
    return sum(map(len, groups))


def write_folds_csv(path: Path, plan: list[ReplicaImage], seed: int) -> None:
    """A Kaggle-format Folds.csv: 5 folds, about 70/30 of each subtype's images by patient."""
    images = defaultdict(list)
    for it in plan:
        images[(it.subtype, it.patient_dir)].append(it)
    by_subtype = defaultdict(list)
    for subtype, patient in sorted(images):
        by_subtype[subtype].append(patient)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["fold", "mag", "grp", "filename"])
        for fold in range(1, 6):
            rng = _rng(seed, "folds", str(fold))
            for subtype, patients in by_subtype.items():
                total = sum(len(images[(subtype, p)]) for p in patients)
                test, n_test = set(), 0
                for p in rng.permutation(patients):  # like the originals: whole patient folders
                    if n_test < 0.3 * total and len(test) < len(patients) - 1:
                        test.add(str(p))
                        n_test += len(images[(subtype, str(p))])
                for p in patients:
                    for it in images[(subtype, p)]:
                        grp = "test" if p in test else "train"
                        out.writerow([fold, it.magnification, grp, it.rel_path])


def _replica_meta(folder: Path) -> dict | None:
    """The replica stamp (MARKER) of a folder, or None when it carries none."""
    try:
        meta = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def replica_complete(folder: str | Path) -> bool:
    """Whether a folder holds a finished replica (a build stamps it first as unfinished; stamps
    written before that record no `complete` and were written at the end of a build)."""
    meta = _replica_meta(Path(folder))
    return meta is not None and meta.get("complete", True) is True


def _breakhis_evidence(root: Path, max_entries: int = 20000) -> str | None:
    """What in `root` looks like BreakHis data (histology_slides/, a Folds.csv, an image), or None;
    the first `max_entries` entries, top down, are looked at."""
    seen = 0
    for current, dirs, names in os.walk(root):
        here = Path(current).relative_to(root)
        for name in dirs:
            if name.lower() == "histology_slides":
                return f"{here / name}/"
        for name in names:
            if name.lower() == "folds.csv" or Path(name).suffix.lower() in _IMAGE_SUFFIXES:
                return str(here / name)
        seen += len(dirs) + len(names)
        if seen > max_entries:
            return None
    return None


def check_replica_folder(root: str | Path, key: str | None = None) -> None:
    """Refuse (BadDataError) to build a replica into a folder that is not new, empty or a replica's
    own (stamped with MARKER); nothing is written. `key`: the config key that named the folder."""
    root = Path(root)
    where = f"{key}={root}" if key else str(root)
    if not root.exists() or _replica_meta(root) is not None:
        return
    if not root.is_dir():
        raise BadDataError(f"{where} is a file: a replica is built into a new or empty folder")
    if not [p for p in root.iterdir() if p.name != _BUILD_LOCK]:
        return
    found = _breakhis_evidence(root)
    if found is not None:
        raise BadDataError(
            f"{where} holds BreakHis data ({found}). With data=synthetic (the default data "
            "group) data.root is the folder the synthetic replica is built in, and a folder of "
            "real data is only ever read: nothing was written. To train on these images: "
            f"data=breakhis data.root={root}. For the replica: leave data.root unset (it is built "
            "under paths.synthetic) or give a new or empty folder"
        )
    raise BadDataError(
        f"{where} is not empty and holds no replica (no {MARKER}): the synthetic replica is "
        "built only into a new or empty folder, and nothing was written to this one. Give a new "
        "or empty folder, or leave data.root unset (the replica is built under paths.synthetic)"
    )


def _write_marker(dest: Path, meta: dict) -> None:
    tmp = dest / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(dest / MARKER)


def build_replica(
    dest: str | Path,
    fraction: float = 1.0,
    size: tuple[int, int] = (700, 460),
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write a replica (official tree under BreaKHis_v1/ + a Kaggle Folds.csv) into `dest`.

    `dest` must be new, empty or a replica (`check_replica_folder`): it is stamped (MARKER,
    `complete: false`) before anything else is written into it, and completed at the end, so an
    interrupted build leaves a folder that is recognisably ours and is rebuilt."""
    dest = Path(dest)
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise ValueError(f"data.synthetic_size={list(size)}: width and height must be positive")
    plan = plan_replica(fraction)
    check_replica_folder(dest)
    dest.mkdir(parents=True, exist_ok=True)
    meta = {"fraction": fraction, "size": list(size), "seed": seed}
    meta["generator_version"] = GENERATOR_VERSION
    _write_marker(dest, {**meta, "complete": False})
    shutil.rmtree(dest / TREE.parts[0], ignore_errors=True)  # an earlier build's images (ours)
    if workers is None:  # processes pay off only for big images
        pixels = len(plan) * size[0] * size[1]
        workers = min(os.cpu_count() or 1, 8) if pixels > 2e8 else 1
    folders = defaultdict(list)
    for it in plan:
        folders[(it.patient_dir, it.magnification)].append(it)
    groups = list(folders.values())
    n_jobs = workers * 4 if workers > 1 else 1
    jobs = [(str(dest), groups[i::n_jobs], size, seed) for i in range(n_jobs)]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            written = sum(pool.map(_write_folders, jobs))
    else:
        written = sum(map(_write_folders, jobs))
    write_folds_csv(dest / "Folds.csv", plan, seed)
    _write_marker(dest, {**meta, "images": written, "complete": True})
    return dest


def replica_key(fraction: float, size: tuple[int, int], seed: int) -> str:
    """The cache folder name of a replica's parameters."""
    return f"f{fraction:g}_{int(size[0])}x{int(size[1])}_seed{seed}_v{GENERATOR_VERSION}"


def ensure_replica(
    synthetic_dir: str | Path,
    fraction: float = 1.0,
    size: tuple[int, int] = (700, 460),
    seed: int = 0,
) -> Path:
    """The replica in `synthetic_dir/<key>/`, built once (atomically, under a lock) and reused."""
    final = Path(synthetic_dir).expanduser() / replica_key(fraction, size, seed)
    if not replica_complete(final):
        check_replica_folder(final)  # the cache's own folder: never someone's files
    return build_once(final, lambda tmp: build_replica(tmp, fraction, size, seed), replica_complete)


def ensure_replica_at(root: str | Path, fraction: float, size: tuple[int, int], seed: int) -> Path:
    """The replica in a folder the user named (data.root with data=synthetic): built there when
    the folder is new or empty, reused when it holds this replica. A folder holding anything
    else (real BreakHis data above all) is refused and left as it was; a replica of other
    settings too. Concurrent first builds (ranks, array tasks) wait for one under a lock."""
    root = Path(root).expanduser()
    check_replica_folder(root, "data.root")
    if not replica_complete(root):
        root.mkdir(parents=True, exist_ok=True)
        with open(root / _BUILD_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not replica_complete(root):  # not built by another process while we waited
                build_replica(root, fraction, size, seed)
    meta = _replica_meta(root) or {}
    built = (meta.get("fraction"), meta.get("size"), meta.get("seed"))
    if built + (meta.get("generator_version"),) != (fraction, list(size), seed, GENERATOR_VERSION):
        raise BadDataError(
            f"data.root={root} holds a replica built with other settings ({root / MARKER}); "
            "choose another data.root, delete it, or leave data.root unset"
        )
    return root
