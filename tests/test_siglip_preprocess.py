"""SigLIP preprocessing modes: pad (the project's), stretch, eva's shorter side + centre crop."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from breakhis_ft.models.siglip_loading import SiglipPreprocessor, shorter_side_crop


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _processor(side: int = 448) -> SimpleNamespace:
    return SimpleNamespace(size={"height": side, "width": side}, image_mean=[0.5, 0.5, 0.5])


def test_shorter_side_crop_is_eva_s_resize_and_centre_crop() -> None:
    image = _image(700, 460)
    out = SiglipPreprocessor(_processor(448), "shorter_side_crop").square(image)
    assert out.size == (448, 448)
    # by hand: 700x460 -> 682x448 (shorter side 448), then the centred 448 columns
    resized = image.resize((682, 448), Image.Resampling.BILINEAR)
    left = (682 - 448) // 2
    assert np.array_equal(np.asarray(out), np.asarray(resized)[:, left : left + 448])
    tall = shorter_side_crop(_image(40, 90), 32)
    assert tall.size == (32, 32)


def test_pad_and_stretch_are_kept() -> None:
    image = _image(70, 46)
    padded = SiglipPreprocessor(_processor(), "pad").square(image)
    assert padded.size == (70, 70)
    assert padded.getpixel((0, 0)) == (128, 128, 128)  # the processor's mean colour
    assert SiglipPreprocessor(_processor(), "stretch").square(image).size == (70, 46)


def test_bad_mode_and_non_square_input_are_errors() -> None:
    with pytest.raises(ValueError, match="model.resize"):
        SiglipPreprocessor(_processor(), "crop")
    wide = SimpleNamespace(size={"height": 448, "width": 512}, image_mean=None)
    with pytest.raises(ValueError, match="square input size"):
        SiglipPreprocessor(wide, "shorter_side_crop")
