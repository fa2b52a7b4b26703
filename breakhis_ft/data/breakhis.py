"""Scan a BreakHis tree into records: find the layout, parse names strictly, drop the 13412 copy.

Two layouts are found without being told which: the official archive
(`BreaKHis_v1/histology_slides/breast/...`) and the Kaggle copy, nested once more with `Folds.csv`
at its top (`BreaKHis_v1/Folds.csv` + `BreaKHis_v1/BreaKHis_v1/histology_slides/breast/...`).
The root may be any folder on that path from the top down to `breast`.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breakhis_ft.data.png import MAX_IMAGE_PIXELS, check_pixel_limit, load_image, png_problem
from breakhis_ft.data.records import SUBTYPES, ImageRecord, stem_of
from breakhis_ft.errors import BadDataError

MAGNIFICATIONS = (40, 100, 200, 400)
CODE_TO_SUBTYPE = {code: name for name, (code, _) in SUBTYPES.items()}
CLASS_LETTER = {"benign": "B", "malignant": "M"}
# SOB_<B|M>_<type>-<YY>-<slide>-<mag>-<seq>.png, e.g. SOB_B_A-14-22549AB-40-001.png
FILE_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<code>A|F|PT|TA|DC|LC|MC|PC)-(?P<yy>1[45])-(?P<slide>(?P<stem>\d+)[A-Z]*)"
    r"-(?P<mag>40|100|200|400)-(?P<seq>\d{3})\.png$"
)
# Folder names one may pass as data.root on the way down to `breast`.
_TREE_DIRS = ("breakhis_v1", "histology_slides", "breast")
FOLDS_COLUMNS = ("fold", "mag", "grp", "filename")
MAX_LISTED = 20  # bad files named in one error message


@dataclass
class FoldsTable:
    """Official 5-fold protocol rows (Folds.csv or dsfold1..5.txt), keyed by image file name."""

    source: str  # the file(s) read
    rows: list[tuple[int, int, str, str]]  # (fold, mag, grp, file name)

    def groups(self, fold: int) -> dict[str, str]:
        """File name -> train|test for one fold."""
        return {name: grp for f, _, grp, name in self.rows if f == fold}

    @property
    def folds(self) -> list[int]:
        """The fold numbers present."""
        return sorted({f for f, *_ in self.rows})


@dataclass
class BreakhisScan:
    """What a scan found: records (paths relative to `root`), folds, dropped copies, bad files."""

    root: Path
    records: list[ImageRecord]
    folds: FoldsTable | None = None
    duplicates_dropped: list[ImageRecord] = field(default_factory=list)
    duplicate_kept: dict[str, str] = field(default_factory=dict)  # patient id -> subtype kept
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), when skipped
    ignored_files: list[str] = field(default_factory=list)  # non-PNG files (README, Thumbs.db)
    layout: str = "official"  # official | kaggle (BreaKHis_v1 nested twice)


def parse_name(name: str) -> dict:
    """Parse a BreakHis file name strictly; raise BadDataError when it does not match."""
    m = FILE_RE.match(name)
    if m is None:
        raise BadDataError(
            f"{name}: not a BreakHis file name (expected SOB_<B|M>_<type>-<YY>-<slide>-<mag>-<seq>"
            f".png, e.g. SOB_B_A-14-22549AB-40-001.png)"
        )
    subtype = CODE_TO_SUBTYPE[m["code"]]
    tumor_class = SUBTYPES[subtype][1]
    if CLASS_LETTER[tumor_class] != m["cls"]:
        raise BadDataError(
            f"{name}: type {m['code']} is {tumor_class}, but the name says {m['cls']}"
        )
    return {
        "tumor_class": tumor_class,
        "subtype": subtype,
        "patient": m["slide"],
        "stem": stem_of(m["slide"]),
        "year": m["yy"],
        "magnification": int(m["mag"]),
        "seq": int(m["seq"]),
    }


def patient_dir_name(tumor_class: str, subtype: str, year: str, patient: str) -> str:
    """The patient folder name of a slide, e.g. SOB_B_A_14-22549AB (`_` before the year)."""
    return f"SOB_{CLASS_LETTER[tumor_class]}_{SUBTYPES[subtype][0]}_{year}-{patient}"


def record_from_path(rel_parts: tuple[str, ...], rel_path: str) -> ImageRecord:
    """Build a record from a file's parts below `breast/`, cross-checked against its folders."""
    if len(rel_parts) != 6:
        raise BadDataError(
            f"{rel_path}: not in the BreakHis layout "
            "breast/<benign|malignant>/SOB/<subtype>/<patient>/<mag>X/<file>.png"
        )
    cls_dir, sob, subtype_dir, patient_dir, mag_dir, name = rel_parts
    info = parse_name(name)
    expected = (
        info["tumor_class"],
        "SOB",
        info["subtype"],
        patient_dir_name(info["tumor_class"], info["subtype"], info["year"], info["patient"]),
        f"{info['magnification']}X",
    )
    found = (cls_dir, sob, subtype_dir, patient_dir, mag_dir)
    wrong = [f"{f!r} (expected {e!r})" for f, e in zip(found, expected, strict=True) if f != e]
    if wrong:
        raise BadDataError(f"{rel_path}: the file name contradicts its folders: {', '.join(wrong)}")
    return ImageRecord(
        path=rel_path,
        tumor_class=info["tumor_class"],
        subtype=info["subtype"],
        patient=info["patient"],
        stem=info["stem"],
        magnification=info["magnification"],
        seq=info["seq"],
    )


