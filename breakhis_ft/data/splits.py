"""Split records into train / val / test by patient group, under three protocols, leak-checked.

- `patient`: groups (slide stems by default) dealt to train/val/test by the ratios, stratified by
  each group's main subtype, seeded; with `n_folds > 1`, k-fold by group: fold `fold` is the test
  set and validation is carved out of the rest (`val_fraction`), the ratios are then unused.
- `official_fold`: Folds.csv fold k (its train/test groups), validation carved out of train by
  group (`val_fraction`). The official folds split by patient folder, so sibling slides can straddle
  train and test: with `group_by=stem` that is reported as a leak; `group_by=patient` accepts it.
- `eva`: kaiko-ai/eva's BreakHis protocol, 40X, TA/MC/F/DC, 14 fixed validation patients. eva has no
  test set: the validation set is `val` and `test` is left empty. Its patients are folder ids, so
  it needs `group_by=patient` (sibling slides such as 16184 / 16184CD straddle train and val).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from breakhis_ft.data.breakhis import BadDataError, FoldsTable
from breakhis_ft.data.records import ImageRecord, Task, as_task, label_of

SPLITS = ("train", "val", "test")
EVA_VAL_PATIENTS = frozenset(
    {
        "18842D",
        "19979",
        "15275",
        "15792",
        "16875",
        "3909",
        "5287",
        "16716",
        "2773",
        "5695",
        "16184CD",
        "23060CD",
        "21998CD",
        "21998EF",
    }
)


class SplitLeakError(ValueError):
    """A patient group found in more than one split."""


def group_key(record: ImageRecord, group_by: str) -> str:
    """The group of a record: its slide stem (siblings together) or its patient folder id."""
    if group_by == "stem":
        return record.stem
    if group_by == "patient":
        return record.patient
    raise ValueError(f"split.group_by={group_by!r}: allowed values are stem, patient")


def duplicate_patients(records: Sequence[ImageRecord]) -> set[str]:
    """Patients filed under several subtypes (slide 13412 with `data.duplicate_keep=both`)."""
    subtypes: dict[str, set[str]] = defaultdict(set)
    for r in records:
        subtypes[r.patient].add(r.subtype)
    return {p for p, subs in subtypes.items() if len(subs) > 1}


def duplicate_leaks(splits: dict[str, list[ImageRecord]]) -> dict[str, int]:
    """Images of val / test whose identical copy (same patient, magnification and number, filed
    under another subtype) is in train: the leak `data.duplicate_keep=both` lets through."""
    twins = duplicate_patients([r for records in splits.values() for r in records])
    in_train = {
        (r.patient, r.magnification, r.seq) for r in splits.get("train", []) if r.patient in twins
    }
    return {
        name: sum((r.patient, r.magnification, r.seq) in in_train for r in splits.get(name, []))
        for name in ("val", "test")
    }


def check_no_leak(splits: dict[str, list[ImageRecord]], group_by: str, hint: str = "") -> None:
    """Raise SplitLeakError naming every group that appears in more than one split.

    A patient filed under several subtypes (only kept with `data.duplicate_keep=both`) is the
    leak that switch asks for: it is counted by `duplicate_leaks`, not refused."""
    where: dict[str, set[str]] = defaultdict(set)
    known = duplicate_patients([r for records in splits.values() for r in records])
    for name, records in splits.items():
        for r in records:
            if r.patient not in known:
                where[group_key(r, group_by)].add(name)
    leaks = {g: sorted(s) for g, s in where.items() if len(s) > 1}
    if leaks:
        listed = "; ".join(f"{g} in {' and '.join(s)}" for g, s in sorted(leaks.items())[:10])
        raise SplitLeakError(
            f"patient groups leak between splits (split.group_by={group_by}): {listed}"
            + (f" ({len(leaks)} groups)" if len(leaks) > 10 else "")
            + (f". {hint}" if hint else "")
        )


def _get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def _groups(records: Sequence[ImageRecord], group_by: str) -> dict[str, list[ImageRecord]]:
    out: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        out[group_key(r, group_by)].append(r)
    return dict(sorted(out.items()))


def _allocate(
    groups: dict[str, list[ImageRecord]], shares: dict[str, float], rng: np.random.Generator
) -> dict[str, str]:
    """Deal groups to splits by image shares, within each stratum (the group's main subtype).

    Each stratum's groups, in random order, go to the split furthest below its share; while a
    split with a share has none of the stratum and no more groups than such splits remain, the
    group goes to one of them, so rare subtypes reach every split that their groups allow.
    """
    active = [s for s in shares if shares[s] > 0]
    strata: dict[str, list[str]] = defaultdict(list)
    for g, recs in groups.items():
        strata[Counter(r.subtype for r in recs).most_common(1)[0][0]].append(g)
    out = {}
    for stratum in sorted(strata):
        members = [strata[stratum][i] for i in rng.permutation(len(strata[stratum]))]
        images = dict.fromkeys(active, 0)
        n_groups = dict.fromkeys(active, 0)
        total = 0
        for i, g in enumerate(members):
            total += len(groups[g])
            empty = [s for s in active if n_groups[s] == 0]
            pool = empty if empty and len(members) - i <= len(empty) else active
            # order of preference on ties: as listed in shares (train, test, val)
            best = max(pool, key=lambda s: (shares[s] * total - images[s], -active.index(s)))
            out[g] = best
            images[best] += len(groups[g])
            n_groups[best] += 1
    return out


def _by_assignment(groups, assignment: dict[str, str]) -> dict[str, list[ImageRecord]]:
    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for g, recs in groups.items():
        out[assignment[g]].extend(recs)
    return out


def _carve_val(train: list[ImageRecord], fraction: float, group_by: str, rng) -> tuple[list, list]:
    """Move a `fraction` of train's images (whole groups, stratified) to validation."""
    if fraction <= 0:
        return train, []
    groups = _groups(train, group_by)
    assignment = _allocate(groups, {"train": 1 - fraction, "val": fraction}, rng)
    parts = _by_assignment(groups, assignment)
    return parts["train"], parts["val"]


def _kfold(groups, n_folds: int, rng) -> dict[str, int]:
    """Deal groups to n folds, per stratum, biggest first, each to the fold with fewest images."""
    strata: dict[str, list[str]] = defaultdict(list)
    for g, recs in groups.items():
        strata[Counter(r.subtype for r in recs).most_common(1)[0][0]].append(g)
    fold_of, totals = {}, [0] * n_folds
    for stratum in sorted(strata):
        members = [strata[stratum][i] for i in rng.permutation(len(strata[stratum]))]
        members.sort(key=lambda g: -len(groups[g]))  # stable: ties keep the random order
        sizes = [0] * n_folds
        for g in members:  # fewest of this stratum, then fewest overall (rare strata spread out)
            k = min(range(n_folds), key=lambda j: (sizes[j], totals[j], j))
            fold_of[g] = k + 1
            sizes[k] += len(groups[g])
            totals[k] += len(groups[g])
    return fold_of


def _patient(records, cfg, group_by, rng) -> dict[str, list[ImageRecord]]:
    groups = _groups(records, group_by)
    n_folds, fold = int(_get(cfg, "n_folds")), int(_get(cfg, "fold"))
    if n_folds > 1:
        if not 1 <= fold <= n_folds:
            raise ValueError(f"split.fold={fold}: must be in 1..{n_folds} (split.n_folds)")
        if len(groups) < n_folds:
            raise ValueError(f"split.n_folds={n_folds}: only {len(groups)} patient groups")
        fold_of = _kfold(groups, n_folds, rng)
        test = [r for g, recs in groups.items() if fold_of[g] == fold for r in recs]
        rest = [r for g, recs in groups.items() if fold_of[g] != fold for r in recs]
        train, val = _carve_val(rest, float(_get(cfg, "val_fraction")), group_by, rng)
        return {"train": train, "val": val, "test": test}
    ratios = [float(x) for x in _get(cfg, "ratios")]
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"split.ratios={ratios}: three non-negative shares summing to 1")
    shares = {"train": ratios[0], "test": ratios[2], "val": ratios[1]}
    return _by_assignment(groups, _allocate(groups, shares, rng))


