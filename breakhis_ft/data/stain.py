"""H&E stain normalisation (Macenko or Reinhard) through torchstain's numpy backend.

H&E colour differs by laboratory, staining batch and scanner. A `StainNormalizer` maps an image's
colours onto those of a reference:

- "macenko" (Macenko et al., ISBI 2009): the image's haematoxylin and eosin optical-density (OD)
  vectors are estimated from its tissue pixels, each pixel is unmixed into H and E concentrations,
  the concentrations are rescaled so their 99th percentiles match the reference's, and the pixel
  is recomposed with the reference's stain vectors. Structure is kept; only the stains change.
- "reinhard" (Reinhard et al., 2001): the mean and standard deviation of each CIE-LAB channel
  (over all pixels, background included, as torchstain does) are matched to the reference's.
  Cheaper and cruder: the statistics depend on how much of the image is tissue.

The decomposition itself is torchstain's (`NumpyMacenkoNormalizer`, `NumpyReinhardNormalizer`;
numpy only, it does not import torch). This module adds what a dataset pipeline needs around it:
fitted parameters as plain numbers (`to_dict` / `from_dict`, JSON-ready for a run folder or an
export), a stable `identity()` for cache keys, a reference estimated from several images, and one
documented behaviour for images that have no stain to estimate.

Images with no usable stain. `blank_reason` calls an image unusable when it is (nearly) one
colour (every RGB channel's standard deviation under UNIFORM_STD grey levels: blank white, black,
a flat colour, plus sensor noise) or when fewer than max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION of
the pixels) are tissue (OD >= BETA in all three channels, with incident light IO: torchstain's
Macenko tissue mask). Neither method can estimate anything from such an image (Macenko's
eigen-decomposition fails or returns arbitrary vectors; Reinhard divides by a zero deviation).
- Applying a normaliser (`normalize`, `__call__`): such an image, or one on which torchstain fails
  (a singular matrix, a non-finite value), is passed through UNCHANGED (converted to RGB);
  `normalize` returns the reason, so the caller can count them and report, and `__call__` logs a
  warning. One blank tile must not stop the caching of a whole dataset.
- Fitting (`fit_stain_normalizer`): a single reference image that is unusable raises ValueError
  naming the image and the problem. With several images (data.stain_reference=train) unusable
  ones are skipped with a warning; ValueError only when none is usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from breakhis_ft.errors import BadDataError

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")
# a run folder's (and an export's) fitted normaliser, `to_dict()` as JSON
NORMALIZER_FILE = "stain_normalizer.json"
STAIN_VERSION = 1  # bump when this module's output for the same parameters changes
# Macenko settings: incident light intensity, percentile of the extreme stain angles, and the OD
# a tissue pixel reaches in every channel. torchstain's defaults except BETA (theirs: 0.15): at
# 0.15 the pale eosin-only stroma of the replica (Ruifrok's eosin absorbs little red or blue) is
# outside the tissue mask, the E vector is estimated from nuclei alone and Macenko turns the
# stroma white; 0.05 keeps it in. Check on real slides: grey backgrounds (< ~230) enter the mask.
IO, ALPHA, BETA = 240.0, 1.0, 0.05
MIN_TISSUE_FRACTION = 0.002  # share of tissue pixels below which an image is called blank
MIN_TISSUE_PIXELS = 100  # ... and the absolute minimum (Macenko's 1st/99th percentiles need some)
UNIFORM_STD = 6.0  # grey levels: an image whose every channel varies less is one flat colour
MIN_STAIN_ANGLE = 1.0  # degrees between fitted H and E vectors; below, the fit is degenerate
SIGNIFICANT_DIGITS = 8  # fitted parameters are rounded, so identity() is stable across machines
_GATE = {  # part of identity(): which images pass through unchanged
    "io": IO,
    "beta": BETA,
    "min_tissue_fraction": MIN_TISSUE_FRACTION,
    "min_tissue_pixels": MIN_TISSUE_PIXELS,
    "uniform_std": UNIFORM_STD,
}
_FAILURES = (ArithmeticError, ValueError, IndexError, np.linalg.LinAlgError)


class StainFitError(BadDataError):
    """A stain reference no normaliser can be fitted to (no training images, no stain in them);
    the message names `data.stain_reference` and what to give instead."""


def _rgb(image: Image.Image) -> np.ndarray:
    """An image as an H x W x 3 uint8 array (converted to RGB if needed)."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """H x W booleans: optical density >= BETA in every channel (torchstain's Macenko mask)."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / IO)
    return np.all(od >= BETA, axis=-1)


def blank_reason(rgb: np.ndarray) -> str | None:
    """Why an H x W x 3 uint8 image has no stain to estimate, or None when it has."""
    std = rgb.reshape(-1, 3).std(axis=0)
    if std.max() < UNIFORM_STD:
        mean = np.round(rgb.reshape(-1, 3).mean(axis=0)).astype(int).tolist()
        return f"one flat colour (mean RGB {mean}, channel std < {UNIFORM_STD:g} grey levels)"
    tissue = int(tissue_mask(rgb).sum())
    needed = max(MIN_TISSUE_PIXELS, int(np.ceil(MIN_TISSUE_FRACTION * rgb.shape[0] * rgb.shape[1])))
    if tissue < needed:
        return (
            f"too little tissue ({tissue} of {rgb.shape[0] * rgb.shape[1]} pixels have optical "
            f"density >= {BETA:g} in every channel; at least {needed} needed)"
        )
    return None


def _round(values: Any) -> Any:
    """Plain Python floats (nested lists), rounded to SIGNIFICANT_DIGITS."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim:
        return [_round(v) for v in arr]
    return float(f"{float(arr):.{SIGNIFICANT_DIGITS}g}")


def _check_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Validated, canonical parameters (plain floats) of a method."""
    if method not in METHODS:
        raise ValueError(f"stain normalisation method {method!r}: must be one of {list(METHODS)}")
    shapes = (
        {"stain_matrix": (2, 3), "max_concentrations": (2,), "io": (), "alpha": (), "beta": ()}
        if method == "macenko"
        else {"lab_mean": (3,), "lab_std": (3,)}
    )
    if set(params) != set(shapes):
        raise ValueError(
            f"{method} stain parameters {sorted(params)}: expected exactly {sorted(shapes)}"
        )
    out = {}
    for key, shape in shapes.items():
        arr = np.asarray(params[key], dtype=np.float64)
        if arr.shape != shape or not np.isfinite(arr).all():
            raise ValueError(f"{method} {key}={params[key]!r}: must be finite numbers of {shape}")
        out[key] = arr.tolist()
    if method == "macenko":
        if min(out["max_concentrations"]) <= 0 or out["io"] <= 0 or out["beta"] < 0:
            raise ValueError(f"macenko {out}: max_concentrations and io must be > 0, beta >= 0")
        if not 0 <= out["alpha"] < 50:
            raise ValueError(f"macenko alpha={out['alpha']}: a percentile in [0, 50)")
    if method == "reinhard" and min(out["lab_std"]) <= 0:
        raise ValueError(f"reinhard lab_std={out['lab_std']}: must be > 0")
    return out


@dataclass(frozen=True, eq=False)
class StainNormalizer:
    """A fitted stain normaliser: the method and the reference's parameters as plain numbers.

    params, per method (treat as read-only):
    - macenko: stain_matrix [[H_r, H_g, H_b], [E_r, E_g, E_b]] (unit OD vectors of haematoxylin and
      eosin), max_concentrations [H, E] (99th percentiles of the concentrations), and the
      torchstain settings they were fitted and are applied with: io, alpha, beta;
    - reinhard: lab_mean and lab_std [L, a, b] (L in 0..100, a and b centred on 0).
    reference: names of the images it was fitted on (provenance only: not compared, not hashed).
    Thread-safe: every call builds its own torchstain object.
    """

    method: str
    params: dict[str, Any]
    reference: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _check_params(self.method, self.params))
        object.__setattr__(self, "reference", tuple(str(r) for r in self.reference))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"method", "params", "reference", "version"}."""
        return {
            "method": self.method,
            "params": json.loads(json.dumps(self.params)),
            "reference": list(self.reference),
            "version": STAIN_VERSION,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StainNormalizer:
        """The inverse of `to_dict` (a different "version" is refused: outputs would differ)."""
        version = d.get("version", STAIN_VERSION)
        if version != STAIN_VERSION:
            raise ValueError(
                f"stain normaliser of version {version}; this code is version {STAIN_VERSION}: "
                "refit it (fit_stain_normalizer) to reproduce the saved one's behaviour"
            )
        return cls(d["method"], dict(d["params"]), tuple(d.get("reference", ())))

    def identity(self) -> str:
        """16 hex digits: a hash of the method, parameters, blank-image gate and version."""
        spec = {
            "version": STAIN_VERSION,
            "method": self.method,
            "params": self.params,
            "gate": _GATE,
        }
        text = json.dumps(spec, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StainNormalizer):
            return NotImplemented
        return self.method == other.method and self.params == other.params

    def __hash__(self) -> int:
        return hash(self.identity())

    def _torchstain(self) -> NumpyMacenkoNormalizer | NumpyReinhardNormalizer:
        if self.method == "macenko":
            n = NumpyMacenkoNormalizer()
            n.HERef = np.asarray(self.params["stain_matrix"], dtype=np.float64).T  # 3 x 2
            n.maxCRef = np.asarray(self.params["max_concentrations"], dtype=np.float64)
            return n
        n = NumpyReinhardNormalizer()
        n.target_means = np.asarray(self.params["lab_mean"], dtype=np.float32)
        n.target_stds = np.asarray(self.params["lab_std"], dtype=np.float32)
        return n

    def normalize(self, image: Image.Image) -> tuple[Image.Image, str | None]:
        """(the normalised RGB image, None), or (the image unchanged in RGB, why) if unusable."""
        rgb = _rgb(image)
        reason = blank_reason(rgb)
        if reason is None:
            try:
                with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
                    if self.method == "macenko":
                        p = self.params
                        out, _, _ = self._torchstain().normalize(
                            rgb, Io=p["io"], alpha=p["alpha"], beta=p["beta"], stains=False
                        )
                    else:
                        out = self._torchstain().normalize(rgb)
                return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), "RGB"), None
            except _FAILURES as err:
                reason = f"torchstain {self.method} failed: {type(err).__name__}: {err}"
        return (image if image.mode == "RGB" else Image.fromarray(rgb, "RGB")), reason

    def __call__(self, image: Image.Image) -> Image.Image:
        """The normalised RGB image; an unusable one comes back unchanged, with a warning."""
        out, reason = self.normalize(image)
        if reason is not None:
            name = getattr(image, "filename", "") or "an image"
            log.warning(
                "stain normalisation skipped %s (passed through unchanged): %s", name, reason
            )
        return out


def _fit_one(method: str, rgb: np.ndarray, io: float, beta: float) -> dict[str, np.ndarray]:
    """torchstain's fit of one usable image; ValueError when the result is degenerate."""
    try:
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            if method == "macenko":
                n = NumpyMacenkoNormalizer()
                n.fit(rgb, Io=io, alpha=ALPHA, beta=beta)
                he, max_c = np.asarray(n.HERef, np.float64).T, np.asarray(n.maxCRef, np.float64)
            else:
                n = NumpyReinhardNormalizer()
                n.fit(rgb)
                mean = np.asarray(n.target_means, np.float64)
                std = np.asarray(n.target_stds, np.float64)
    except _FAILURES as err:
        raise ValueError(f"torchstain {method} fit failed: {type(err).__name__}: {err}") from err
    if method == "macenko":
        if not (np.isfinite(he).all() and np.isfinite(max_c).all()) or min(max_c) <= 0:
            raise ValueError(f"degenerate Macenko fit (stains {he.tolist()}, max {max_c.tolist()})")
        cos = abs(he[0] @ he[1]) / (np.linalg.norm(he[0]) * np.linalg.norm(he[1]))
        angle = float(np.degrees(np.arccos(min(1.0, cos))))
        if angle < MIN_STAIN_ANGLE:
            raise ValueError(
                f"one stain only: the fitted H and E vectors are {angle:.2f} degrees apart "
                f"(< {MIN_STAIN_ANGLE:g})"
            )
        return {"stain_matrix": he, "max_concentrations": max_c}
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or min(std) <= 0:
        raise ValueError(f"degenerate Reinhard fit (LAB mean {mean.tolist()}, std {std.tolist()})")
    return {"lab_mean": mean, "lab_std": std}