def find_breast_dir(root: Path) -> Path:
    """Find the `breast` folder (holding benign/ and malignant/) at or below `root`."""
    if not root.exists():
        raise BadDataError(
            f"data.root={root} does not exist (download BreakHis with "
            "breakhis-ft-download-breakhis, or use data=synthetic)"
        )
    if not root.is_dir():
        raise BadDataError(f"data.root={root} is not a folder")
    found: list[Path] = []
    frontier = [root]
    for _ in range(5):  # root, BreaKHis_v1, BreaKHis_v1 (Kaggle), histology_slides, breast
        nxt = []
        for d in frontier:
            if (d / "benign").is_dir() or (d / "malignant").is_dir():
                found.append(d)
                continue
            nxt += [c for c in sorted(d.iterdir()) if c.is_dir() and c.name.lower() in _TREE_DIRS]
        frontier = nxt
    if not found:
        raise BadDataError(
            f"data.root={root}: no BreakHis tree found (looked for histology_slides/breast/"
            "{benign,malignant} in it and in BreaKHis_v1/ up to two levels down)"
        )
    if len(found) > 1:
        raise BadDataError(
            f"data.root={root}: several BreakHis trees found ({', '.join(map(str, found))}); "
            "point data.root at one of them"
        )
    return found[0]


