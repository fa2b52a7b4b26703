"""H&E stain normalisation (Macenko or Reinhard) on tissue pixels, each result checked.

H&E colour differs by laboratory, staining batch and scanner. A `StainNormalizer` maps an image's
colours onto those of a reference:

- "macenko" (Macenko et al., ISBI 2009): the image's haematoxylin and eosin optical-density (OD)
  vectors are estimated from its tissue pixels, each pixel is unmixed into H and E concentrations,
  the concentrations are rescaled so their 99th percentiles match the reference's, and the pixel
  is recomposed with the reference's stain vectors. Structure is kept; only the stains change.
- "reinhard" (Reinhard et al., 2001): the mean and standard deviation of each CIE-LAB channel over
  the tissue pixels are matched to the reference's (fitted on its tissue pixels too). Cheaper and
  cruder: it moves every image's mean colour to the reference's.

Tissue. A pixel is tissue when its optical density -ln((RGB + 1) / IO) exceeds BETA (0.15,
Macenko's own threshold) in ANY channel: pale eosin-only stroma (dense in green only) is tissue,
blank glass is not. Only tissue pixels are fitted and changed; every other pixel is left exactly as
it is, in both methods (white glass stays white, not pinkish-grey).

The estimation is torchstain's (numpy backend, no torch): `NumpyMacenkoNormalizer.fit` on the
tissue pixels gives an image's stain vectors and 99th-percentile concentrations,
`NumpyReinhardNormalizer` fits and applies the LAB statistics. Macenko's recomposition is done
here (torchstain's formula: least-squares concentrations, rescaled, recomposed with the reference's
vectors), because torchstain keeps the image's own fitted vectors private and they are checked.

Each result is checked (`StainNormalizer.normalize`); where a check fails the image is kept as it
is (converted to RGB) and the reason returned, so that the caller counts and lists it (a run:
data_stats.json's stain_normalization and stain_fallbacks.csv; predict: a warning), and a bad fit
never becomes training data:
- both methods: the image's stains as Macenko estimates them are H&E's: the hue of each (of white
  light through it) lies within STAIN_HUE_TOLERANCE degrees of that of Ruifrok & Johnston's
  (2001) haematoxylin (blue-purple, about 246) or eosin (pink, about 303). Pale green-grey lumen
  fluid is above the OD threshold; where it dominates a field, Macenko takes it for haematoxylin
  (and Reinhard's statistics would recolour it as tissue): the image is kept;
- Macenko: the rescaling of each stain's concentrations stays within a factor of
  CONCENTRATION_SCALE either way;
- both: the tissue's mean saturation after is at least MIN_SATURATION_KEPT of what it was, and the
  tissue's mean colour after has an H&E hue: within HUE_TOLERANCE degrees of the arc from
  haematoxylin's hue to eosin's (the hues of Ruifrok's vectors seen in transmitted light).

Images with no usable stain. `blank_reason` calls an image unusable when it is (nearly) one
colour (every RGB channel's standard deviation under UNIFORM_STD grey levels: blank white, black,
a flat colour, plus sensor noise) or when fewer than max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION of
the pixels) are tissue. Neither method can estimate anything from such an image.
- Applying a normaliser (`normalize`, `__call__`): such an image, one that fails a check, or one on
  which torchstain fails (a singular matrix, a non-finite value) is passed through UNCHANGED
  (converted to RGB); `normalize` returns the reason, and `__call__` logs a warning. One bad tile
  must not stop the caching of a whole dataset.
- Fitting (`fit_stain_normalizer`): a single reference image that is unusable (blank, or stains
  that are not H&E's) raises ValueError naming the image and the problem. With
  several images (data.stain_reference=train) unusable ones are skipped with a warning; ValueError
  only when none is usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from breakhis_ft.data.records import ImageRecord

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")
# a run folder's (and an export's) fitted normaliser, `to_dict()` as JSON
NORMALIZER_FILE = "stain_normalizer.json"
STAIN_FALLBACKS = "stain_fallbacks.csv"  # a run folder's images kept as they were, with why
STAIN_VERSION = 2  # bump when this module's output for the same parameters changes
# Macenko settings (torchstain's defaults): incident light intensity, percentile of the extreme
# stain angles, and the optical density above which a channel counts as stained (tissue_mask)
IO, ALPHA, BETA = 240.0, 1.0, 0.15
# the stain directions are estimated from the tissue pixels whose OD is at least this in every
# channel: 0 leaves out only pixels brighter than IO in a channel (outside Beer-Lambert's range).
# Measured against the replica's known stains (82 slides): median error H 3.3, E 3.9 degrees;
# with 0.15 in every channel (torchstain's own cut) E's error is 18.9: pale eosin-only stroma,
# dense in green only, drops out and eosin is estimated from nuclei
FIT_MIN_OD = 0.0
MIN_TISSUE_FRACTION = 0.002  # share of tissue pixels below which an image is called blank
MIN_TISSUE_PIXELS = 100  # ... and the absolute minimum (Macenko's 1st/99th percentiles need some)
UNIFORM_STD = 6.0  # grey levels: an image whose every channel varies less is one flat colour
MIN_STAIN_ANGLE = 1.0  # degrees between fitted H and E vectors; below, the fit is degenerate
SIGNIFICANT_DIGITS = 8  # fitted parameters are rounded, so identity() is stable across machines
# Ruifrok & Johnston's (2001) optical-density vectors of haematoxylin and eosin (unit length)
RUIFROK = {
    stain: tuple(np.asarray(v) / np.linalg.norm(v))
    for stain, v in (("haematoxylin", (0.650, 0.704, 0.286)), ("eosin", (0.072, 0.990, 0.105)))
}
# Hue degrees a fitted stain may lie from Ruifrok's (the hue of white light through the stain:
# haematoxylin's blue-purple about 246, eosin's pink about 303). Measured on the replica's 82
# slides (stains drawn around Ruifrok's): fitted H hues 216-284, E 287-331; torchstain's default
# reference, from real slides: 268 and 339; an H vector pulled by pale green-grey lumen: 161-186.
STAIN_HUE_TOLERANCE = 45.0
CONCENTRATION_SCALE = 4.0  # Macenko may rescale a stain's concentrations by at most 4x either way
MIN_SATURATION_KEPT = 0.5  # the tissue's mean saturation after / before, at least
HUE_TOLERANCE = 45.0  # degrees the tissue's mean hue may lie outside haematoxylin-to-eosin's arc
_GATE = {  # part of identity(): which images pass through unchanged
    "io": IO,
    "beta": BETA,
    "fit_min_od": FIT_MIN_OD,
    "min_tissue_fraction": MIN_TISSUE_FRACTION,
    "min_tissue_pixels": MIN_TISSUE_PIXELS,
    "uniform_std": UNIFORM_STD,
    "stain_hue_tolerance": STAIN_HUE_TOLERANCE,
    "concentration_scale": CONCENTRATION_SCALE,
    "min_saturation_kept": MIN_SATURATION_KEPT,
    "hue_tolerance": HUE_TOLERANCE,
}
_FAILURES = (ArithmeticError, ValueError, IndexError, np.linalg.LinAlgError)


def _rgb(image: Image.Image) -> np.ndarray:
    """An image as an H x W x 3 uint8 array (converted to RGB if needed)."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def optical_density(rgb: np.ndarray, io: float = IO) -> np.ndarray:
    """-ln((RGB + 1) / io) per pixel and channel, float32 (Beer-Lambert, as torchstain)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / np.float32(io))


def tissue_mask(rgb: np.ndarray, beta: float = BETA, io: float = IO) -> np.ndarray:
    """Booleans over the pixels: optical density above `beta` in any channel."""
    return (optical_density(rgb, io) > beta).any(axis=-1)


def _hue(rgb: np.ndarray) -> float:
    """The HSV hue of one RGB colour, in degrees [0, 360)."""
    r, g, b = (float(x) for x in rgb)
    top, span = max(r, g, b), max(r, g, b) - min(r, g, b)
    if span <= 0:
        return 0.0
    if top == r:
        return (60.0 * (g - b) / span) % 360.0
    if top == g:
        return 60.0 * (b - r) / span + 120.0
    return 60.0 * (r - g) / span + 240.0


def _saturation(pixels: np.ndarray) -> float:
    """Mean HSV saturation of N x 3 uint8 pixels."""
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    top = np.maximum(np.maximum(r, g), b).astype(np.float32)
    span = top - np.minimum(np.minimum(r, g), b)
    return float(np.mean(span / np.maximum(top, np.float32(1))))


def stain_hue(vector: Sequence[float]) -> float:
    """The hue (degrees) of white light through a unit of a stain of this OD vector."""
    return _hue(np.exp(-np.asarray(vector, dtype=np.float64)))


def _hue_gap(hue: float, low: float, high: float) -> float:
    """Degrees from `hue` to the arc low..high (0 inside it)."""
    return 0.0 if low <= hue <= high else min((low - hue) % 360.0, (hue - high) % 360.0)


# the hues of Ruifrok's haematoxylin (blue-purple) and eosin (pink); H&E colours lie between
STAIN_HUES = {stain: stain_hue(vector) for stain, vector in RUIFROK.items()}


def stain_vector_problem(stain_matrix: np.ndarray) -> str | None:
    """Why fitted [H, E] vectors are not H&E's (a hue beyond STAIN_HUE_TOLERANCE), or None."""
    for vector, (stain, reference) in zip(stain_matrix, STAIN_HUES.items(), strict=True):
        hue = stain_hue(vector)
        off = _hue_gap(hue, reference, reference)
        if off > STAIN_HUE_TOLERANCE:
            return (
                f"the fitted {stain} vector {np.round(vector, 3).tolist()} has hue {hue:.0f} "
                f"degrees, {off:.0f} from Ruifrok's {reference:.0f} (tolerance "
                f"{STAIN_HUE_TOLERANCE:g})"
            )
    return None


