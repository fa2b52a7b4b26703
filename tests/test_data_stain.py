"""Stain normalisation (data/stain.py): fidelity on the reference, stain alignment across patients,
blank images, the multi-image reference, serialisation and identity.

Images come from the synthetic replica's renderer: same subtype and magnification, patients with
different stains (`patient_stain`), so the only systematic difference between them is the stain.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from breakhis_ft.data import stain
from breakhis_ft.data.stain import StainNormalizer, fit_stain_normalizer
from breakhis_ft.data.synthetic import STYLE, _rng, patient_stain, render_batch

SIZE = (256, 170)
SUBTYPE = "ductal_carcinoma"
REFERENCE_PATIENT = "22549AB"
SHIFTED_PATIENTS = ("10926", "16184")  # stains far from the reference's (checked below)
# Normalising the reference itself: mean |difference| over its tissue pixels, in grey levels.
# Measured: macenko 2.8 (99th percentile 15: unmixing projects each pixel's OD onto the H-E plane,
# dropping what is outside it, e.g. the background tint), reinhard 0.4 (LAB round trip; both
# truncate to uint8).
ROUND_TRIP_TOLERANCE = {"macenko": 4.0, "reinhard": 1.0}
FACTOR = 3.0  # distance to the reference after normalisation < before / FACTOR


def render(patient: str, seed: int, n: int = 1) -> list[Image.Image]:
    """n replica images of one patient (its stain); `seed` draws the structure."""
    rgb = render_batch(
        STYLE[SUBTYPE], patient_stain(0, patient), 100, SIZE, n, _rng(seed, "stain-test")
    )
    return [Image.fromarray(a) for a in rgb]


def od(image: Image.Image) -> np.ndarray:
    """Optical density per pixel and channel, H x W x 3."""
    return -np.log((np.asarray(image, dtype=np.float64) + 1.0) / 256.0)


def mean_od(image: Image.Image) -> np.ndarray:
    """Mean optical density per RGB channel over the image."""
    return od(image).reshape(-1, 3).mean(axis=0)


def tissue_od(image: Image.Image) -> np.ndarray:
    """Mean optical density per RGB channel over the image's tissue pixels."""
    return od(image)[stain.tissue_mask(np.asarray(image))].mean(axis=0)


def stain_vectors(image: Image.Image) -> np.ndarray:
    """The Macenko estimate of the image's H and E vectors (2 x 3), from its tissue."""
    return stain.macenko_estimate(np.asarray(image))[0]


def max_concentrations(image: Image.Image) -> np.ndarray:
    """The Macenko estimate of the 99th percentiles of the image's H and E concentrations."""
    return stain.macenko_estimate(np.asarray(image))[1]


@pytest.fixture(scope="module")
def reference() -> Image.Image:
    return render(REFERENCE_PATIENT, 1)[0]


@pytest.fixture(scope="module")
def shifted() -> list[Image.Image]:
    return [render(p, 2)[0] for p in SHIFTED_PATIENTS]


@pytest.fixture(scope="module")
def fitted(reference) -> dict[str, StainNormalizer]:
    return {m: fit_stain_normalizer(m, [reference], ["reference.png"]) for m in stain.METHODS}


@pytest.mark.parametrize("method", stain.METHODS)
def test_normalising_the_reference_gives_it_back(method, reference, fitted):
    out = fitted[method](reference)
    assert out.mode == "RGB" and out.size == reference.size
    rgb = np.asarray(reference)
    tissue = stain.tissue_mask(rgb)
    assert tissue.mean() > 0.3  # the comparison is over a real share of the image
    diff = np.abs(np.asarray(out, dtype=np.float64) - rgb)[tissue].mean()
    assert diff < ROUND_TRIP_TOLERANCE[method], f"{method}: {diff:.2f} grey levels"