def read_folds_csv(path: Path) -> FoldsTable:
    """Read a Kaggle Folds.csv (columns fold, mag, grp, filename); errors name the file and line."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FOLDS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BadDataError(
                f"{path}: missing column(s) {', '.join(missing)} (a Folds.csv needs "
                f"{', '.join(FOLDS_COLUMNS)}; found {reader.fieldnames})"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            rows.append(_fold_row(path, line, row["fold"], row["mag"], row["grp"], row["filename"]))
    if not rows:
        raise BadDataError(f"{path}: no rows")
    return FoldsTable(str(path), rows)


def read_dsfolds(paths: list[Path]) -> FoldsTable:
    """Read the original dsfold1..5.txt files (rows `image.png|mag|fold|train/test`)."""
    rows = []
    for path in paths:
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            parts = [p.strip() for p in text.split("|")]
            if len(parts) != 4:
                raise BadDataError(f"{path}:{line}: expected image.png|mag|fold|train/test")
            name, mag, fold, grp = parts
            rows.append(_fold_row(path, line, fold, mag, grp, name))
    return FoldsTable(", ".join(map(str, paths)), rows)


def _fold_row(path: Path, line: int, fold: str, mag: str, grp: str, name: str):
    try:
        fold_i, mag_i = int(fold), int(mag)
    except (TypeError, ValueError):
        raise BadDataError(
            f"{path}:{line}: fold and mag must be integers, got {fold!r}, {mag!r}"
        ) from None
    grp = (grp or "").strip().lower()
    if grp not in ("train", "test") or mag_i not in MAGNIFICATIONS or not 1 <= fold_i <= 5:
        raise BadDataError(
            f"{path}:{line}: bad row (fold {fold!r} in 1-5, mag {mag!r} in {MAGNIFICATIONS}, "
            f"grp {grp!r} in train/test)"
        )
    return fold_i, mag_i, grp, os.path.basename(name.strip().replace("\\", "/"))


def find_folds(root: Path, breast: Path) -> tuple[FoldsTable | None, str]:
    """Find Folds.csv (Kaggle) or dsfold1..5.txt from root down to `breast`; name the layout."""
    below = breast.relative_to(root).parts
    dirs = [root] + [root.joinpath(*below[: i + 1]) for i in range(len(below))]
    if root.name.lower() == "breakhis_v1" and root.parent.name.lower() == "breakhis_v1":
        dirs.insert(0, root.parent)  # root is the inner folder of the Kaggle copy
    # the Kaggle copy nests BreaKHis_v1 twice; the official archive once
    layout = "kaggle" if sum(d.name.lower() == "breakhis_v1" for d in dirs) > 1 else "official"
    for d in dirs:
        if (d / "Folds.csv").is_file():
            return read_folds_csv(d / "Folds.csv"), layout
    for d in dirs:
        ds = [d / f"dsfold{k}.txt" for k in range(1, 6)]
        if all(p.is_file() for p in ds):
            return read_dsfolds(ds), layout
    return None, layout


def _drop_duplicates(records: list[ImageRecord], keep: str):
    """Keep one subtype's copy of a patient filed under several subtypes (slide 13412), or with
    keep="both" every copy (the blog notebook's data)."""
    subtypes = defaultdict(set)
    for r in records:
        subtypes[r.patient].add(r.subtype)
    kept, dropped, chosen = [], [], {}
    for patient, subs in subtypes.items():
        if len(subs) > 1 and keep == "both":
            chosen[patient] = "both"
        elif len(subs) > 1:
            if keep not in subs:
                raise BadDataError(
                    f"patient {patient} is filed under {', '.join(sorted(subs))}; set "
                    f"data.duplicate_keep to the copy to keep (got {keep!r})"
                )
            chosen[patient] = keep
    for r in records:
        copy = chosen.get(r.patient, "both")
        (dropped if copy not in ("both", r.subtype) else kept).append(r)
    return kept, dropped, chosen


def scan_breakhis(
    root: str | Path,
    duplicate_keep: str = "ductal_carcinoma",
    on_bad_file: str = "error",
    verify_images: bool = False,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> BreakhisScan:
    """Scan a BreakHis tree (official or Kaggle layout) into records; see the module docstring.

    Every PNG's chunks are checked (CRCs, end chunk, size against `max_pixels`): a corrupt,
    truncated or oversized file is refused (`on_bad_file=error`) or left out and listed
    (`skip`) here, before any model loads. `verify_images` also decodes every image.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"data.on_bad_file={on_bad_file!r}: allowed values are error, skip")
    check_pixel_limit(max_pixels)
    root = Path(root).expanduser().resolve()
    breast = find_breast_dir(root)
    folds, layout = find_folds(root, breast)
    records, bad, ignored = [], [], []
    for dirpath, dirnames, filenames in os.walk(breast):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if not name.lower().endswith(".png"):
                ignored.append(rel)
                continue
            try:
                records.append(record_from_path(full.relative_to(breast).parts, rel))
                if problem := png_problem(full, max_pixels=max_pixels):
                    raise BadDataError(f"{full}: {problem}")
                if verify_images:
                    load_image(full, max_pixels)
            except BadDataError as e:
                bad.append((rel, str(e)))
    if bad and on_bad_file == "error":
        listed = "\n  ".join(reason for _, reason in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise BadDataError(
            f"{len(bad)} bad file(s) under {breast}:\n  {listed}{more}\n"
            "Fix or remove them, or set data.on_bad_file=skip to leave them out (listed in the run "
            "folder)."
        )
    if bad:  # skipped files must not survive in records (a bad decode came after parsing)
        bad_paths = {p for p, _ in bad}
        records = [r for r in records if r.path not in bad_paths]
    if not records:
        raise BadDataError(f"data.root={root}: no BreakHis images (*.png) under {breast}")
    records, dropped, chosen = _drop_duplicates(records, duplicate_keep)
    return BreakhisScan(root, records, folds, dropped, chosen, bad, ignored, layout)


def data_stats(scan: BreakhisScan) -> dict:
    """Counts of a scan: images, slide folders, stems, by subtype / magnification / class, dropped
    files."""
    recs = scan.records
    by_sub_mag: dict[str, dict[str, int]] = defaultdict(dict)
    for (sub, mag), n in sorted(Counter((r.subtype, r.magnification) for r in recs).items()):
        by_sub_mag[sub][f"{mag}X"] = n
    folders_by_subtype, stems_by_subtype = defaultdict(set), defaultdict(set)
    for r in recs:
        folders_by_subtype[r.subtype].add(r.patient)
        stems_by_subtype[r.subtype].add(r.stem)
    dropped_folders = sorted({str(Path(r.path).parent.parent) for r in scan.duplicates_dropped})
    return {
        "root": str(scan.root),
        "layout": scan.layout,
        "images": len(recs),
        "images_scanned": len(recs) + len(scan.duplicates_dropped),
        "slides": len({r.patient for r in recs}),
        "stems": len({r.stem for r in recs}),
        "by_class": dict(sorted(Counter(r.tumor_class for r in recs).items())),
        "by_subtype": {s: n for s in SUBTYPES if (n := sum(r.subtype == s for r in recs))},
        "by_magnification": {
            f"{m}X": n for m in MAGNIFICATIONS if (n := sum(r.magnification == m for r in recs))
        },
        "by_subtype_magnification": dict(by_sub_mag),
        # slide folders (22549AB, 22549CD: the unit of the official folds and eva) and their
        # numeric stems (22549: split=patient's groups); a stem may be filed under two subtypes
        "slide_folders_by_subtype": {s: len(p) for s, p in sorted(folders_by_subtype.items())},
        "stems_by_subtype": {s: len(p) for s, p in sorted(stems_by_subtype.items())},
        "duplicates_dropped": len(scan.duplicates_dropped),
        "duplicate_folders_dropped": dropped_folders,
        "duplicate_kept": scan.duplicate_kept,
        "bad_files_skipped": len(scan.bad_files),
        "ignored_files": len(scan.ignored_files),
        "folds": None
        if scan.folds is None
        else {"source": scan.folds.source, "folds": scan.folds.folds, "rows": len(scan.folds.rows)},
    }


def stats_table(stats: dict) -> str:
    """`data_stats` as a table: per subtype its slide folders, stems, images per magnification."""
    mags = [f"{m}X" for m in MAGNIFICATIONS]
    lines = [
        f"{'subtype':<22}{'slide folders':>14}{'stems':>7}"
        + "".join(f"{m:>7}" for m in mags)
        + f"{'total':>8}"
    ]
    for sub, n in stats["by_subtype"].items():
        row = stats["by_subtype_magnification"].get(sub, {})
        lines.append(
            f"{sub:<22}{stats['slide_folders_by_subtype'].get(sub, 0):>14}"
            f"{stats['stems_by_subtype'].get(sub, 0):>7}"
            + "".join(f"{row.get(m, 0):>7}" for m in mags)
            + f"{n:>8}"
        )
    by_mag = stats["by_magnification"]
    lines.append(
        f"{'all':<22}{stats['slides']:>14}{stats['stems']:>7}"
        + "".join(f"{by_mag.get(m, 0):>7}" for m in mags)
        + f"{stats['images']:>8}"
    )
    lines.append(
        f"\n{stats['images']} images, {stats['slides']} slide folders, {stats['stems']} stems (a "
        f"stem filed under two subtypes counts in both rows), layout {stats['layout']}; duplicates "
        f"dropped: {stats['duplicates_dropped']} {stats['duplicate_folders_dropped']}; folds: "
        f"{stats['folds']}"
    )
    return "\n".join(lines)


def scan_from_config(data_cfg: Any, synthetic_dir: str | Path) -> BreakhisScan:
    """Scan the data of a `data` config: the real tree at data.root, or the cached replica.

    data=synthetic builds the replica once under `synthetic_dir` (paths.synthetic), then reuses
    it; with data.root set, in that folder when it is new or empty (or already this replica). A
    folder of real BreakHis data given as data.root with data=synthetic is refused, never
    written: its message names the fix, data=breakhis.
    """
    if data_cfg.source == "synthetic":
        from breakhis_ft.data.synthetic import ensure_replica, ensure_replica_at

        size = tuple(int(x) for x in data_cfg.synthetic_size)
        fraction, seed = float(data_cfg.synthetic_fraction), int(data_cfg.synthetic_seed)
        if data_cfg.root:  # an explicit folder: build there unless a replica is already in it
            root = ensure_replica_at(data_cfg.root, fraction, size, seed)
        else:
            root = ensure_replica(synthetic_dir, fraction, size, seed)
    elif data_cfg.source == "breakhis":
        if not data_cfg.root:
            raise BadDataError("data=breakhis needs data.root=/path/to/BreaKHis_v1")
        root = Path(data_cfg.root)
    else:
        raise ValueError(f"data.source={data_cfg.source!r}: allowed values are synthetic, breakhis")
    return scan_breakhis(
        root,
        data_cfg.duplicate_keep,
        data_cfg.on_bad_file,
        data_cfg.verify_images,
        data_cfg.max_image_pixels,
    )


def write_bad_files(scan: BreakhisScan, run_dir: str | Path) -> Path | None:
    """Write the skipped bad files (count in the header comment) to run_dir/bad_files.csv."""
    if not scan.bad_files:
        return None
    path = Path(run_dir) / "bad_files.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(f"# {len(scan.bad_files)} bad file(s) skipped (data.on_bad_file=skip)\n")
        out = csv.writer(f)
        out.writerow(["path", "reason"])
        out.writerows(scan.bad_files)
    return path
