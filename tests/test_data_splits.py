"""Splits by patient group: every kind, leak checks, k-fold, official folds, eva, balancing."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from breakhis_ft.config import SplitConfig
from breakhis_ft.data.breakhis import BadDataError, FoldsTable
from breakhis_ft.data.splits import (
    EVA_VAL_PATIENTS,
    SPLITS,
    SplitLeakError,
    assign_splits,
    check_no_leak,
    split_coverage,
    split_rows,
    split_summary,
    straddle_warning,
    straddling_stems,
)

ALL = [40, 100, 200, 400]


def _paths(records):
    return [r.path for r in records]


def _disjoint(splits, attr):
    sets = [{getattr(r, attr) for r in splits[s]} for s in SPLITS]
    return all(not (sets[i] & sets[j]) for i in range(3) for j in range(i + 1, 3))


def test_patient_split_by_stem(replica_scan):
    records = replica_scan.records
    splits = assign_splits(records, SplitConfig(), "subtype8", ALL)
    assert sorted(sum((_paths(splits[s]) for s in SPLITS), [])) == sorted(_paths(records))
    assert _disjoint(splits, "stem")  # sibling slides (22549AB/CD/G) never straddle
    shares = [len(splits[s]) / len(records) for s in SPLITS]
    assert 0.55 < shares[0] < 0.85 and shares[1] > 0.05 and shares[2] > 0.05, shares
    # stratified: most subtypes reach the test split despite few patients
    assert len({r.subtype for r in splits["test"]}) >= 6
    again = assign_splits(records, SplitConfig(), "subtype8", ALL)
    assert all(_paths(again[s]) == _paths(splits[s]) for s in SPLITS)
    other = assign_splits(records, SplitConfig(seed=1), "subtype8", ALL)
    assert _paths(other["test"]) != _paths(splits["test"])


def test_patient_split_by_patient_folder_and_dictconfig(replica_scan):
    cfg = OmegaConf.structured(SplitConfig(group_by="patient", ratios=[0.5, 0.25, 0.25]))
    splits = assign_splits(replica_scan.records, cfg, "binary", [100])
    assert _disjoint(splits, "patient")
    assert all(r.magnification == 100 for s in SPLITS for r in splits[s])
    assert len(splits["train"]) < 0.7 * sum(len(splits[s]) for s in SPLITS)


def test_task_and_magnification_filter(replica_scan):
    splits = assign_splits(replica_scan.records, SplitConfig(), "eva4", [40, 400])
    chosen = [r for s in SPLITS for r in splits[s]]
    assert {r.subtype for r in chosen} == {
        "tubular_adenoma",
        "mucinous_carcinoma",
        "fibroadenoma",
        "ductal_carcinoma",
    }
    assert {r.magnification for r in chosen} == {40, 400}
    rows = split_rows(splits, "eva4")
    assert len(rows) == len(chosen) and {row["split"] for row in rows} == set(SPLITS)
    assert all(row["label"] in range(4) for row in rows)
    summary = split_summary(splits, "eva4")
    assert sum(v["images"] for v in summary.values()) == len(chosen)


def test_kfold_covers_every_group_once(replica_scan):
    tests, seen = [], set()
    for fold in range(1, 6):
        cfg = SplitConfig(n_folds=5, fold=fold, val_fraction=0.2)
        splits = assign_splits(replica_scan.records, cfg, "subtype8", ALL)
        assert _disjoint(splits, "stem") and splits["val"]
        tests.append(set(_paths(splits["test"])))
        seen |= {r.stem for r in splits["test"]}
    assert all(not (tests[i] & tests[j]) for i in range(5) for j in range(i + 1, 5))
    assert set().union(*tests) == set(_paths(replica_scan.records))
    sizes = [len(t) for t in tests]
    assert max(sizes) < 2 * min(sizes), sizes
    with pytest.raises(ValueError, match="split.fold=6"):
        assign_splits(replica_scan.records, SplitConfig(n_folds=5, fold=6), "subtype8", ALL)


def test_official_fold_follows_folds_csv(replica_scan):
    cfg = SplitConfig(kind="official_fold", group_by="patient", fold=2, val_fraction=0.2)
    splits = assign_splits(replica_scan.records, cfg, "binary", [100], replica_scan.folds)
    grp = replica_scan.folds.groups(2)
    name = lambda r: r.path.rsplit("/", 1)[-1]  # noqa: E731
    assert all(grp[name(r)] == "test" for r in splits["test"])
    assert all(grp[name(r)] == "train" for r in splits["train"] + splits["val"])
    expected_test = [
        r for r in replica_scan.records if r.magnification == 100 and grp[name(r)] == "test"
    ]
    assert _paths(splits["test"]) == sorted(_paths(expected_test))
    assert splits["val"] and _disjoint(splits, "patient")
    # the 13412 duplicate is gone before the split: only the ductal copy can appear
    assert {r.subtype for s in SPLITS for r in splits[s] if r.patient == "13412"} <= {
        "ductal_carcinoma"
    }


def test_official_fold_stem_leak_is_reported(replica_scan):
    cfg = SplitConfig(kind="official_fold", group_by="stem", fold=1)
    with pytest.raises(SplitLeakError, match="set split.group_by=patient") as e:
        assign_splits(replica_scan.records, cfg, "binary", ALL, replica_scan.folds)
    assert "in test and train" in str(e.value)


def test_official_fold_needs_folds_with_every_image(replica_scan):
    cfg = SplitConfig(kind="official_fold", group_by="patient")
    with pytest.raises(BadDataError, match="needs the official folds"):
        assign_splits(replica_scan.records, cfg, "binary", ALL, None)
    partial = FoldsTable("partial.csv", [row for row in replica_scan.folds.rows if row[1] != 200])
    with pytest.raises(BadDataError, match=r"partial.csv: fold 1 has no row for \d+ image"):
        assign_splits(replica_scan.records, cfg, "binary", ALL, partial)


def test_eva_protocol(replica_scan):
    cfg = SplitConfig(kind="eva", group_by="patient")
    splits = assign_splits(replica_scan.records, cfg, "eva4", [40])
    assert splits["test"] == [] and splits["val"] and splits["train"]
    assert {r.patient for r in splits["val"]} <= EVA_VAL_PATIENTS
    assert {"16184CD", "23060CD", "21998CD", "21998EF"} <= EVA_VAL_PATIENTS
    with pytest.raises(SplitLeakError, match="16184 in train and val.*group_by=patient"):
        assign_splits(replica_scan.records, replace(cfg, group_by="stem"), "eva4", [40])
    with pytest.raises(ValueError, match="task=eva4 at magnification=40x"):
        assign_splits(replica_scan.records, cfg, "subtype8", [40])


def test_eva_names_its_validation_patients_missing_from_the_data(replica_scan, caplog):
    cfg = SplitConfig(kind="eva", group_by="patient")
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.data.splits"):
        assign_splits(replica_scan.records, cfg, "eva4", [40])
    assert "split=eva" not in caplog.text  # the replica has every folder: nothing missing
    gone = {"3909", "21998EF"}
    fewer = [r for r in replica_scan.records if r.patient not in gone]
    with caplog.at_level(logging.WARNING, logger="breakhis_ft.data.splits"):
        splits = assign_splits(fewer, cfg, "eva4", [40])
    assert "2 of eva's 14 validation patients are missing from the data (21998EF, 3909)" in (
        caplog.text
    )
    assert {r.patient for r in splits["val"]} == EVA_VAL_PATIENTS - gone
    none = [r for r in replica_scan.records if r.patient not in EVA_VAL_PATIENTS]
    with pytest.raises(BadDataError, match="split=eva: none of eva's 14 validation patients"):
        assign_splits(none, cfg, "eva4", [40])


def test_official_folds_let_sibling_slides_straddle_and_count_them(replica_scan):
    cfg = SplitConfig(kind="official_fold", group_by="patient", fold=1)
    splits = assign_splits(replica_scan.records, cfg, "subtype8", ALL, replica_scan.folds)
    straddling = straddling_stems(splits)
    by_hand = {}
    for stem in {r.stem for records in splits.values() for r in records}:
        where = [name for name in SPLITS if any(r.stem == stem for r in splits[name])]
        if len(where) > 1:
            by_hand[stem] = where
    assert straddling == by_hand and "22549" in straddling  # 22549AB/CD/G: folders apart
    coverage = split_coverage(splits, "subtype8", cfg)
    assert coverage["straddling_stems"] == {"count": len(by_hand), "stems": by_hand}
    assert f"{len(by_hand)} stem(s) have sibling slides in more than one split" in (
        straddle_warning(coverage)
    )
    # split=patient groups by stem: nothing straddles, nothing to warn about
    kept = assign_splits(replica_scan.records, SplitConfig(), "subtype8", ALL)
    assert straddling_stems(kept) == {}
    assert straddle_warning(split_coverage(kept, "subtype8", SplitConfig())) is None


def test_check_no_leak_names_the_group(replica_scan):
    a, b = [r for r in replica_scan.records if r.patient == "22549AB"][:2]
    check_no_leak({"train": [a], "val": [], "test": []}, "stem")
    with pytest.raises(SplitLeakError, match="22549 in test and train"):
        check_no_leak({"train": [a], "val": [], "test": [b]}, "stem")
    sibling = next(r for r in replica_scan.records if r.patient == "22549CD")
    check_no_leak({"train": [a], "test": [sibling]}, "patient")
    with pytest.raises(SplitLeakError, match="22549 in test and train"):
        check_no_leak({"train": [a], "test": [sibling]}, "stem")


def test_binary_balancing_only_where_asked(replica_scan):
    cfg = SplitConfig(balance_binary=1.0, balance_splits=["train"])
    plain = assign_splits(replica_scan.records, SplitConfig(), "subtype8", ALL)
    splits = assign_splits(replica_scan.records, cfg, "subtype8", ALL)
    counts = Counter(r.tumor_class for r in splits["train"])
    assert counts["benign"] == counts["malignant"] > 0
    assert set(_paths(splits["train"])) <= set(_paths(plain["train"]))
    assert _paths(splits["test"]) == _paths(plain["test"])
    two = assign_splits(replica_scan.records, replace(cfg, balance_binary=2.0), "binary", ALL)
    c2 = Counter(r.tumor_class for r in two["train"])
    assert abs(c2["malignant"] - 2 * c2["benign"]) <= 1
    with pytest.raises(ValueError, match="balance_splits"):
        assign_splits(replica_scan.records, replace(cfg, balance_splits=["dev"]), "binary", ALL)


def test_bad_split_settings(replica_scan):
    recs = replica_scan.records
    order = [r.path for r in recs]
    with pytest.raises(ValueError, match="split.kind='random'"):
        assign_splits(recs, SplitConfig(kind="random"), "binary", ALL)
    with pytest.raises(ValueError, match="split.group_by='slide'"):
        assign_splits(recs, SplitConfig(group_by="slide"), "binary", ALL)
    with pytest.raises(ValueError, match="split.ratios"):
        assign_splits(recs, SplitConfig(ratios=[0.5, 0.5, 0.5]), "binary", ALL)
    with pytest.raises(BadDataError, match="no images left"):
        assign_splits([r for r in recs if r.subtype == "adenosis"], SplitConfig(), "eva4", ALL)
    with pytest.raises(ValueError, match=r"split.n_folds=100000: only \d+ patient groups"):
        assign_splits(recs, SplitConfig(n_folds=100_000), "binary", ALL)
    with pytest.raises(ValueError, match=r"split.balance_binary=0.0: must be positive"):
        assign_splits(recs, SplitConfig(balance_binary=0.0), "binary", ALL)
    assert [r.path for r in recs] == order  # refused settings leave the scan's records untouched
