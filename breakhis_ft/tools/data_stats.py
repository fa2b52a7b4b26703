"""Counts of a BreakHis tree: images by subtype and magnification, slide folders, stems, folds.

breakhis-ft-data-stats /data/BreaKHis_v1
breakhis-ft-data-stats /data/BreaKHis_v1 --json --verify-images
"""

from __future__ import annotations

import argparse
import json

from breakhis_ft.data.breakhis import BadDataError, data_stats, scan_breakhis
from breakhis_ft.data.breakhis import stats_table as table
from breakhis_ft.tools import tool_parser, user_errors


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-data-stats", __doc__)
    parser.add_argument("root", help="a BreakHis tree (official or Kaggle layout) or a replica")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--duplicate-keep",
        default="ductal_carcinoma",
        help="which copy of slide 13412 to keep (ductal_carcinoma, lobular_carcinoma, both)",
    )
    parser.add_argument("--verify-images", action="store_true", help="decode every image")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad files instead of failing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Scan ROOT and print its stats (JSON with --json, else a table)."""
    args = build_parser().parse_args(argv)
    with user_errors(BadDataError):
        scan = scan_breakhis(
            args.root, args.duplicate_keep, "skip" if args.skip_bad else "error", args.verify_images
        )
    stats = data_stats(scan)
    if scan.bad_files:
        stats["bad_files"] = [{"path": p, "reason": r} for p, r in scan.bad_files]
    print(json.dumps(stats, indent=2) if args.json else table(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
