"""Stain normalisation on what real H&E fields have and the replica's styles do not (issue 27):
the optical-density tissue mask, background left exactly as it is, each result checked (stain
hues, concentration scaling, saturation, hue) with the image kept and listed where a check fails,
in training's cache, the run folder and prediction alike.

The hard fields are the renderer's (synthetic.HARD_FIELDS): a pale green-grey lumen (RGB about
193-206 over 60% of the field) and a mucinous field that is 82% empty glass with a few cells.
"""

from __future__ import annotations

import colorsys
import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image

from breakhis_ft.data import stain
from breakhis_ft.data.dataset import build_image_cache, resize_longest
from breakhis_ft.data.stain import StainNormalizer, fit_stain_normalizer
from breakhis_ft.data.synthetic import HARD_FIELDS, STYLE, _rng, patient_stain, render_batch
from breakhis_ft.deploy.predict import ImageFiles
from breakhis_ft.run.setup import _record_stain

SIZE = (256, 170)
PATIENTS = ("22549AB", "10926", "16184")  # three stains: the reference's and two far from it


def render(style: dict, patient: str, seed: int = 1) -> np.ndarray:
    """One H x W x 3 replica-style image of a patient's stain."""
    return render_batch(style, patient_stain(0, patient), 100, SIZE, 1, _rng(seed, "checks"))[0]


@pytest.fixture(scope="module")
def fitted() -> dict[str, StainNormalizer]:
    reference = Image.fromarray(render(STYLE["ductal_carcinoma"], "22549AB", seed=2))
    return {m: fit_stain_normalizer(m, [reference], ["reference.png"]) for m in stain.METHODS}


def saturation(pixels: np.ndarray) -> float:
    """Mean HSV saturation of N x 3 pixels."""
    pixels = pixels.astype(float)
    return float(np.mean((pixels.max(1) - pixels.min(1)) / np.maximum(pixels.max(1), 1)))


def lumen_pixels(rgb: np.ndarray) -> np.ndarray:
    """The green-grey fluid's pixels: grey levels 185-215, green not below red or blue - 6."""
    rgb = rgb.astype(int)
    pale = (rgb.min(-1) >= 185) & (rgb.max(-1) <= 215)
    return pale & (rgb[..., 1] >= rgb[..., 0] - 6) & (rgb[..., 1] >= rgb[..., 2] - 6)


def test_tissue_is_optical_density_above_beta_in_any_channel():
    pixels = np.array(
        [
            [240, 188, 236],  # pale eosin-only stroma: dense in green only
            [120, 60, 170],  # a nucleus
            [250, 246, 248],  # glass
            [236, 236, 236],  # pale grey glass: OD 0.02
        ],
        np.uint8,
    )[None]
    assert stain.BETA == 0.15  # Macenko's own threshold
    assert stain.tissue_mask(pixels)[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("method", stain.METHODS)
def test_background_pixels_are_left_exactly_as_they_are(method, fitted):
    """A mostly white field (82% glass): every non-tissue pixel comes back unchanged, and the
    tissue is normalised (not the whole image passed through)."""
    for patient in PATIENTS:
        rgb = render(HARD_FIELDS["mostly_white_mucinous"], patient)
        background = ~stain.tissue_mask(rgb)
        assert background.mean() > 0.75
        out, reason = fitted[method].normalize(Image.fromarray(rgb))
        out = np.asarray(out)
        assert reason is None, (patient, reason)
        assert np.array_equal(out[background], rgb[background]), (method, patient)
        assert not np.array_equal(out[~background], rgb[~background])


@pytest.mark.parametrize("method", stain.METHODS)
def test_mucinous_cells_keep_their_colour(method, fitted):
    """The few cells of a mostly white mucinous field stay coloured (saturation at least 0.8 of
    theirs, an H&E hue); measured saturation ratios 0.9-1.8."""
    for patient in PATIENTS:
        rgb = render(HARD_FIELDS["mostly_white_mucinous"], patient)
        cells = rgb.min(-1) < 170
        assert cells.sum() > 200
        out, reason = fitted[method].normalize(Image.fromarray(rgb))
        out = np.asarray(out)
        if reason is not None:  # or the image falls back as it is
            assert reason.startswith("stain check:") and np.array_equal(out, rgb)
            continue
        kept = saturation(out[cells]) / saturation(rgb[cells])
        assert kept > 0.8, (method, patient, kept)
        hue = 360 * colorsys.rgb_to_hsv(*(out[cells].mean(0) / 255))[0]
        assert 216 < hue < 333, (method, patient, hue)  # blue-purple to pink: H&E's hues


@pytest.mark.parametrize("method", stain.METHODS)
def test_green_grey_lumen_falls_back_instead_of_being_recoloured(method, fitted):
    """The lumen's fluid is above the OD threshold (tissue), and Macenko takes its grey-green for
    haematoxylin (fitted H hue 161-186, Ruifrok's 246): the check refuses the fit and the image is
    kept as it is, lumen included. Reinhard is held to the same check of the image's own stains
    (it would recolour the fluid as tissue: magenta, 26 grey levels darker, where unchecked)."""
    for patient in PATIENTS:
        rgb = render(HARD_FIELDS["green_grey_lumen"], patient)
        assert lumen_pixels(rgb).mean() > 0.5
        out, reason = fitted[method].normalize(Image.fromarray(rgb))
        assert reason is not None and reason.startswith("stain check: the fitted haematoxylin")
        assert np.array_equal(np.asarray(out), rgb), (method, patient)
        assert stain.tissue_mask(rgb).mean() > 0.95  # the fluid is tissue to the mask


def test_a_fit_outside_the_checks_is_kept_and_says_why(fitted):
    image = Image.fromarray(render(STYLE["adenosis"], "16184"))
    assert fitted["macenko"].normalize(image)[1] is None
    he = np.asarray(fitted["macenko"].params["stain_matrix"])
    assert stain.stain_vector_problem(he) is None
    grey_green = np.array([[0.78, 0.43, 0.45], he[1]])
    assert "haematoxylin vector" in stain.stain_vector_problem(grey_green)
    # a reference whose concentrations are 10x the image's: a rescaling beyond 4x
    heavy = {**fitted["macenko"].params}
    heavy["max_concentrations"] = [10 * c for c in heavy["max_concentrations"]]
    out, reason = StainNormalizer("macenko", heavy).normalize(image)
    assert reason.startswith("stain check: haematoxylin concentrations would be scaled by")
    assert out is image
    # Reinhard to a grey reference: the tissue's saturation collapses
    grey = StainNormalizer("reinhard", {"lab_mean": [70, 0, 0], "lab_std": [10, 0.5, 0.5]})
    out, reason = grey.normalize(image)
    assert reason.startswith("stain check: the tissue's mean saturation fell")
    # Reinhard to an olive reference (a red field's fate in issue 27): no H&E hue
    olive = StainNormalizer("reinhard", {"lab_mean": [60, -8, 40], "lab_std": [10, 4, 6]})
    out, reason = olive.normalize(image)
    assert reason.startswith("stain check: the tissue's mean colour has hue"), reason
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_a_reference_whose_stains_are_not_h_and_e_is_refused():
    lumen = Image.fromarray(render(HARD_FIELDS["green_grey_lumen"], "10926"))
    with pytest.raises(ValueError, match="lumen.png: not H&E: the fitted haematoxylin vector"):
        fit_stain_normalizer("macenko", [lumen], ["lumen.png"])


@pytest.fixture
def hard_tree(tmp_path):
    """Three images as files: a plain field, the lumen field and the mostly white one."""
    paths = []
    for name, style in (("plain", STYLE["adenosis"]), *HARD_FIELDS.items()):
        path = tmp_path / "data" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(style, "10926")).save(path)
        paths.append(path)
    return paths