def test_macenko_moves_the_stains_of_another_patient_to_the_reference(reference, shifted, fitted):
    """Macenko replaces the stain vectors and rescales the concentrations: re-estimated on its
    output, the stain vectors are the reference's, and so are the 99th percentiles of the H and E
    concentrations (what Macenko matches). Measured (before -> after): stain vectors 0.51 -> 0.08
    and 0.35 -> 0.04; concentrations' largest relative gap 0.42 -> 0.12 and 0.23 -> 0.05. Not the
    tissue's mean optical density: Macenko keeps each image's amount of stain (how many nuclei),
    so images whose content differs keep differing there.
    """
    ref_he, ref_c = stain_vectors(reference), max_concentrations(reference)
    for patient, image in zip(SHIFTED_PATIENTS, shifted, strict=True):
        out = fitted["macenko"](image)
        before = np.abs(stain_vectors(image) - ref_he).sum()
        after = np.abs(stain_vectors(out) - ref_he).sum()
        assert before > 0.3, f"patient {patient}: stains too close to the reference for a test"
        assert after < before / FACTOR, f"patient {patient}: {before:.3f} -> {after:.3f}"
        before = np.abs(max_concentrations(image) / ref_c - 1).max()
        after = np.abs(max_concentrations(out) / ref_c - 1).max()
        assert after < min(0.15, before / 2), f"patient {patient}: {before:.3f} -> {after:.3f}"


def test_reinhard_moves_the_mean_optical_density_of_another_patient_to_the_reference(
    reference, shifted, fitted
):
    """Reinhard matches LAB statistics: the mean OD per channel comes to the reference's.
    Measured (before -> after): 0.34 -> 0.035 and 0.57 -> 0.059.
    """
    ref_od = mean_od(reference)
    for patient, image in zip(SHIFTED_PATIENTS, shifted, strict=True):
        before = np.abs(mean_od(image) - ref_od).sum()
        after = np.abs(mean_od(fitted["reinhard"](image)) - ref_od).sum()
        assert before > 0.3, f"patient {patient}: stains too close to the reference for a test"
        assert after < before / FACTOR, f"patient {patient}: {before:.3f} -> {after:.3f}"


def _blanks() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    h, w = SIZE[1], SIZE[0]
    noisy = np.clip(rng.normal((200, 120, 190), 3.0, (h, w, 3)), 0, 255).astype(np.uint8)
    speck = np.full((h, w, 3), 250, np.uint8)
    speck[:9, :9] = (90, 40, 120)  # 81 tissue pixels: below MIN_TISSUE_PIXELS
    return {
        "white": Image.new("RGB", (w, h), (255, 255, 255)),
        "flat purple": Image.new("RGB", (w, h), (150, 80, 160)),
        "noisy flat pink": Image.fromarray(noisy),
        "white with a speck": Image.fromarray(speck),
    }


@pytest.mark.parametrize("method", stain.METHODS)
def test_blank_and_uniform_images_pass_through_unchanged(method, fitted, caplog):
    for name, image in _blanks().items():
        out, reason = fitted[method].normalize(image)
        assert np.array_equal(np.asarray(out), np.asarray(image)), name
        assert reason and ("flat colour" in reason or "too little tissue" in reason), reason
        with caplog.at_level(logging.WARNING, logger="breakhis_ft.data.stain"):
            caplog.clear()
            assert np.array_equal(np.asarray(fitted[method](image)), np.asarray(image))
        assert "passed through unchanged" in caplog.text


