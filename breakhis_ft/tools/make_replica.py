"""Build the synthetic BreakHis replica: python scripts/make_replica.py DEST [--fraction F] ..."""

from __future__ import annotations

import argparse
import json
import time

from breakhis_ft.data.breakhis import data_stats, scan_breakhis
from breakhis_ft.data.synthetic import build_replica


def main() -> None:
    """Parse the arguments, build the replica and print its data.root and counts."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dest", help="folder to write (it becomes data.root)")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the 7,909 images")
    p.add_argument("--size", type=int, nargs=2, default=[700, 460], metavar=("W", "H"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: automatic)")
    args = p.parse_args()
    start = time.time()
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


if __name__ == "__main__":
    main()
