"""A grid of images beside their stain-normalised versions, those a check kept framed in red.

breakhis-ft-stain-preview --root /data/BreaKHis_v1 --magnification 100 --out preview.png
breakhis-ft-stain-preview --root /data/BreaKHis_v1 --run outputs/runs/x/<time> --out p.png
breakhis-ft-stain-preview --replica 0.02 --hard-fields --magnification 100 --per-class 1 \\
    --width 240 --colors 256 --out benchmarks/results/stain_preview.png

Per class, up to --scan images (round robin over its slide folders, in a fixed order) are
normalised with each method; the --per-class shown are those a check kept as they were first,
then the others. Without --run each method's reference is fitted as a run fits
data.stain_reference=train, here on --reference-images images of the whole tree (a preview, not
a training run). --replica builds a replica of that fraction at 700x460 in a temporary folder;
--hard-fields adds the renderer's green-grey lumen and mostly white mucinous fields.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from breakhis_ft.data.breakhis import BadDataError, scan_breakhis
from breakhis_ft.data.stain import METHODS, load_normalizer
from breakhis_ft.data.stain_preview import (
    THUMB_WIDTH,
    candidates_by_class,
    choose_rows,
    fit_preview_normalizers,
    hard_field_images,
    preview_grid,
    preview_rows,
    save_grid,
)
from breakhis_ft.data.synthetic import build_replica
from breakhis_ft.tools import run_tool, tool_parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = tool_parser("breakhis-ft-stain-preview", __doc__)
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
    p.add_argument("--reference-images", type=int, default=16, help="images to fit each method on")
    p.add_argument("--run", type=Path, help="use this run's stain_normalizer.json (its method)")
    p.add_argument("--hard-fields", action="store_true", help="add the renderer's hard fields")
    p.add_argument("--width", type=int, default=THUMB_WIDTH, help="pixels of each image shown")
    p.add_argument("--colors", type=int, help="save with a palette of this many colours (smaller)")
    return p


def write_preview(args: argparse.Namespace) -> int:
    """Write the grid; print what it shows and every image a check kept, with why."""
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
                raise BadDataError(
                    f"{args.run}: no stain_normalizer.json (a stain-normalised run?)"
                )
            normalizers = {saved.method: saved}
        else:
            normalizers = fit_preview_normalizers(
                root, records, args.methods, args.reference_images
            )
        candidates = candidates_by_class(root, records, args.scan)
        candidates += hard_field_images() if args.hard_fields else []
        tried = preview_rows(candidates, normalizers)
        rows = choose_rows(tried, args.per_class)
        save_grid(preview_grid(rows, list(normalizers), args.width), args.out, args.colors)
    print(f"wrote {args.out}: {len(rows)} of the {len(tried)} images tried")
    for method in normalizers:
        kept = [(r.name, r.results[method][1]) for r in tried if r.results[method][1]]
        print(f"{method}: {len(kept)} of {len(tried)} kept as they were")
        for name, reason in kept:
            print(f"  {name}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and write the preview."""
    return run_tool(build_parser(), write_preview, argv, (BadDataError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
