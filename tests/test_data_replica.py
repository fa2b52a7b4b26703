"""The synthetic replica: real counts and names, Folds.csv, determinism, caching, class signal."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from breakhis_ft.config import SplitConfig
from breakhis_ft.data import synthetic
from breakhis_ft.data.breakhis import data_stats, load_image, scan_breakhis
from breakhis_ft.data.records import label_of
from breakhis_ft.data.splits import assign_splits

# docs/references.md: images per subtype and magnification, patients per subtype (both 13412 copies)
TABLE = {
    "adenosis": (4, 114, 113, 111, 106),
    "fibroadenoma": (10, 253, 260, 264, 237),
    "phyllodes_tumor": (3, 109, 121, 108, 115),
    "tubular_adenoma": (7, 149, 150, 140, 130),
    "ductal_carcinoma": (38, 864, 903, 896, 788),
    "lobular_carcinoma": (5, 156, 170, 163, 137),
    "mucinous_carcinoma": (9, 205, 222, 196, 169),
    "papillary_carcinoma": (6, 145, 142, 135, 138),
}


def _all_records(scan):
    return scan.records + scan.duplicates_dropped


@pytest.mark.slow  # builds the full-size replica (7,909 images)
def test_full_replica_matches_the_inventory(full_replica_scan):
    found = Counter(
        (r.subtype, Path(r.path).parts[-3], r.magnification)
        for r in _all_records(full_replica_scan)
    )
    expected = {(s, p, m): n for s, p, m, n in synthetic.read_inventory()}
    assert dict(found) == expected
    assert len(expected) == 328 and len({p for _, p, _ in expected}) == 82


@pytest.mark.slow  # builds the full-size replica (7,909 images)
def test_full_replica_matches_the_reference_table(full_replica_scan):
    records = _all_records(full_replica_scan)
    assert len(records) == 7909
    for subtype, (patients, *per_mag) in TABLE.items():
        mine = [r for r in records if r.subtype == subtype]
        assert len({r.patient for r in mine}) == patients, subtype
        assert [sum(r.magnification == m for r in mine) for m in (40, 100, 200, 400)] == per_mag
    stats = data_stats(full_replica_scan)
    assert stats["images"] == 7786 and stats["duplicates_dropped"] == 123
    assert stats["slides"] == 81 and stats["images_scanned"] == 7909
    assert stats["by_class"] == {"benign": 2480, "malignant": 5429 - 123}
    assert stats["by_magnification"] == {
        "40X": 1995 - 32,
        "100X": 2081 - 33,
        "200X": 2013 - 32,
        "400X": 1820 - 26,
    }
    assert stats["by_subtype"]["lobular_carcinoma"] == 626 - 123


@pytest.mark.slow  # builds the full-size replica (7,909 images)
def test_eva_counts_on_the_full_replica(full_replica_scan):
    cfg = SplitConfig(kind="eva", group_by="patient")
    splits = assign_splits(full_replica_scan.records, cfg, "eva4", [40])
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (1132, 339, 0)
    assert len({r.patient for r in splits["train"]}) == 50
    assert len({r.patient for r in splits["val"]}) == 14


@pytest.mark.slow  # builds the full-size replica (7,909 images)
def test_folds_csv_is_kaggle_format_and_by_patient(full_replica_root, full_replica_scan):
    with open(full_replica_root / "Folds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["fold", "mag", "grp", "filename"] and len(rows) == 5 * 7909
    assert all(r["filename"].startswith("BreaKHis_v1/histology_slides/breast/") for r in rows[:50])
    folds = full_replica_scan.folds
    patient_of = {
        Path(r.path).name: Path(r.path).parts[-3] for r in _all_records(full_replica_scan)
    }
    for fold in range(1, 6):
        groups = folds.groups(fold)
        assert set(groups) == set(patient_of)
        per_patient = defaultdict(set)
        for name, grp in groups.items():
            per_patient[patient_of[name]].add(grp)
        assert all(len(g) == 1 for g in per_patient.values())  # whole patient folders
        test_share = sum(g == "test" for g in groups.values()) / len(groups)
        assert 0.25 < test_share < 0.45, (fold, test_share)
    assert folds.groups(1) != folds.groups(2)


def test_replica_names_parse_and_sizes(replica_scan):
    assert len(replica_scan.records) > 300
    sizes = {load_image(replica_scan.root / r.path).size for r in replica_scan.records[:20]}
    assert sizes == {(48, 32)}


def test_build_is_deterministic_and_seeded(tmp_path):
    a = synthetic.build_replica(tmp_path / "a", 0.01, (24, 16), seed=3)
    b = synthetic.build_replica(tmp_path / "b", 0.01, (24, 16), seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    plan = synthetic.plan_replica(0.01)
    synthetic.write_folds_csv(tmp_path / "other.csv", plan, seed=4)
    assert (a / "Folds.csv").read_bytes() != (tmp_path / "other.csv").read_bytes()
    style = synthetic.STYLE["adenosis"]
    stain = synthetic.patient_stain(3, "22549AB")

    def render(seed):
        return synthetic.render_batch(style, stain, 40, (24, 16), 2, synthetic._rng(seed, "x"))

    assert np.array_equal(render(3), render(3)) and not np.array_equal(render(3), render(4))


def test_ensure_replica_builds_once_atomically(tmp_path, monkeypatch):
    root = synthetic.ensure_replica(tmp_path / "synthetic", 0.01, (16, 10), 0)
    assert root.parent == tmp_path / "synthetic" and (root / synthetic.MARKER).is_file()
    assert scan_breakhis(root).records
    built = [p.name for p in root.parent.iterdir() if p.suffix != ".lock"]  # the build lock stays
    assert built == [root.name]  # no temporary folder left

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached replica")

    monkeypatch.setattr(synthetic, "build_replica", fail)
    assert synthetic.ensure_replica(tmp_path / "synthetic", 0.01, (16, 10), 0) == root
    with pytest.raises(AssertionError, match="rebuilt"):  # other parameters: another replica
        synthetic.ensure_replica(tmp_path / "synthetic", 0.01, (16, 10), 1)
    built = [p.name for p in root.parent.iterdir() if p.suffix != ".lock"]
    assert built == [root.name]  # the failed build cleaned up


def test_bad_replica_parameters():
    with pytest.raises(ValueError, match="synthetic_fraction"):
        synthetic.plan_replica(0.0)
    with pytest.raises(ValueError, match="synthetic_size"):
        synthetic.build_replica("/nonexistent/never", 0.1, (0, 10))


def test_stain_varies_by_patient_not_by_call():
    a, b = synthetic.patient_stain(0, "22549AB"), synthetic.patient_stain(0, "22549CD")
    assert np.allclose(a["h"], synthetic.patient_stain(0, "22549AB")["h"])
    assert not np.allclose(a["h"], b["h"]) and a["kh"] != b["kh"]


def _features(image: np.ndarray) -> np.ndarray:
    """Colour-free texture statistics of the grey image (quantiles, contrast, edges)."""
    g = image.astype(np.float32).mean(-1) / 255
    q = np.quantile(g, [0.05, 0.25, 0.5, 0.75, 0.95]) - g.mean()
    edges = [np.abs(np.diff(g, axis=a)).mean() for a in (0, 1)]
    return np.r_[q, g.std(), edges, (g < g.mean() - 0.15).mean(), (g > g.mean() + 0.1).mean()]


def test_class_signal_is_learnable_across_patients(replica_scan):
    """A nearest-centroid on texture statistics beats chance on unseen patients, far from 100%."""
    splits = assign_splits(
        replica_scan.records, SplitConfig(ratios=[0.6, 0.0, 0.4]), "subtype8", [40, 100, 200, 400]
    )
    data = {}
    for name in ("train", "test"):
        recs = splits[name]
        x = np.stack([_features(np.asarray(load_image(replica_scan.root / r.path))) for r in recs])
        data[name] = x, np.array([label_of(r, "subtype8") for r in recs])
    (xt, yt), (xs, ys) = data["train"], data["test"]
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    centroids = np.stack([((xt - mu) / sd)[yt == c].mean(0) for c in range(8)])
    pred = ((((xs - mu) / sd)[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    balanced = np.mean([(pred[ys == c] == c).mean() for c in np.unique(ys)])
    assert 0.25 < balanced < 0.9, balanced  # chance is 0.125


def test_replica_is_never_written_into_a_folder_of_other_files(tmp_path):
    from breakhis_ft.tools import make_replica

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not empty and holds no replica"):
        make_replica.main([str(theirs), "--fraction", "0.01", "--size", "16", "10"])
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    built = tmp_path / "replica"
    assert make_replica.main([str(built), "--fraction", "0.01", "--size", "16", "10"]) == 0
    assert make_replica.main([str(built), "--fraction", "0.01", "--size", "16", "10"]) == 0  # again
    assert (built / synthetic.MARKER).is_file()
