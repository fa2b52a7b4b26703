"""Counts of a BreakHis tree: python scripts/data_stats.py ROOT [--json]."""

from __future__ import annotations

import argparse
import json
import sys

from breakhis_ft.data.breakhis import BadDataError, data_stats, scan_breakhis

MAGS = ("40X", "100X", "200X", "400X")


def table(stats: dict) -> str:
    """The stats as a readable table (subtype x magnification) and a summary."""
    lines = [f"{'subtype':<22}{'patients':>9}" + "".join(f"{m:>7}" for m in MAGS) + f"{'total':>8}"]
    for sub, n in stats["by_subtype"].items():
        row = stats["by_subtype_magnification"].get(sub, {})
        lines.append(
            f"{sub:<22}{stats['patients_by_subtype'].get(sub, 0):>9}"
            + "".join(f"{row.get(m, 0):>7}" for m in MAGS)
            + f"{n:>8}"
        )
    mags = stats["by_magnification"]
    lines.append(
        f"{'all':<22}{stats['slides']:>9}"
        + "".join(f"{mags.get(m, 0):>7}" for m in MAGS)
        + f"{stats['images']:>8}"
    )
    lines.append(
        f"\n{stats['images']} images, {stats['slides']} slides ({stats['stems']} stems), layout "
        f"{stats['layout']}; duplicates dropped: {stats['duplicates_dropped']} "
        f"{stats['duplicate_folders_dropped']}; folds: {stats['folds']}"
    )
    return "\n".join(lines)


def main() -> None:
    """Scan ROOT and print its stats (JSON with --json, else a table)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root", help="a BreakHis tree (official or Kaggle layout) or a replica")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--duplicate-keep", default="ductal_carcinoma")
    p.add_argument("--verify-images", action="store_true", help="decode every image")
    p.add_argument("--skip-bad", action="store_true", help="skip bad files instead of failing")
    args = p.parse_args()
    try:
        scan = scan_breakhis(
            args.root, args.duplicate_keep, "skip" if args.skip_bad else "error", args.verify_images
        )
    except BadDataError as e:
        sys.exit(f"error: {e}")
    stats = data_stats(scan)
    if scan.bad_files:
        stats["bad_files"] = [{"path": p, "reason": r} for p, r in scan.bad_files]
    print(json.dumps(stats, indent=2) if args.json else table(stats))


if __name__ == "__main__":
    main()
