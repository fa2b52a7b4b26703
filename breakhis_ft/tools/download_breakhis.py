"""Fetch BreaKHis_v1 (official archive, or the Kaggle copy with --kaggle), unpack and check it.

breakhis-ft-download-breakhis /data            # prints the data.root to use
breakhis-ft-download-breakhis /data --kaggle   # the Kaggle copy (with Folds.csv), a Kaggle token

The archive is about 4 GB and needs network access; an archive already in DEST
(BreaKHis_v1.tar.gz, e.g. fetched elsewhere) is unpacked and checked without downloading.
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from breakhis_ft.data.breakhis import BadDataError, data_stats, scan_breakhis
from breakhis_ft.tools import tool_parser, user_errors

OFFICIAL_URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"
KAGGLE_DATASET = "ambarish/breakhis"  # the copy with Folds.csv (used by the MedGemma blog)
EXPECTED_IMAGES = 7909


def download_official(dest: Path) -> Path:
    """Download and unpack the official archive into dest; return dest."""
    archive = dest / "BreaKHis_v1.tar.gz"
    if not archive.is_file():
        print(f"downloading {OFFICIAL_URL} -> {archive}")
        part = archive.with_suffix(".part")
        with urllib.request.urlopen(OFFICIAL_URL, timeout=60) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, length=1 << 20)
        part.rename(archive)
    if not tarfile.is_tarfile(archive):
        raise BadDataError(f"{archive}: not a tar archive (a partial download? delete it, rerun)")
    print(f"unpacking {archive}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # "data": no absolute paths or links out of dest
    return dest


def download_kaggle() -> Path:
    """Download the Kaggle copy into kagglehub's cache (needs a Kaggle token); return its folder."""
    try:
        import kagglehub
    except ImportError as err:
        raise ImportError(
            "--kaggle needs kagglehub: pip install 'breakhis-ft[kaggle]' and set up a Kaggle token"
        ) from err
    print(f"downloading {KAGGLE_DATASET} with kagglehub (into its cache, not DEST)")
    try:
        return Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as e:  # kagglehub raises its own types for network and credential errors
        raise ConnectionError(f"kagglehub: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = tool_parser("breakhis-ft-download-breakhis", __doc__)
    parser.add_argument("dest", type=Path, help="folder to download into")
    parser.add_argument(
        "--kaggle", action="store_true", help=f"use the Kaggle copy {KAGGLE_DATASET}"
    )
    return parser


def fetch(dest: Path, kaggle: bool) -> Path:
    """Download (or find) and unpack BreakHis; the folder to scan. Offline: says what to do."""
    try:
        return download_kaggle() if kaggle else download_official(dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise ConnectionError(
            f"cannot download BreakHis ({err}). Offline? Fetch {OFFICIAL_URL} (or Kaggle's "
            f"{KAGGLE_DATASET}) elsewhere and put the archive in {dest}, or unpack it there and "
            f"check it with breakhis-ft-data-stats {dest}; or use data=synthetic."
        ) from err


def check(root: Path) -> dict:
    """The scan's stats; BadDataError unless it is the full BreakHis (7,909 images)."""
    try:
        stats = data_stats(scan_breakhis(root, verify_images=False))
    except BadDataError as err:
        raise BadDataError(f"the download does not look like BreakHis: {err}") from err
    if stats["images_scanned"] != EXPECTED_IMAGES:
        raise BadDataError(
            f"{stats['images_scanned']} images found under {root}, expected {EXPECTED_IMAGES} "
            "(a partial archive? delete it and rerun)"
        )
    return stats


def main(argv: list[str] | None = None) -> int:
    """Download, unpack, verify the counts and print data.root."""
    args = build_parser().parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    with user_errors(ConnectionError, BadDataError, ImportError):
        root = fetch(args.dest, args.kaggle)
        stats = check(root)
    print(
        f"ok: {stats['images_scanned']} images ({stats['images']} after dropping the 13412 copy), "
        f"folds: {'yes' if stats['folds'] else 'no'}"
    )
    print(f"data.root={root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
