"""Fetch BreaKHis_v1 (official archive, or the Kaggle copy with --kaggle), unpack and check it.

    python scripts/download_breakhis.py DEST [--kaggle]

Prints the data.root to use. The archive is about 4 GB; needs network access.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from breakhis_ft.data.breakhis import BadDataError, data_stats, scan_breakhis

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
    except ImportError:
        sys.exit("--kaggle needs kagglehub: pip install 'breakhis-ft[kaggle]' and set up a token")
    print(f"downloading {KAGGLE_DATASET} with kagglehub (into its cache, not DEST)")
    try:
        return Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as e:  # kagglehub raises its own types for network and credential errors
        raise ConnectionError(f"kagglehub: {e}") from e


def main() -> None:
    """Download, unpack, verify the counts and print data.root."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dest", type=Path, help="folder to download into")
    p.add_argument("--kaggle", action="store_true", help=f"use the Kaggle copy {KAGGLE_DATASET}")
    args = p.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    try:
        root = download_kaggle() if args.kaggle else download_official(args.dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        sys.exit(
            f"error: cannot download BreakHis ({e}). Offline? Fetch {OFFICIAL_URL} (or Kaggle's "
            f"{KAGGLE_DATASET}) elsewhere, unpack it under {args.dest}, and check it with "
            f"python scripts/data_stats.py {args.dest}; or use data=synthetic."
        )
    try:
        stats = data_stats(scan_breakhis(root, verify_images=False))
    except BadDataError as e:
        sys.exit(f"error: the download does not look like BreakHis: {e}")
    found = stats["images_scanned"]
    if found != EXPECTED_IMAGES:
        sys.exit(f"error: {found} images found under {root}, expected {EXPECTED_IMAGES}")
    print(
        f"ok: {found} images ({stats['images']} after dropping the 13412 copy), "
        f"folds: {'yes' if stats['folds'] else 'no'}"
    )
    print(f"data.root={root}")


if __name__ == "__main__":
    main()