def colour_problem(before: np.ndarray, after: np.ndarray) -> str | None:
    """Why normalised tissue pixels (N x 3, with the originals) look wrong, or None: saturation
    collapsed below MIN_SATURATION_KEPT of the original's, or a mean hue that H&E has not."""
    sat_before, sat_after = _saturation(before), _saturation(after)
    if sat_after < MIN_SATURATION_KEPT * sat_before:
        return (
            f"the tissue's mean saturation fell from {sat_before:.2f} to {sat_after:.2f} "
            f"(below {MIN_SATURATION_KEPT:g} of it)"
        )
    hue = _hue(after.reshape(-1, 3).mean(axis=0))
    low, high = STAIN_HUES["haematoxylin"], STAIN_HUES["eosin"]
    off = _hue_gap(hue, low, high)
    if off > HUE_TOLERANCE:
        return (
            f"the tissue's mean colour has hue {hue:.0f} degrees, {off:.0f} outside H&E's "
            f"{low:.0f}-{high:.0f} (tolerance {HUE_TOLERANCE:g})"
        )
    return None


def blank_reason(rgb: np.ndarray, mask: np.ndarray | None = None) -> str | None:
    """Why an H x W x 3 uint8 image has no stain to estimate, or None when it has (`mask`: its
    tissue_mask, when already computed)."""
    std = rgb.reshape(-1, 3).std(axis=0, dtype=np.float32)
    if std.max() < UNIFORM_STD:
        mean = np.round(rgb.reshape(-1, 3).mean(axis=0)).astype(int).tolist()
        return f"one flat colour (mean RGB {mean}, channel std < {UNIFORM_STD:g} grey levels)"
    tissue = int((tissue_mask(rgb) if mask is None else mask).sum())
    needed = max(MIN_TISSUE_PIXELS, int(np.ceil(MIN_TISSUE_FRACTION * rgb.shape[0] * rgb.shape[1])))
    if tissue < needed:
        return (
            f"too little tissue ({tissue} of {rgb.shape[0] * rgb.shape[1]} pixels have optical "
            f"density above {BETA:g} in a channel; at least {needed} needed)"
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
      settings they were fitted and are applied with: io and alpha (torchstain's), beta (the
      tissue mask's OD threshold);
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

    def tissue(self, rgb: np.ndarray) -> np.ndarray:
        """The tissue mask this normaliser changes (Macenko: its own io and beta)."""
        return tissue_mask(rgb, self.params.get("beta", BETA), self.params.get("io", IO))

    def _apply(self, rgb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(the normalised H x W x 3 array, None), or (None, the check that failed)."""
        p = self.params
        io, alpha = p.get("io", IO), p.get("alpha", ALPHA)
        tissue = rgb[mask]
        # both methods: the image's own stains must be H&E's (Reinhard's statistics of a field
        # that is mostly lumen fluid would recolour the fluid as tissue)
        he, max_c = _macenko_fit(tissue, io, alpha)
        if problem := stain_vector_problem(he):
            return None, problem
        if self.method == "macenko":
            if problem := _scale_problem(max_c, p):
                return None, problem
            od = optical_density(tissue, p["io"]).astype(np.float64)
            conc = np.linalg.pinv(he.T) @ od.T  # 2 x N: least squares, as torchstain unmixes
            conc *= (np.asarray(p["max_concentrations"]) / max_c)[:, None]
            out = p["io"] * np.exp(-np.asarray(p["stain_matrix"]).T @ conc)  # 3 x N
            new = np.minimum(out.T, 255).astype(np.uint8)  # truncated, as torchstain does
        else:
            n = NumpyReinhardNormalizer()
            n.target_means = np.asarray(self.params["lab_mean"], dtype=np.float32)
            n.target_stds = np.asarray(self.params["lab_std"], dtype=np.float32)
            new = n.normalize(tissue[:, None, :])[:, 0, :]
        if problem := colour_problem(tissue, new):
            return None, problem
        out = rgb.copy()
        out[mask] = new
        return out, None

    def normalize(self, image: Image.Image) -> tuple[Image.Image, str | None]:
        """(the normalised RGB image, None), or (the image unchanged in RGB, why): no stain to
        estimate, a failed check (prefixed "stain check:") or a torchstain failure."""
        rgb = _rgb(image)
        mask = self.tissue(rgb)
        reason = blank_reason(rgb, mask)
        if reason is None:
            try:
                with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
                    out, problem = self._apply(rgb, mask)
                if out is not None:
                    return Image.fromarray(np.ascontiguousarray(out), "RGB"), None
                reason = f"stain check: {problem}"
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


def _macenko_fit(tissue: np.ndarray, io: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """torchstain's Macenko estimate from N x 3 tissue pixels: [H, E] unit OD vectors (2 x 3),
    from those with OD >= FIT_MIN_OD in every channel, and the 99th percentiles of all their
    concentrations."""
    n = NumpyMacenkoNormalizer()
    n.fit(tissue[:, None, :], Io=io, alpha=alpha, beta=FIT_MIN_OD)
    return np.asarray(n.HERef, np.float64).T, np.asarray(n.maxCRef, np.float64)


def macenko_estimate(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An H x W x 3 image's stains as Macenko normalisation estimates them from its tissue:
    ([H, E] unit OD vectors, 2 x 3; the 99th percentiles of their concentrations)."""
    return _macenko_fit(rgb[tissue_mask(rgb)], IO, ALPHA)


def _scale_problem(max_c: np.ndarray, params: Mapping[str, Any]) -> str | None:
    """Why Macenko's rescaling of an image's concentrations is not sane, or None."""
    if not np.isfinite(max_c).all() or min(max_c) <= 0:
        return f"the image's stain concentrations are degenerate (99th percentiles {max_c})"
    scale = np.asarray(params["max_concentrations"]) / max_c
    for stain, factor in zip(RUIFROK, scale, strict=True):
        if not 1 / CONCENTRATION_SCALE <= factor <= CONCENTRATION_SCALE:
            return (
                f"{stain} concentrations would be scaled by {factor:.2f} (limit "
                f"{CONCENTRATION_SCALE:g}x either way)"
            )
    return None


def _fit_one(method: str, rgb: np.ndarray, io: float, beta: float) -> dict[str, np.ndarray]:
    """torchstain's fit of one usable image's tissue; ValueError when the result is degenerate or
    the image's stains (Macenko's estimate, for either method) are not H&E's."""
    io, beta = (io, beta) if method == "macenko" else (IO, BETA)
    tissue = rgb[tissue_mask(rgb, beta, io)]
    try:
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            he, max_c = _macenko_fit(tissue, io, ALPHA)
            if method == "reinhard":
                n = NumpyReinhardNormalizer()
                n.fit(tissue[:, None, :])
                mean = np.asarray(n.target_means, np.float64)
                std = np.asarray(n.target_stds, np.float64)
    except _FAILURES as err:
        raise ValueError(f"torchstain {method} fit failed: {type(err).__name__}: {err}") from err
    if not (np.isfinite(he).all() and np.isfinite(max_c).all()) or min(max_c) <= 0:
        raise ValueError(f"degenerate Macenko fit (stains {he.tolist()}, max {max_c.tolist()})")
    cos = abs(he[0] @ he[1]) / (np.linalg.norm(he[0]) * np.linalg.norm(he[1]))
    angle = float(np.degrees(np.arccos(min(1.0, cos))))
    if angle < MIN_STAIN_ANGLE:
        raise ValueError(
            f"one stain only: the fitted H and E vectors are {angle:.2f} degrees apart "
            f"(< {MIN_STAIN_ANGLE:g})"
        )
    if problem := stain_vector_problem(he):
        raise ValueError(f"not H&E: {problem}")
    if method == "macenko":
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
    in `reference`. `io` and `beta` (Macenko only; Reinhard uses IO and BETA): the incident light
    and the tissue mask's OD threshold, stored in the parameters. Unusable images: see the module
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


def reference_records(records: Sequence[ImageRecord], n: int) -> list[ImageRecord]:
    """Up to `n` records to fit a reference on: round robin over the slide folders, so each
    folder's stain counts; folders and their images in a fixed pseudo-random order (a hash of the
    name), the same on every machine."""

    def order(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    by_folder: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: order(r.path)):
        by_folder[record.patient].append(record)
    queues = [by_folder[p] for p in sorted(by_folder, key=order)]
    chosen = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
    return chosen[:n]


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