def _official_fold(records, cfg, group_by, rng, folds: FoldsTable | None):
    if folds is None:
        raise BadDataError(
            "split=official_fold needs the official folds: a Folds.csv (Kaggle copy) or "
            "dsfold1..5.txt under data.root; none was found"
        )
    fold = int(_get(cfg, "fold"))
    if fold not in folds.folds:
        raise ValueError(f"split.fold={fold}: {folds.source} has folds {folds.folds}")
    grp = folds.groups(fold)
    missing = [r.path for r in records if r.path.rsplit("/", 1)[-1] not in grp]
    if missing:
        raise BadDataError(
            f"{folds.source}: fold {fold} has no row for {len(missing)} image(s), e.g. "
            + ", ".join(missing[:5])
        )
    train = [r for r in records if grp[r.path.rsplit("/", 1)[-1]] == "train"]
    test = [r for r in records if grp[r.path.rsplit("/", 1)[-1]] == "test"]
    check_no_leak(
        {"train": train, "test": test},
        group_by,
        hint=f"The official fold {fold} splits patient folders, not stems: set "
        "split.group_by=patient to accept its grouping",
    )
    train, val = _carve_val(train, float(_get(cfg, "val_fraction")), group_by, rng)
    return {"train": train, "val": val, "test": test}


