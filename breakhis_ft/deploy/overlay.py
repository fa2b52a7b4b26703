"""Pictures of an explanation: the heatmap over the image, a caption with a colour scale, the PNG
and its JSON. A map without evidence (`Explanation.evidence` False) is not drawn: the caption says
so, where a uniform map would read as the strongest evidence everywhere."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from breakhis_ft.deploy.explain import NO_EVIDENCE, Explanation


def heatmap(explanation: Explanation, size: tuple[int, int]) -> np.ndarray:
    """The map over an image of `size` (width, height): bilinear, in [0, 1] (1 at the maximum);
    all 0 for a map without evidence."""
    width, height = size
    if not explanation.evidence:
        return np.zeros((height, width))
    left, top, right, bottom = explanation.box
    # upsample over the whole square input, then cut out the image's part of it
    canvas_w = max(1, round(width / (right - left)))
    canvas_h = max(1, round(height / (bottom - top)))
    grid = Image.fromarray(explanation.grid.astype(np.float32), mode="F")
    full = np.asarray(grid.resize((canvas_w, canvas_h), Image.Resampling.BILINEAR))
    x0, y0 = round(left * canvas_w), round(top * canvas_h)
    heat = full[y0 : y0 + height, x0 : x0 + width]
    peak = float(heat.max()) if heat.size else 0.0
    return np.clip(heat / peak, 0, 1) if peak > 0 else np.zeros_like(heat)


OVERLAY_ALPHA = 0.6  # how much of the map's colour the overlay blends in at the strongest cell
# blue -> green -> yellow: stands out on H&E's pinks and purples (a red ramp vanishes on eosin)
RAMP = np.array([[0.15, 0.35, 1.0], [0.1, 0.85, 0.35], [1.0, 0.95, 0.0]])


def _colour(heat: np.ndarray) -> np.ndarray:
    """RAMP's colour for heat in [0, 1], (H, W, 3) in [0, 1]."""
    position = heat * (len(RAMP) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(RAMP) - 2)
    frac = (position - low)[..., None]
    return RAMP[low] * (1 - frac) + RAMP[low + 1] * frac


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def caption(
    explanation: Explanation, class_names: Sequence[str], true_class: int | None = None
) -> list[str]:
    """The overlay's text lines: prediction and probability, true class, the class mapped."""
    pred = explanation.predicted
    lines = [f"pred: {class_names[pred]} ({explanation.probs[pred]:.2f})"]
    if true_class is not None:
        mark = "correct" if true_class == pred else "wrong"
        lines.append(f"true: {class_names[true_class]} ({mark})")
    if explanation.target != pred:
        target = explanation.target
        lines.append(f"map for: {class_names[target]} ({explanation.probs[target]:.2f})")
    if not explanation.evidence:
        lines.append(NO_EVIDENCE.format(target=class_names[explanation.target]))
    return lines


def _colour_scale(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], font: Any) -> None:
    """The map's colour scale in `box` (left, top, right, bottom): the ramp from no evidence to
    the image's strongest, as the blend draws it over white, labelled at both ends."""
    left, top, right, bottom = box
    for x in range(left, right):
        heat = (x - left) / max(1, right - left - 1)
        weight = OVERLAY_ALPHA * np.sqrt(heat)
        rgb = (1 - weight) + _colour(np.array(heat)) * weight
        draw.line([(x, top), (x, bottom)], tuple(int(round(c * 255)) for c in rgb))
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, bottom + 2), "none", (0, 0, 0), font)
    draw.text((right, bottom + 2), "strongest", (0, 0, 0), font, anchor="ra")


def overlay(
    image: Image.Image,
    explanation: Explanation,
    class_names: Sequence[str],
    true_class: int | None = None,
    alpha: float | None = None,
    min_width: int = 320,
) -> Image.Image:
    """The image and, beside it, the image with the map blended in (strongest where the map is
    strong); a caption band below: prediction, probability, true class, the class mapped, and
    the colour scale (under the mapped image). `alpha`: the blend at the strongest evidence."""
    alpha = OVERLAY_ALPHA if alpha is None else alpha
    image = image.convert("RGB")
    if image.width < min_width:  # small images: enlarge so the caption fits and stays legible
        scale = min_width / image.width
        size = (min_width, max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64) / 255
    heat = heatmap(explanation, image.size)
    weight = alpha * np.sqrt(heat)[..., None]  # mid-level evidence stays visible
    blended = pixels * (1 - weight) + _colour(heat) * weight
    picture = Image.fromarray((np.clip(blended, 0, 1) * 255).round().astype(np.uint8))

    lines = caption(explanation, class_names, true_class)
    font_size = max(12, image.width // 24)
    font = _font(font_size)
    line_height = round(font_size * 1.3)
    band = line_height * max(len(lines), 2) + font_size // 2
    gap = max(2, image.width // 80)
    out = Image.new("RGB", (2 * image.width + gap, image.height + band), (255, 255, 255))
    out.paste(image, (0, 0))
    out.paste(picture, (image.width + gap, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((font_size // 3, image.height + 4 + i * line_height), line, (0, 0, 0), font)
    if explanation.evidence:
        margin = image.width // 10
        left, top = image.width + gap + margin, image.height + 4
        scale = (left, top, 2 * image.width + gap - margin, top + font_size)
        _colour_scale(draw, scale, font)
    return out


def save_overlay(
    image: Image.Image,
    explanation: Explanation,
    class_names: Sequence[str],
    path: str | Path,
    true_class: int | None = None,
) -> Path:
    """Write the overlay PNG (image | image with map, caption) at `path` and the map's record
    (`Explanation.to_dict`, with the true class when given) beside it: same name, .json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, explanation, class_names, true_class).save(path, format="PNG")
    record = explanation.to_dict(class_names)
    if true_class is not None:
        record["true"] = int(true_class)
        record["true_name"] = class_names[true_class]
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return path