@pytest.mark.parametrize("method", stain.METHODS)
def test_a_torchstain_failure_passes_the_image_through(method, fitted, shifted, monkeypatch):
    def fail(self, *args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    # what each method calls on the image: Macenko's estimate, Reinhard's transfer
    cls, name = {
        "macenko": (NumpyMacenkoNormalizer, "fit"),
        "reinhard": (NumpyReinhardNormalizer, "normalize"),
    }[method]
    monkeypatch.setattr(cls, name, fail)
    out, reason = fitted[method].normalize(shifted[0])
    assert out is shifted[0]
    assert reason == f"torchstain {method} failed: LinAlgError: Singular matrix"


@pytest.mark.parametrize("method", stain.METHODS)
def test_a_blank_reference_raises_naming_the_image_and_the_problem(method):
    for name, image in _blanks().items():
        with pytest.raises(ValueError, match="no tissue|flat colour|too little tissue") as err:
            fit_stain_normalizer(method, [image], [f"{name}.png"])
        assert f"stain reference {name}.png: " in str(err.value)
        assert "choose reference image(s) that show tissue" in str(err.value)


def test_a_single_stain_reference_is_refused_by_macenko():
    """Tissue of one flat colour on white: Macenko finds one stain direction, not two."""
    rgb = np.full((SIZE[1], SIZE[0], 3), 255, np.uint8)
    rgb[:, : SIZE[0] // 2] = (150, 80, 160)
    with pytest.raises(ValueError, match="one stain only"):
        fit_stain_normalizer("macenko", [Image.fromarray(rgb)], ["half.png"])


@pytest.mark.parametrize("method", stain.METHODS)
def test_a_reference_from_several_images_is_the_median_and_skips_blanks(method, caplog):
    images = render(REFERENCE_PATIENT, 3, n=3) + render(SHIFTED_PATIENTS[0], 3)
    singles = [fit_stain_normalizer(method, [im]).params for im in images]
    several = fit_stain_normalizer(method, images)
    for key, value in several.params.items():
        stacked = np.array([p[key] for p in singles], dtype=np.float64)
        if key == "stain_matrix":  # the median of unit vectors, re-normalised
            median = np.median(stacked, axis=0)
            expected = median / np.linalg.norm(median, axis=1, keepdims=True)
        else:
            expected = np.median(stacked, axis=0)
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=key)
    assert several.reference == ("image 0", "image 1", "image 2", "image 3")

    blanks = list(_blanks().values())
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.data.stain"):
        with_blanks = fit_stain_normalizer(method, blanks[:2] + images)
    assert with_blanks == several and with_blanks.identity() == several.identity()
    assert "2 of 6 image(s) skipped" in caplog.text
    with pytest.raises(ValueError, match="none of the 4 stain reference images is usable"):
        fit_stain_normalizer(method, blanks)


@pytest.mark.parametrize("method", stain.METHODS)
def test_to_dict_from_dict_round_trip_reproduces_the_output(method, fitted, shifted):
    original = fitted[method]
    loaded = StainNormalizer.from_dict(json.loads(json.dumps(original.to_dict())))
    assert loaded == original and loaded.identity() == original.identity()
    assert loaded.reference == ("reference.png",)
    assert np.array_equal(np.asarray(loaded(shifted[0])), np.asarray(original(shifted[0])))
    stale = {**original.to_dict(), "version": stain.STAIN_VERSION + 1}
    with pytest.raises(ValueError, match="refit it"):
        StainNormalizer.from_dict(stale)


def test_identity_differs_by_method_and_reference(fitted, shifted):
    other = {m: fit_stain_normalizer(m, [shifted[0]]) for m in stain.METHODS}
    ids = {fitted[m].identity() for m in stain.METHODS} | {o.identity() for o in other.values()}
    assert len(ids) == 4
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    # the reference's names are provenance, not part of the identity
    renamed = StainNormalizer("reinhard", fitted["reinhard"].params, ("elsewhere.png",))
    assert renamed.identity() == fitted["reinhard"].identity()


def test_identity_is_stable_across_processes_and_versions():
    """A fixed normaliser's identity: if this changes, every stain-normalised cache is rebuilt."""
    n = StainNormalizer("reinhard", {"lab_mean": [60, 20, -10], "lab_std": [15, 8, 6]})
    assert n.identity() == "363679a6b24ecfb5"


def test_invalid_parameters_and_methods_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        StainNormalizer("vahadane", {})
    with pytest.raises(ValueError, match="expected exactly"):
        StainNormalizer("reinhard", {"lab_mean": [60, 20, -10]})
    with pytest.raises(ValueError, match="finite numbers"):
        StainNormalizer("reinhard", {"lab_mean": [60, 20], "lab_std": [15, 8, 6]})
    with pytest.raises(ValueError, match="must be > 0"):
        StainNormalizer("reinhard", {"lab_mean": [60, 20, -10], "lab_std": [15, 0, 6]})
    with pytest.raises(ValueError, match="must be one of"):
        fit_stain_normalizer("vahadane", [Image.new("RGB", (4, 4))])


def test_non_rgb_images_come_back_rgb(fitted, shifted):
    rgba = shifted[0].convert("RGBA")
    out = fitted["macenko"](rgba)
    assert out.mode == "RGB" and out.size == rgba.size
    blank = Image.new("L", (32, 32), 255)
    out, reason = fitted["macenko"].normalize(blank)
    assert reason and out.mode == "RGB" and np.asarray(out).min() == 255