def test_the_run_folder_counts_and_lists_the_fallbacks(hard_tree, fitted, tmp_path, caplog):
    from breakhis_ft.data.records import ImageRecord

    root = hard_tree[0].parent
    records = [ImageRecord(p.name, "benign", "adenosis", "1", "1", 100, 1) for p in hard_tree]
    cache = build_image_cache(
        records, root, 64, tmp_path / "cache", progress=False, stain=fitted["macenko"]
    )
    passed = dict(cache.passed_through)
    assert list(passed) == ["green_grey_lumen.png"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data_stats.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.run.setup"):
        _record_stain(cache, fitted["macenko"], run_dir)
    stats = json.loads((run_dir / "data_stats.json").read_text())["stain_normalization"]
    assert (stats["passed_through"], stats["failed_check"], stats["no_stain"]) == (1, 1, 0)
    assert stats["fallbacks_file"] == "stain_fallbacks.csv"
    rows = list(csv.reader((run_dir / "stain_fallbacks.csv").read_text().splitlines()[1:]))
    assert rows[0] == ["path", "reason"] and rows[1][0] == "green_grey_lumen.png"
    assert rows[1][1].startswith("stain check: the fitted haematoxylin vector")
    assert "1 failed a check" in caplog.text and "stain_fallbacks.csv" in caplog.text


def test_prediction_applies_the_same_rule(hard_tree, fitted, caplog):
    files = ImageFiles(hard_tree, 64, fitted["macenko"])
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.deploy.predict"):
        items = [files[i] for i in range(len(hard_tree))]
    for path, item in zip(hard_tree, items, strict=True):
        plain = np.asarray(resize_longest(Image.open(path).convert("RGB"), 64))
        kept = np.array_equal(np.asarray(item["image"]), plain)
        assert kept == (path.name == "green_grey_lumen.png"), path.name
    assert "green_grey_lumen.png unchanged: stain check:" in caplog.text


def test_the_default_replica_is_drawn_as_before():
    """The hard fields are options: the replica's own styles render the same pixels as on main
    (a hash of renders at three sizes, taken from main's renderer)."""
    import hashlib

    digest = hashlib.sha256()
    for subtype, style in STYLE.items():
        for size in ((48, 32), (175, 115), (390, 256)):  # the three ways of drawing
            rgb = render_batch(style, patient_stain(0, subtype), 100, size, 2, _rng(3, subtype))
            digest.update(rgb.tobytes())
    assert digest.hexdigest()[:16] == "077ceb6649c9b2d4"