def _eva(records, task: Task, factors: Sequence[int]) -> dict[str, list[ImageRecord]]:
    if task.name != "eva4" or list(factors) != [40]:
        raise ValueError(
            f"split=eva is eva's protocol: task=eva4 at magnification=40x (got task={task.name}, "
            f"magnification factors {list(factors)})"
        )
    val = [r for r in records if r.patient in EVA_VAL_PATIENTS]
    train = [r for r in records if r.patient not in EVA_VAL_PATIENTS]
    return {"train": train, "val": val, "test": []}


def balance_binary(
    records: list[ImageRecord], ratio: float, rng: np.random.Generator
) -> list[ImageRecord]:
    """Undersample so that malignant:benign is at most `ratio`:1 and at least that (blog: 1.0)."""
    if ratio <= 0:
        raise ValueError(f"split.balance_binary={ratio}: must be positive (malignant per benign)")
    benign = [r for r in records if r.tumor_class == "benign"]
    malignant = [r for r in records if r.tumor_class == "malignant"]
    if len(malignant) > ratio * len(benign):
        malignant = [
            malignant[i] for i in rng.permutation(len(malignant))[: round(ratio * len(benign))]
        ]
    else:
        benign = [benign[i] for i in rng.permutation(len(benign))[: round(len(malignant) / ratio)]]
    return sorted(benign + malignant, key=lambda r: r.path)


def assign_splits(
    records: Sequence[ImageRecord],
    split_cfg: Any,
    task: Task | str,
    factors: Sequence[int],
    folds: FoldsTable | None = None,
) -> dict[str, list[ImageRecord]]:
    """Records -> {train, val, test} under `split_cfg` (SplitConfig or DictConfig), leak-checked."""
    task = as_task(task)
    kind, group_by = _get(split_cfg, "kind"), _get(split_cfg, "group_by")
    if group_by not in ("stem", "patient"):
        raise ValueError(f"split.group_by={group_by!r}: allowed values are stem, patient")
    chosen = [r for r in records if r.magnification in factors and label_of(r, task) is not None]
    if not chosen:
        raise BadDataError(
            f"no images left for task={task.name} at magnifications {list(factors)} "
            f"(out of {len(records)} records)"
        )
    rng = np.random.default_rng([int(_get(split_cfg, "seed")), 20160901])
    hint = ""
    if kind == "patient":
        splits = _patient(chosen, split_cfg, group_by, rng)
    elif kind == "official_fold":
        splits = _official_fold(chosen, split_cfg, group_by, rng, folds)
    elif kind == "eva":
        splits = _eva(chosen, task, factors)
        hint = "eva fixes its validation patients by folder id: set split.group_by=patient"
    else:
        raise ValueError(f"split.kind={kind!r}: allowed values are patient, official_fold, eva")
    check_no_leak(splits, group_by, hint)
    ratio = _get(split_cfg, "balance_binary")
    for name in _get(split_cfg, "balance_splits") if ratio is not None else []:
        if name not in SPLITS:
            raise ValueError(f"split.balance_splits: {name!r} is not one of {', '.join(SPLITS)}")
        splits[name] = balance_binary(
            splits[name],
            float(ratio),
            np.random.default_rng([int(_get(split_cfg, "seed")), SPLITS.index(name)]),
        )
    if not splits["train"]:
        raise BadDataError(f"split={kind}: the training split is empty ({len(chosen)} images)")
    return {s: sorted(splits[s], key=lambda r: r.path) for s in SPLITS}


def split_rows(splits: dict[str, list[ImageRecord]], task: Task | str) -> list[dict]:
    """One row per image (split, label and the record's fields), e.g. for splits.csv."""
    return [
        {"split": name, "label": label_of(r, task), **r.as_dict()}
        for name in SPLITS
        for r in splits.get(name, [])
    ]


def split_summary(splits: dict[str, list[ImageRecord]], task: Task | str) -> dict:
    """Images, patients and per-class counts of each split."""
    return {
        name: {
            "images": len(recs),
            "patients": len({r.patient for r in recs}),
            "stems": len({r.stem for r in recs}),
            "by_label": dict(sorted(Counter(label_of(r, task) for r in recs).items())),
        }
        for name, recs in splits.items()
    }