def fit_stain_normalizer(
    method: str,
    images: Sequence[Image.Image],
    names: Sequence[str] | None = None,
    *,
    io: float = IO,
    beta: float = BETA,
) -> StainNormalizer:
    """Fit a normaliser to one reference image, or to a reference estimated from several.

    Several images (data.stain_reference=train): each usable image is fitted on its own and the
    reference is the element-wise MEDIAN of their parameters (Macenko: stain vectors, then
    re-normalised to unit length, and max concentrations; Reinhard: LAB means and deviations).
    The median of per-image fits rather than one fit on a mosaic: an atypical tile (a fold, a
    bubble, a pale mucin field) cannot pull it, each image's tissue counts equally whatever its
    size, and memory stays that of one image. With one image it is that image's fit, exactly.

    The images must come from the TRAINING split only (the caller guarantees it): a reference
    taken from validation or test images would leak their colour into training.
    `names` (default: each image's filename, else "image <i>") label the images in messages and
    in `reference`. `io` and `beta` (Macenko only; ignored by Reinhard): torchstain's incident
    light and tissue OD threshold, stored in the parameters. Unusable images: see the module
    docstring (one image: ValueError).
    """
    if method not in METHODS:
        raise ValueError(f"stain normalisation method {method!r}: must be one of {list(METHODS)}")
    if not images:
        raise ValueError("fit_stain_normalizer: no reference images")
    if names is None:
        names = [getattr(im, "filename", "") or f"image {i}" for i, im in enumerate(images)]
    if len(names) != len(images):
        raise ValueError(f"fit_stain_normalizer: {len(names)} names for {len(images)} images")
    fits, used, skipped = [], [], []
    for image, name in zip(images, names, strict=True):
        rgb = _rgb(image)
        reason = blank_reason(rgb)
        if reason is None:
            try:
                fits.append(_fit_one(method, rgb, io, beta))
                used.append(str(name))
                continue
            except ValueError as err:
                reason = str(err)
        skipped.append((str(name), reason))
    if not fits:
        if len(images) == 1:
            problem = f"stain reference {skipped[0][0]}: {skipped[0][1]}"
        else:
            more = f"; ... ({len(skipped)} in all)" if len(skipped) > 5 else ""
            listing = "; ".join(f"{n}: {r}" for n, r in skipped[:5])
            problem = f"none of the {len(images)} stain reference images is usable: {listing}{more}"
        raise ValueError(
            f"{problem}. A {method} reference needs H&E-stained tissue: choose reference "
            "image(s) that show tissue, not background, a blank or a flat-colour tile"
        )
    if skipped:
        log.warning(
            "stain reference: %d of %d image(s) skipped as unusable, e.g. %s: %s",
            len(skipped),
            len(images),
            *skipped[0],
        )
    params: dict[str, Any] = {}
    for key in fits[0]:
        params[key] = np.median(np.stack([f[key] for f in fits]), axis=0)
    if method == "macenko":  # the median of unit vectors, back to unit length
        params["stain_matrix"] /= np.linalg.norm(params["stain_matrix"], axis=1, keepdims=True)
    params = {k: _round(v) for k, v in params.items()}
    if method == "macenko":
        params.update(io=float(io), alpha=ALPHA, beta=float(beta))
    return StainNormalizer(method, params, tuple(used))


def save_normalizer(normalizer: StainNormalizer, folder: str | Path) -> Path:
    """Write `normalizer.to_dict()` as NORMALIZER_FILE in `folder` (atomically); its path."""
    path = Path(folder) / NORMALIZER_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(normalizer.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path


def load_normalizer(folder: str | Path) -> StainNormalizer | None:
    """The normaliser saved in `folder` (NORMALIZER_FILE), or None when there is none."""
    path = Path(folder) / NORMALIZER_FILE
    if not path.is_file():
        return None
    try:
        return StainNormalizer.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a stain normaliser this code can use ({err})") from err
