"""A picture of what stain normalisation does, for people to look at: originals beside their
normalised versions, N images of each class, the ones a check kept as they were marked in red.

    python scripts/stain_preview.py --root /data/BreaKHis_v1 --out stain_preview.png
    python scripts/stain_preview.py --replica 0.02 --hard-fields --out benchmarks/stain_preview.png
    python scripts/stain_preview.py --root ... --run outputs/runs/x/2026-... (the run's normaliser)

Per class, up to `scan` images (round robin over the slide folders, in a fixed order) are
normalised; the N shown are those a check kept first, then the others. Without --run the reference
is fitted as a run fits data.stain_reference=train, here on images of the whole tree (a preview,
not a training run): the median of per-image fits over `reference_images` images.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from breakhis_ft.data.breakhis import load_image, scan_breakhis
from breakhis_ft.data.records import ImageRecord
from breakhis_ft.data.stain import (
    METHODS,
    StainNormalizer,
    fit_stain_normalizer,
    load_normalizer,
    reference_records,
)
from breakhis_ft.data.synthetic import HARD_FIELDS, _rng, build_replica, patient_stain, render_batch

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


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", type=Path, help="a BreakHis tree (official or Kaggle layout)")
    where.add_argument(
        "--replica", type=float, metavar="FRACTION", help="a replica of this size at 700x460"
    )
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--per-class", type=int, default=2, help="images shown per class")
    p.add_argument("--scan", type=int, default=12, help="images tried per class")
    p.add_argument("--magnification", type=int, default=None, help="e.g. 100 (default: all)")
    p.add_argument("--reference-images", type=int, default=16)
    p.add_argument("--run", type=Path, help="use this run's stain_normalizer.json (its method)")
    p.add_argument("--hard-fields", action="store_true", help="add the renderer's hard fields")
    p.add_argument("--width", type=int, default=THUMB_WIDTH, help="pixels of each image shown")
    p.add_argument(
        "--colors", type=int, help="save with a palette of this many colours (a smaller file)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the preview grid; print what it shows."""
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or build_replica(Path(tmp), args.replica, (700, 460), 0)
        records = [
            r
            for r in scan_breakhis(root).records
            if args.magnification is None or r.magnification == args.magnification
        ]
        if args.run is not None:
            saved = load_normalizer(args.run)
            if saved is None:
                raise SystemExit(f"error: {args.run} has no stain_normalizer.json")
            normalizers = {saved.method: saved}
        else:
            sample = reference_records(records, args.reference_images)
            images = [load_image(Path(root) / r.path) for r in sample]
            names = [r.path for r in sample]
            normalizers = {m: fit_stain_normalizer(m, images, names) for m in args.methods}
        by_class: dict[str, list[ImageRecord]] = defaultdict(list)
        for r in records:
            by_class[r.subtype].append(r)
        candidates = [
            (subtype, r.path, load_image(Path(root) / r.path))
            for subtype in sorted(by_class)
            for r in reference_records(by_class[subtype], args.scan)
        ]
        if args.hard_fields:
            candidates += hard_field_images()
        tried = preview_rows(candidates, normalizers)
        rows = choose_rows(tried, args.per_class)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        grid = preview_grid(rows, list(normalizers), args.width)
        if args.colors:
            grid = grid.quantize(args.colors, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        grid.save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(rows)} of the {len(tried)} images tried")
    for method in normalizers:
        kept = [(r.name, r.results[method][1]) for r in tried if r.results[method][1]]
        print(f"{method}: {len(kept)} of {len(tried)} kept as they were")
        for name, reason in kept:
            print(f"  {name}: {reason}")
    return 0
