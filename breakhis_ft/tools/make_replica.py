"""Build the synthetic BreakHis replica (BreakHis's folders, names and per-patient counts).

breakhis-ft-make-replica /data/replica                  # all 7,909 images at 700 x 460
breakhis-ft-make-replica /tmp/small --fraction 0.05 --size 96 64
"""

from __future__ import annotations

import argparse
import json
import time

from breakhis_ft.data.breakhis import data_stats, scan_breakhis
from breakhis_ft.data.synthetic import build_replica
from breakhis_ft.tools import tool_parser, user_errors


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-make-replica", __doc__)
    parser.add_argument("dest", help="folder to write (it becomes data.root)")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the 7,909 images")
    parser.add_argument("--size", type=int, nargs=2, default=[700, 460], metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: automatic)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, build the replica and print its data.root and counts."""
    args = build_parser().parse_args(argv)
    start = time.time()
    with user_errors(ValueError, FileExistsError):
        root = build_replica(args.dest, args.fraction, tuple(args.size), args.seed, args.workers)
    stats = data_stats(scan_breakhis(root))
    print(
        json.dumps(
            {
                k: stats[k]
                for k in (
                    "images",
                    "slides",
                    "by_subtype",
                    "by_magnification",
                    "duplicates_dropped",
                )
            },
            indent=2,
        )
    )
    print(f"built in {time.time() - start:.1f} s; use data.root={root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
