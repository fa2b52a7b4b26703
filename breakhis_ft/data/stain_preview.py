"""A picture of what stain normalisation does, for people to look at: originals beside their
normalised versions, N images of each class, the ones a check kept as they were marked in red
(the tool: breakhis-ft-stain-preview, breakhis_ft/tools/stain_preview.py).
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from breakhis_ft.data.breakhis import load_image
from breakhis_ft.data.records import ImageRecord
from breakhis_ft.data.stain import StainNormalizer, fit_stain_normalizer, reference_records
from breakhis_ft.data.synthetic import HARD_FIELDS, _rng, patient_stain, render_batch

THUMB_WIDTH = 260  # pixels of each image in the grid (default)
CAPTION_LINES = 5  # text lines under each image (a fallback's reason, wrapped)
FONT_SIZE = 12
MARK = (200, 0, 0)  # the frame and text of an image a check kept as it was


@dataclass
class PreviewRow:
    """One original and what each method made of it: (image, None) or (original, reason)."""

    label: str  # the class (or "hard field")
    name: str  # the file (or field) name
    original: Image.Image
    results: dict[str, tuple[Image.Image, str | None]] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        """Whether any method kept this image as it was."""
        return any(reason is not None for _, reason in self.results.values())


def preview_rows(
    images: Sequence[tuple[str, str, Image.Image]],
    normalizers: dict[str, StainNormalizer],
) -> list[PreviewRow]:
    """(label, name, image) -> rows with each normaliser's result."""
    rows = []
    for label, name, image in images:
        row = PreviewRow(label, name, image.convert("RGB"))
        for method, normalizer in normalizers.items():
            row.results[method] = normalizer.normalize(row.original)
        rows.append(row)
    return rows


def choose_rows(rows: Sequence[PreviewRow], per_class: int) -> list[PreviewRow]:
    """Per label (in order of appearance), `per_class` rows: those a check kept first."""
    by_label: dict[str, list[PreviewRow]] = defaultdict(list)
    for row in rows:
        by_label[row.label].append(row)
    chosen = []
    for group in by_label.values():
        chosen += sorted(group, key=lambda r: not r.fell_back)[:per_class]
    return chosen


def _thumb(image: Image.Image, width: int) -> Image.Image:
    height = max(1, round(image.height * width / image.width))
    return image.resize((width, height), Image.Resampling.BICUBIC)


def preview_grid(
    rows: Sequence[PreviewRow], methods: Sequence[str], thumb_width: int = THUMB_WIDTH
) -> Image.Image:
    """The grid: a header, then one row per image: its label and name, the original, and each
    method's result; a result that a check kept as it was has a red frame and its reason."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 3
    label_width, gap = 170, 8
    thumbs = [
        [_thumb(image, thumb_width) for image in (r.original, *(r.results[m][0] for m in methods))]
        for r in rows
    ]
    heights = [max(t.height for t in row) + CAPTION_LINES * line + gap for row in thumbs]
    width = label_width + (1 + len(methods)) * (thumb_width + gap)
    grid = Image.new("RGB", (width, 2 * line + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(["original", *methods]):
        draw.text((label_width + col * (thumb_width + gap), 2), title, fill="black", font=font)
    y = 2 * line
    for row, images, height in zip(rows, thumbs, heights, strict=True):
        name = Path(row.name).name
        label = textwrap.wrap(row.label if name in row.label else f"{row.label} {name}", 24)
        draw.multiline_text((2, y), "\n".join(label[:6]), fill="black", font=font)
        for col, thumb in enumerate(images):
            x = label_width + col * (thumb_width + gap)
            grid.paste(thumb, (x, y))
            reason = None if col == 0 else row.results[methods[col - 1]][1]
            if reason is not None:
                draw.rectangle(
                    (x, y, x + thumb.width - 1, y + thumb.height - 1), outline=MARK, width=4
                )
                text = textwrap.wrap(f"kept as it was: {reason}", thumb_width // 7)[:CAPTION_LINES]
                draw.multiline_text(
                    (x, y + thumb.height + 2), "\n".join(text), fill=MARK, font=font
                )
        y += height
    return grid


def hard_field_images(size: tuple[int, int] = (700, 460)) -> list[tuple[str, str, Image.Image]]:
    """The renderer's hard fields (synthetic.HARD_FIELDS) as (label, name, image)."""
    out = []
    for name, style in HARD_FIELDS.items():
        rgb = render_batch(style, patient_stain(0, "10926"), 100, size, 1, _rng(1, name))[0]
        out.append((f"synthetic hard field: {name}", name, Image.fromarray(rgb)))
    return out


def candidates_by_class(
    root: str | Path, records: Sequence[ImageRecord], n: int
) -> list[tuple[str, str, Image.Image]]:
    """Per class (subtype), up to `n` of its images as (class, path, image): round robin over
    its slide folders, in a fixed order (`stain.reference_records`)."""
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_class[r.subtype].append(r)
    return [
        (subtype, r.path, load_image(Path(root) / r.path))
        for subtype in sorted(by_class)
        for r in reference_records(by_class[subtype], n)
    ]


def fit_preview_normalizers(
    root: str | Path, records: Sequence[ImageRecord], methods: Sequence[str], n: int
) -> dict[str, StainNormalizer]:
    """Each method fitted as a run fits data.stain_reference=train, on `n` of these images."""
    sample = reference_records(records, n)
    images = [load_image(Path(root) / r.path) for r in sample]
    return {m: fit_stain_normalizer(m, images, [r.path for r in sample]) for m in methods}


def save_grid(grid: Image.Image, out: str | Path, colors: int | None = None) -> Path:
    """Write the grid as a PNG, with a palette of `colors` colours when given (a smaller file)."""
    if colors:
        grid = grid.quantize(colors, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    return out
