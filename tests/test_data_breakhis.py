"""Scanning BreakHis trees: strict names, both layouts, the 13412 duplicate, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from breakhis_ft.config import DataConfig
from breakhis_ft.data.breakhis import (
    BadDataError,
    BreakhisScan,
    data_stats,
    load_image,
    parse_name,
    read_dsfolds,
    read_folds_csv,
    scan_breakhis,
    scan_from_config,
    write_bad_files,
)

A_DIR = "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB"
DC_DIR = "BreaKHis_v1/histology_slides/breast/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523"


def _png(path: Path, size: tuple[int, int] = (7, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(path)
    return path


def _tree(root: Path) -> Path:
    _png(root / A_DIR / "40X" / "SOB_B_A-14-22549AB-40-001.png")
    _png(root / A_DIR / "100X" / "SOB_B_A-14-22549AB-100-002.png", size=(7, 3))
    _png(root / DC_DIR / "400X" / "SOB_M_DC-14-2523-400-013.png")
    return root


@pytest.mark.parametrize(
    "name, expected",
    [
        ("SOB_B_A-14-22549AB-40-001.png", ("adenosis", "benign", "22549AB", "22549", 40, 1)),
        ("SOB_B_TA-14-3411F-100-010.png", ("tubular_adenoma", "benign", "3411F", "3411", 100, 10)),
        (
            "SOB_M_PC-15-190EF-400-123.png",
            ("papillary_carcinoma", "malignant", "190EF", "190", 400, 123),
        ),
        (
            "SOB_M_DC-14-13412-200-031.png",
            ("ductal_carcinoma", "malignant", "13412", "13412", 200, 31),
        ),
    ],
)
def test_parse_good_names(name, expected):
    info = parse_name(name)
    got = (
        info["subtype"],
        info["tumor_class"],
        info["patient"],
        info["stem"],
        info["magnification"],
        info["seq"],
    )
    assert got == expected


@pytest.mark.parametrize(
    "name",
    [
        "SOB_B_A_14-22549AB-40-001.png",  # `_` before the year is the folder spelling
        "SOB_B_X-14-22549AB-40-001.png",  # unknown type
        "SOB_B_A-14-22549AB-50-001.png",  # unknown magnification
        "SOB_B_A-14-22549AB-40-1.png",  # sequence not 3 digits
        "SOB_B_A-16-22549AB-40-001.png",  # year not 14/15
        "SOB_B_A-14-22549AB-40-001.jpg",
        "SOB_M_A-14-22549AB-40-001.png",  # adenosis is benign
        "sob_b_a-14-22549ab-40-001.png",
    ],
)
def test_parse_bad_names(name):
    with pytest.raises(BadDataError, match=name.split("-")[0]):
        parse_name(name)


@pytest.mark.parametrize(
    "start",
    ["", "BreaKHis_v1", "BreaKHis_v1/histology_slides", "BreaKHis_v1/histology_slides/breast"],
)
def test_official_layout_found_from_any_level(tmp_path, start):
    _tree(tmp_path)
    scan = scan_breakhis(tmp_path / start)
    assert scan.layout == "official" and scan.folds is None
    assert len(scan.records) == 3
    rec = next(r for r in scan.records if r.magnification == 400)
    assert (rec.subtype, rec.patient, rec.stem, rec.seq) == ("ductal_carcinoma", "2523", "2523", 13)
    assert (scan.root / rec.path).is_file()  # paths are relative to the root given


def test_kaggle_layout_and_folds_csv(tmp_path):
    top = tmp_path / "BreaKHis_v1"  # Kaggle: BreaKHis_v1/Folds.csv + BreaKHis_v1/BreaKHis_v1/...
    _tree(top)
    names = sorted(p.name for p in top.rglob("*.png"))
    rows = ["fold,mag,grp,filename"] + [
        f"{f},{n.split('-')[3]},{'test' if i == 0 else 'train'},BreaKHis_v1/histology_slides/x/{n}"
        for f in range(1, 6)
        for i, n in enumerate(names)
    ]
    (top / "Folds.csv").write_text("\n".join(rows) + "\n")
    for start in (tmp_path, top, top / "BreaKHis_v1"):
        scan = scan_breakhis(start)
        assert scan.layout == "kaggle"
        assert scan.folds is not None and scan.folds.folds == [1, 2, 3, 4, 5]
        assert scan.folds.groups(1)[names[0]] == "test"
        assert len(scan.records) == 3


def test_replica_has_official_tree_and_folds(replica_scan):
    assert replica_scan.layout == "official"
    assert replica_scan.folds is not None and len(replica_scan.folds.folds) == 5
    first = replica_scan.records[0].path
    assert first.startswith("BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/")


def test_duplicate_13412_keeps_the_chosen_copy(replica_root):
    for keep, drop in (
        ("ductal_carcinoma", "lobular_carcinoma"),
        ("lobular_carcinoma", "ductal_carcinoma"),
    ):
        scan = scan_breakhis(replica_root, duplicate_keep=keep)
        kept = [r for r in scan.records if r.patient == "13412"]
        assert kept and {r.subtype for r in kept} == {keep}
        assert scan.duplicates_dropped and {r.subtype for r in scan.duplicates_dropped} == {drop}
        assert len(scan.duplicates_dropped) == len(kept)
        stats = data_stats(scan)
        assert stats["duplicates_dropped"] == len(kept)
        assert stats["duplicate_kept"] == {"13412": keep}
        assert stats["images_scanned"] == stats["images"] + len(kept)


def test_duplicate_copies_are_the_same_images(replica_scan):
    for r in replica_scan.duplicates_dropped:
        twin = replica_scan.root / r.path.replace(
            "lobular_carcinoma/SOB_M_LC", "ductal_carcinoma/SOB_M_DC"
        ).replace("SOB_M_LC-", "SOB_M_DC-")
        assert np.array_equal(
            np.asarray(load_image(replica_scan.root / r.path)), np.asarray(load_image(twin))
        )


def test_name_contradicting_folders_is_an_error_naming_the_file(tmp_path):
    _tree(tmp_path)
    bad = _png(tmp_path / A_DIR / "40X" / "SOB_B_A-14-22549CD-40-002.png")  # wrong patient
    wrong_mag = _png(tmp_path / A_DIR / "40X" / "SOB_B_A-14-22549AB-100-003.png")
    with pytest.raises(BadDataError) as e:
        scan_breakhis(tmp_path)
    assert bad.name in str(e.value) and wrong_mag.name in str(e.value)
    assert "SOB_B_A_14-22549CD" in str(e.value) and "'100X'" in str(e.value)
    assert "2 bad file(s)" in str(e.value) and "on_bad_file=skip" in str(e.value)


def test_unparseable_png_and_ignored_files(tmp_path):
    _tree(tmp_path)
    _png(tmp_path / A_DIR / "40X" / "copy of image.png")
    (tmp_path / A_DIR / "40X" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(BadDataError, match="copy of image.png: not a BreakHis file name"):
        scan_breakhis(tmp_path)
    scan = scan_breakhis(tmp_path, on_bad_file="skip")
    assert len(scan.records) == 3
    assert [Path(p).name for p, _ in scan.bad_files] == ["copy of image.png"]
    assert [Path(p).name for p in scan.ignored_files] == ["Thumbs.db"]
    assert data_stats(scan)["bad_files_skipped"] == 1


def test_file_outside_the_layout_is_an_error(tmp_path):
    _tree(tmp_path)
    stray = _png(tmp_path / A_DIR / "SOB_B_A-14-22549AB-40-009.png")  # no magnification folder
    with pytest.raises(BadDataError, match=f"{stray.name}: not in the BreakHis layout"):
        scan_breakhis(tmp_path)


def test_truncated_and_empty_images_are_found_at_scan_time(tmp_path):
    _tree(tmp_path)
    path = tmp_path / A_DIR / "40X" / "SOB_B_A-14-22549AB-40-001.png"
    _png(path, size=(64, 64))
    path.write_bytes(path.read_bytes()[:60])
    empty = tmp_path / DC_DIR / "400X" / "SOB_M_DC-14-2523-400-013.png"
    empty.write_bytes(b"")
    with pytest.raises(BadDataError, match="SOB_B_A-14-22549AB-40-001.png: unreadable"):
        load_image(path)
    with pytest.raises(BadDataError, match="2 bad file") as err:
        scan_breakhis(tmp_path)  # found without decoding: no verify_images needed
    assert "-40-001.png: corrupt or truncated PNG" in str(err.value)
    assert "-400-013.png: empty file (0 bytes)" in str(err.value)
    scan = scan_breakhis(tmp_path, on_bad_file="skip")
    assert [r.path.rsplit("/", 1)[1] for r in scan.records] == ["SOB_B_A-14-22549AB-100-002.png"]
    assert sorted(Path(p).name for p, _ in scan.bad_files) == sorted([empty.name, path.name])


def test_every_chunk_is_checked_and_bytes_after_the_end_are_fine(tmp_path):
    _tree(tmp_path)
    path = tmp_path / A_DIR / "40X" / "SOB_B_A-14-22549AB-40-001.png"
    _png(path, size=(64, 64))
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # a corrupt byte inside the image data; the file still ends on IEND
    path.write_bytes(bytes(data))
    with pytest.raises(BadDataError, match="-40-001.png: corrupt or truncated PNG"):
        scan_breakhis(tmp_path)  # every chunk's CRC is checked in either mode
    scan = scan_breakhis(tmp_path, on_bad_file="skip")
    assert len(scan.records) == 2 and "corrupt or truncated PNG" in scan.bad_files[0][1]
    trailing = tmp_path / A_DIR / "100X" / "SOB_B_A-14-22549AB-100-002.png"
    trailing.write_bytes(trailing.read_bytes() + b"\0" * 16)  # some encoders pad the file
    assert len(scan_breakhis(tmp_path, on_bad_file="skip").records) == 2


def test_image_size_is_never_asserted(tmp_path):
    _tree(tmp_path)
    scan = scan_breakhis(tmp_path, verify_images=True)  # 7x4 and 7x3 images both pass
    sizes = {load_image(scan.root / r.path).size for r in scan.records}
    assert sizes == {(7, 4), (7, 3)}


def test_missing_empty_and_treeless_roots(tmp_path):
    with pytest.raises(BadDataError, match="does not exist"):
        scan_breakhis(tmp_path / "nowhere")
    with pytest.raises(BadDataError, match="no BreakHis tree found"):
        scan_breakhis(tmp_path)
    (tmp_path / "BreaKHis_v1/histology_slides/breast/benign").mkdir(parents=True)
    with pytest.raises(BadDataError, match=r"no BreakHis images \(\*\.png\)"):
        scan_breakhis(tmp_path)


def test_folds_csv_with_missing_columns_or_bad_rows(tmp_path):
    bad = tmp_path / "Folds.csv"
    bad.write_text("fold,mag,filename\n1,40,a.png\n")
    with pytest.raises(BadDataError, match=r"Folds.csv: missing column\(s\) grp"):
        read_folds_csv(bad)
    bad.write_text("fold,mag,grp,filename\n1,40,train,a.png\n9,40,train,b.png\n")
    with pytest.raises(BadDataError, match="Folds.csv:3: bad row"):
        read_folds_csv(bad)
    _tree(tmp_path)  # a scan reading a broken Folds.csv fails too, naming it
    with pytest.raises(BadDataError, match="Folds.csv:3"):
        scan_breakhis(tmp_path)


def test_original_dsfold_files(tmp_path):
    paths = []
    for k in range(1, 6):
        p = tmp_path / f"dsfold{k}.txt"
        p.write_text(
            f"SOB_B_A-14-22549AB-40-001.png|40|{k}|train\n"
            f"SOB_M_DC-14-2523-400-013.png|400|{k}|test\n"
        )
        paths.append(p)
    table = read_dsfolds(paths)
    assert table.folds == [1, 2, 3, 4, 5]
    assert table.groups(3) == {
        "SOB_B_A-14-22549AB-40-001.png": "train",
        "SOB_M_DC-14-2523-400-013.png": "test",
    }
    _tree(tmp_path)
    assert scan_breakhis(tmp_path).folds.folds == [1, 2, 3, 4, 5]


def test_two_trees_under_one_root_is_an_error(tmp_path):
    _tree(tmp_path)
    shutil.copytree(tmp_path / "BreaKHis_v1" / "histology_slides", tmp_path / "histology_slides")
    with pytest.raises(BadDataError, match="several BreakHis trees"):
        scan_breakhis(tmp_path)


def test_scan_from_config_builds_and_reuses_the_replica(tmp_path):
    cache = tmp_path / "cache" / "synthetic"
    cfg = OmegaConf.structured(DataConfig(synthetic_fraction=0.01, synthetic_size=[16, 10]))
    scan = scan_from_config(cfg, cache)
    assert scan.root.parent == (tmp_path / "cache" / "synthetic").resolve()
    assert len(scan.records) == 328 - 4  # one image per folder and magnification, 13412 dropped
    assert scan_from_config(cfg, cache).root == scan.root
    cfg.root = str(tmp_path / "mine")  # an explicit folder is built once, then must match
    assert len(scan_from_config(cfg, cache).records) == 324
    cfg.synthetic_seed = 1
    with pytest.raises(BadDataError, match="built with other settings"):
        scan_from_config(cfg, cache)
    real = OmegaConf.structured(DataConfig(source="breakhis", root=None))
    with pytest.raises(BadDataError, match="data.root"):
        scan_from_config(real, cache)


def test_skipped_files_are_written_to_the_run_folder(tmp_path):
    _tree(tmp_path / "data")
    _png(tmp_path / "data" / A_DIR / "40X" / "oops.png")
    scan = scan_breakhis(tmp_path / "data", on_bad_file="skip")
    path = write_bad_files(scan, tmp_path / "run")
    lines = path.read_text().splitlines()
    assert lines[0] == "# 1 bad file(s) skipped (data.on_bad_file=skip)"
    assert lines[1] == "path,reason" and "oops.png" in lines[2]
    assert write_bad_files(BreakhisScan(tmp_path, []), tmp_path / "run2") is None
