"""Split records into train / val / test by patient group, under three protocols, leak-checked.

- `patient`: a stratified group split. Groups (slide stems by default; a stem filed under two
  classes is one group) are dealt whole to train/val/test so that each split's image share is
  within RATIO_TOLERANCE of `ratios` where the groups allow, every class is in train, each class
  reaches val and test as far as its groups allow, and the class mix of each split is close to
  the whole's (`_Targets`): a seeded search (`_deal`), reproducible from `seed`. With
  `n_folds > 1`, k-fold by group on the same footing: a class's only group stays in train in every
  fold, the others are dealt to equal folds, each class in two folds or more (so in train whatever
  the test fold); fold `fold` is the test set and validation (`val_fraction`) is dealt out of the
  rest in the same way; the ratios are then unused. scikit-learn's StratifiedGroupKFold, the test
  oracle, does not keep every class in train, nor deals unequal shares.
- `official_fold`: Folds.csv fold k (its train/test groups), validation carved out of train by
  group (`val_fraction`; `_carve_val`, kept exact: a published protocol's). The official folds
  split by patient folder, so sibling slides can straddle train and test: with `group_by=stem`
  that is reported as a leak; `group_by=patient` accepts it.
- `eva`: kaiko-ai/eva's BreakHis protocol, 40X, TA/MC/F/DC, 14 fixed validation patients. eva has no
  test set: the validation set is `val` and `test` is left empty. Its patients are folder ids, so
  it needs `group_by=patient` (sibling slides such as 16184 / 16184CD straddle train and val).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from breakhis_ft.data.breakhis import BadDataError, FoldsTable
from breakhis_ft.data.records import ImageRecord, Task, as_task, label_of
from breakhis_ft.errors import SplitLeakError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# split=patient: how far (absolute share of the images) each split's share may stray from the one
# asked before the dealing gives up class coverage for it; measured on the replica reduced to a
# few stems per class (tests/test_split_coverage.py) and on the full one
RATIO_TOLERANCE = 0.05
SEARCH_STARTS = 8  # seeded random starts of the search that deals groups to splits or folds
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


def _get_or(cfg: Any, key: str, default: Any) -> Any:
    """A config value, or `default` where the config lacks the key."""
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def _groups(records: Sequence[ImageRecord], group_by: str) -> dict[str, list[ImageRecord]]:
    out: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        out[group_key(r, group_by)].append(r)
    return dict(sorted(out.items()))


def _allocate(
    groups: dict[str, list[ImageRecord]], shares: dict[str, float], rng: np.random.Generator
) -> dict[str, str]:
    """official_fold's validation carve: groups to splits by image shares, within each stratum
    (the group's main subtype).

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


def _class_counts(groups: dict[str, list[ImageRecord]], task: Task) -> np.ndarray:
    """Images per (group, class of the task): groups x classes."""
    counts = np.zeros((len(groups), len(task.classes)))
    for i, recs in enumerate(groups.values()):
        for r in recs:
            counts[i, task.label_of(r)] += 1
    return counts


@dataclass(frozen=True)
class _Targets:
    """What a dealing of groups into bins aims at, and its score (lower is better).

    By weight: a hard rule (ratio mode: every class in the train bin; k-fold: every class outside
    each fold, i.e. in two folds or more), each bin's image share within RATIO_TOLERANCE of its
    asked share, each class in as many bins as its groups allow, then the squared gaps to the
    shares, per class and overall (the stratification). One number per dealing, so that every
    possible move is scored at once.
    """

    shares: np.ndarray  # per bin: the asked share of the images (sums to 1)
    totals: np.ndarray  # per class: its images in the groups dealt
    reach: np.ndarray  # per class: the bins it can be in (its groups, at most the bins)
    train_bin: int | None  # ratio mode: the bin that must hold every class; k-fold: None

    def score(self, bins: np.ndarray) -> np.ndarray:
        """Scores of dealings given as images per (bin, class), shape (..., bins, classes)."""
        present = bins > 0
        sizes = bins.sum(-1) / self.totals.sum()
        if self.train_bin is not None:
            hard = (~present[..., self.train_bin, :] & (self.totals > 0)).sum(-1)
        else:
            hard = ((present.sum(-2) < 2) & (self.reach >= 2)).sum(-1)
        excess = np.clip(np.abs(sizes - self.shares) - RATIO_TOLERANCE, 0, None).sum(-1)
        cover = np.clip(self.reach - present.sum(-2), 0, None).sum(-1)
        gaps = (bins - self.shares[:, None] * self.totals) / np.maximum(self.totals, 1)
        fine = (gaps**2).mean((-2, -1)) + ((sizes - self.shares) ** 2).sum(-1)
        return 1e6 * hard + 1e5 * excess + 10.0 * cover + fine


def _targets(counts: np.ndarray, shares: list[float], train_bin: int | None) -> _Targets:
    """The targets of dealing the groups of `counts` (groups x classes) into `shares`."""
    return _Targets(
        shares=np.asarray(shares, dtype=float),
        totals=counts.sum(0),
        reach=np.minimum((counts > 0).sum(0), len(shares)),
        train_bin=train_bin,
    )


def _descend(
    counts: np.ndarray, targets: _Targets, assign: np.ndarray, swaps: bool
) -> tuple[np.ndarray, float]:
    """Steepest descent from a dealing: move one group to another bin (or, with `swaps`, where no
    move helps, swap two groups' bins) while that lowers the score; (the dealing, its score)."""
    n_groups, n_bins = counts.shape[0], len(targets.shares)
    one_hot = np.eye(n_bins)
    assign = assign.copy()
    bins = one_hot[assign].T @ counts
    score = float(targets.score(bins))
    for _ in range(4 * n_groups):
        # every group g moved to every bin b: (groups, bins, bins, classes)
        change = (one_hot[None, :, :] - one_hot[assign][:, None, :])[..., None]
        moves = targets.score(bins + change * counts[:, None, None, :])
        g, b = np.unravel_index(int(np.argmin(moves)), moves.shape)
        if moves[g, b] < score - 1e-12:
            bins += change[g, b] * counts[g]
            assign[g], score = b, float(moves[g, b])
            continue
        if not swaps:
            break
        # every pair of groups g, h swapping their bins: (groups, groups, bins, classes)
        side = (one_hot[assign][:, None, :] - one_hot[assign][None, :, :])[..., None]
        trial = targets.score(bins + side * (counts[None, :, None] - counts[:, None, None]))
        g, h = np.unravel_index(int(np.argmin(trial)), trial.shape)
        if trial[g, h] >= score - 1e-12:
            break
        bins += side[g, h] * (counts[h] - counts[g])
        assign[g], assign[h] = assign[h], assign[g]
        score = float(trial[g, h])
    return assign, score


def _deal(counts: np.ndarray, targets: _Targets, rng: np.random.Generator) -> np.ndarray:
    """The bin of each group (row of `counts`), searched from SEARCH_STARTS seeded starts.

    A start deals the groups roughly biggest first (sizes scaled by seeded random factors), each
    to the bin that scores best so far (`_Targets.score`), then moves single groups while that
    lowers the score. The best start is then improved by moves and swaps of two groups. The
    random factors make the result depend on the seed, and only on it.
    """
    n_groups, n_bins = counts.shape[0], len(targets.shares)
    one_hot = np.eye(n_bins)
    best, best_score = np.zeros(n_groups, int), np.inf
    for _ in range(SEARCH_STARTS):
        assign = np.zeros(n_groups, int)
        bins = np.zeros((n_bins, counts.shape[1]))
        for g in np.argsort(-counts.sum(1) * rng.lognormal(0, 0.5, n_groups), kind="stable"):
            b = int(np.argmin(targets.score(bins + one_hot[:, :, None] * counts[g])))
            assign[g], bins[b] = b, bins[b] + counts[g]
        assign, score = _descend(counts, targets, assign, swaps=False)
        if score < best_score - 1e-12:
            best, best_score = assign, score
    return _descend(counts, targets, best, swaps=True)[0]


def _stratified(
    groups: dict[str, list[ImageRecord]], shares: dict[str, float], task: Task, rng
) -> dict[str, list[ImageRecord]]:
    """Whole groups dealt to the splits of `shares` (the first one is train): see `_Targets`."""
    out: dict[str, list[ImageRecord]] = {s: [] for s in shares}
    active = [s for s in shares if shares[s] > 0]
    counts = _class_counts(groups, task)
    bins = _deal(counts, _targets(counts, [shares[s] for s in active], 0), rng)
    for b, recs in zip(bins, groups.values(), strict=True):
        out[active[b]].extend(recs)
    return out


def _train_only(groups: dict[str, list[ImageRecord]], task: Task) -> set[str]:
    """The groups holding a class that no other group has: k-fold keeps them in train."""
    counts = _class_counts(groups, task)
    single = (counts > 0).sum(0) == 1
    return {g for g, row in zip(groups, counts, strict=True) if (row[single] > 0).any()}


def _kfold(groups: dict[str, list[ImageRecord]], n_folds: int, task: Task, rng) -> dict[str, int]:
    """The fold (1..n_folds) of each group; 0 for the groups kept in train (`_train_only`)."""
    kept = _train_only(groups, task)
    dealt = {g: recs for g, recs in groups.items() if g not in kept}
    if len(dealt) < n_folds:
        raise ValueError(
            f"split.n_folds={n_folds}: only {len(dealt)} patient groups to deal to folds "
            f"({len(kept)} more are kept in train: they hold a class no other group has)"
        )
    counts = _class_counts(dealt, task)
    bins = _deal(counts, _targets(counts, [1 / n_folds] * n_folds, None), rng)
    return {**dict.fromkeys(kept, 0), **{g: int(b) + 1 for g, b in zip(dealt, bins, strict=True)}}


def _patient(records, cfg, group_by, task: Task, rng) -> dict[str, list[ImageRecord]]:
    groups = _groups(records, group_by)
    n_folds, fold = int(_get(cfg, "n_folds")), int(_get(cfg, "fold"))
    if n_folds > 1:
        if not 1 <= fold <= n_folds:
            raise ValueError(f"split.fold={fold}: must be in 1..{n_folds} (split.n_folds)")
        if len(groups) < n_folds:
            raise ValueError(f"split.n_folds={n_folds}: only {len(groups)} patient groups")
        fold_of = _kfold(groups, n_folds, task, rng)
        test = [r for g, recs in groups.items() if fold_of[g] == fold for r in recs]
        rest = {g: recs for g, recs in groups.items() if fold_of[g] != fold}
        fraction = float(_get(cfg, "val_fraction"))
        parts = _stratified(rest, {"train": 1 - fraction, "val": fraction}, task, rng)
        return {"train": parts["train"], "val": parts["val"], "test": test}
    ratios = [float(x) for x in _get(cfg, "ratios")]
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"split.ratios={ratios}: three non-negative shares summing to 1")
    return _stratified(groups, {"train": ratios[0], "val": ratios[1], "test": ratios[2]}, task, rng)


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
    check_eva_patients({r.patient for r in records})
    val = [r for r in records if r.patient in EVA_VAL_PATIENTS]
    train = [r for r in records if r.patient not in EVA_VAL_PATIENTS]
    return {"train": train, "val": val, "test": []}


def check_eva_patients(present: set[str]) -> list[str]:
    """eva's validation patients missing from the data (TA/MC/F/DC at 40X), warned; none of them
    present is an error (eva's validation set would be empty)."""
    missing = sorted(EVA_VAL_PATIENTS - present)
    if len(missing) == len(EVA_VAL_PATIENTS):
        raise BadDataError(
            f"split=eva: none of eva's {len(EVA_VAL_PATIENTS)} validation patients "
            f"({', '.join(sorted(EVA_VAL_PATIENTS))}) has an image of task=eva4 at 40X in the "
            "data: check data.root (the full BreakHis, slide folders as distributed)"
        )
    if missing:
        log.warning(
            "split=eva: %d of eva's %d validation patients are missing from the data (%s): the "
            "validation set is smaller than eva's, so its figures do not compare with eva's",
            len(missing),
            len(EVA_VAL_PATIENTS),
            ", ".join(missing),
        )
    return missing


Pick = Callable[[int, int], np.ndarray]  # (n rows, k kept) -> the rows kept, in draw order


def seeded_pick(rng: np.random.Generator) -> Pick:
    """Keep a random k of n rows: numpy's generator (seeded by split.seed and the split)."""
    return lambda n, k: rng.permutation(n)[:k]


def pandas_pick(seed: int) -> Pick:
    """Keep the k of n rows that pandas' `DataFrame.sample(n=k, random_state=seed)` keeps.

    pandas turns an int random_state into a fresh `numpy.random.RandomState(seed)` and draws
    `choice(n, size=k, replace=False)` (the positions of the rows it returns): the same call
    here, so the blog notebook's subset is reproduced without pandas.
    """
    return lambda n, k: np.random.RandomState(seed).choice(n, size=k, replace=False)


def balance_binary(records: list[ImageRecord], ratio: float, pick: Pick) -> list[ImageRecord]:
    """Undersample so that malignant:benign is at most `ratio`:1 and at least that (blog: 1.0).

    The larger type keeps `pick(n, k)` of its n records, in the order given; the other is kept
    whole (a sample of all its rows, in the notebook's `sample(n=min)`).
    """
    if ratio <= 0:
        raise ValueError(f"split.balance_binary={ratio}: must be positive (malignant per benign)")
    benign = [r for r in records if r.tumor_class == "benign"]
    malignant = [r for r in records if r.tumor_class == "malignant"]
    if len(malignant) > ratio * len(benign):
        malignant = [malignant[i] for i in pick(len(malignant), round(ratio * len(benign)))]
    else:
        benign = [benign[i] for i in pick(len(benign), round(len(malignant) / ratio))]
    return sorted(benign + malignant, key=lambda r: r.path)


def folds_order(
    records: list[ImageRecord], folds: FoldsTable | None, fold: int
) -> list[ImageRecord]:
    """The records in the order of their rows of fold `fold` in the folds table (Folds.csv), as
    a pandas frame read from it and filtered holds them; a record without a row is an error."""
    if folds is None:
        raise BadDataError(
            "split.balance_draw=pandas draws over the rows of Folds.csv in their order; none "
            "was found under data.root"
        )
    row = {name: i for i, (f, _, _, name) in enumerate(folds.rows) if f == fold}
    missing = [r.path for r in records if r.path.rsplit("/", 1)[-1] not in row]
    if missing:
        raise BadDataError(f"{folds.source}: no row for {len(missing)} image(s), e.g. {missing[0]}")
    return sorted(records, key=lambda r: row[r.path.rsplit("/", 1)[-1]])


def _balance(
    splits: dict[str, list[ImageRecord]], split_cfg: Any, folds: FoldsTable | None
) -> dict[str, list[ImageRecord]]:
    """split.balance_binary applied to the splits of split.balance_splits, drawn as
    split.balance_draw says (`seeded`, or `pandas`: the blog notebook's draw)."""
    ratio = _get(split_cfg, "balance_binary")
    if ratio is None:
        return splits
    seed = int(_get(split_cfg, "seed"))
    draw = str(_get_or(split_cfg, "balance_draw", "seeded"))  # absent from older saved configs
    out = dict(splits)
    for name in _get(split_cfg, "balance_splits"):
        if name not in SPLITS:
            raise ValueError(f"split.balance_splits: {name!r} is not one of {', '.join(SPLITS)}")
        if draw == "pandas":
            ordered = folds_order(out[name], folds, int(_get(split_cfg, "fold")))
            out[name] = balance_binary(ordered, float(ratio), pandas_pick(seed))
        else:
            rng = np.random.default_rng([seed, SPLITS.index(name)])
            out[name] = balance_binary(out[name], float(ratio), seeded_pick(rng))
    return out


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
        splits = _patient(chosen, split_cfg, group_by, task, rng)
    elif kind == "official_fold":
        splits = _official_fold(chosen, split_cfg, group_by, rng, folds)
    elif kind == "eva":
        splits = _eva(chosen, task, factors)
        hint = "eva fixes its validation patients by folder id: set split.group_by=patient"
    else:
        raise ValueError(f"split.kind={kind!r}: allowed values are patient, official_fold, eva")
    check_no_leak(splits, group_by, hint)
    splits = _balance(splits, split_cfg, folds)
    if not splits["train"]:
        raise BadDataError(f"split={kind}: the training split is empty ({len(chosen)} images)")
    out = {s: sorted(splits[s], key=lambda r: r.path) for s in SPLITS}
    require = _get_or(split_cfg, "require_all_classes", False)  # absent from older saved configs
    check_coverage(split_coverage(out, task, split_cfg), bool(require))
    return out


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


def asked_shares(split_cfg: Any) -> dict[str, float] | None:
    """The image share each split was asked for (split=patient), or None for the protocols."""
    if _get(split_cfg, "kind") != "patient":
        return None
    n_folds = int(_get(split_cfg, "n_folds"))
    if n_folds > 1:
        rest, fraction = 1 - 1 / n_folds, float(_get(split_cfg, "val_fraction"))
        return {"train": rest * (1 - fraction), "val": rest * fraction, "test": 1 / n_folds}
    return dict(zip(SPLITS, (float(x) for x in _get(split_cfg, "ratios")), strict=True))


def _expected_splits(split_cfg: Any) -> list[str]:
    """The splits a config fills: patient by its shares, eva train and val, official_fold all."""
    kind, asked = _get(split_cfg, "kind"), asked_shares(split_cfg)
    if asked is not None:
        return [s for s in SPLITS if asked[s] > 0]
    if kind == "eva":
        return ["train", "val"]
    return [s for s in SPLITS if s != "val" or float(_get(split_cfg, "val_fraction")) > 0]


def straddling_stems(splits: dict[str, list[ImageRecord]]) -> dict[str, list[str]]:
    """The stems whose slides are in more than one split, and those splits: sibling slides of
    one patient on both sides, which only a split by patient folder lets happen."""
    where: dict[str, set[str]] = defaultdict(set)
    for name, records in splits.items():
        for r in records:
            where[r.stem].add(name)
    return {
        stem: [s for s in SPLITS if s in names]
        for stem, names in sorted(where.items())
        if len(names) > 1
    }


def straddle_warning(coverage: dict[str, Any]) -> str | None:
    """The run-start warning about stems straddling splits (`split_coverage`), or None."""
    straddling = (coverage.get("straddling_stems") or {}).get("stems") or {}
    if not straddling:
        return None
    listed = ", ".join(f"{stem} ({' and '.join(where)})" for stem, where in straddling.items())
    return (
        f"{len(straddling)} stem(s) have sibling slides in more than one split, so one patient's "
        f"tissue may be both trained on and tested: {listed}. split.group_by=patient keeps slide "
        "folders, not stems, apart (as the official folds and eva do); split=patient keeps stems "
        "together"
    )


def split_coverage(
    splits: dict[str, list[ImageRecord]], task: Task | str, split_cfg: Any
) -> dict[str, Any]:
    """What a split achieved, for data_stats.json: per split its images and groups (count and
    share of all), the share asked, the classes it lacks; the classes with no training image; the
    stems whose sibling slides straddle splits (`straddling_stems`: count, stem -> its splits).

    Groups are those of split.group_by (stems or patient folders). `expected` is False for a split
    its config leaves empty (eva's test, a zero share), whose missing classes are no problem.
    """
    task = as_task(task)
    group_by = str(_get(split_cfg, "group_by"))
    asked = asked_shares(split_cfg)
    expected = _expected_splits(split_cfg)
    n_images = sum(len(splits.get(s, [])) for s in SPLITS) or 1
    n_groups = len({group_key(r, group_by) for s in SPLITS for r in splits.get(s, [])}) or 1
    out: dict[str, Any] = {"group_by": group_by, "tolerance": RATIO_TOLERANCE, "splits": {}}
    for name in SPLITS:
        recs = splits.get(name, [])
        present = {task.label_of(r) for r in recs}
        groups = len({group_key(r, group_by) for r in recs})
        out["splits"][name] = {
            "images": len(recs),
            "image_share": round(len(recs) / n_images, 4),
            "asked_share": None if asked is None else round(asked[name], 4),
            "groups": groups,
            "group_share": round(groups / n_groups, 4),
            "expected": name in expected,
            "missing_classes": [c for i, c in enumerate(task.classes) if i not in present],
        }
    out["classes_without_training_images"] = out["splits"]["train"]["missing_classes"]
    # sibling slides (one stem) on both sides of a split: none where groups are stems
    straddling = straddling_stems(splits)
    out["straddling_stems"] = {"count": len(straddling), "stems": straddling}
    return out


def coverage_lines(coverage: dict[str, Any]) -> list[str]:
    """One line per split: images and groups, their shares (and the asked one), what it lacks."""
    lines = []
    for name, s in coverage["splits"].items():
        asked = "" if s["asked_share"] is None else f", asked {s['asked_share']:.0%}"
        lacks = ", ".join(s["missing_classes"]) or "none"
        lines.append(
            f"{name}: {s['images']} images ({s['image_share']:.1%}{asked}), {s['groups']} "
            f"{coverage['group_by']} groups ({s['group_share']:.1%}); classes lacking: {lacks}"
        )
    return lines


def coverage_problems(coverage: dict[str, Any]) -> list[str]:
    """The expected splits that lack a class, one message each (train first)."""
    problems = []
    for name, s in coverage["splits"].items():
        if s["expected"] and s["missing_classes"]:
            what = "no training image" if name == "train" else f"no image in {name}"
            problems.append(f"{name} lacks {', '.join(s['missing_classes'])} ({what})")
    return problems


def check_coverage(coverage: dict[str, Any], require_all_classes: bool) -> None:
    """With split.require_all_classes: BadDataError naming each split and the classes it lacks."""
    problems = coverage_problems(coverage)
    if require_all_classes and problems:
        raise BadDataError(
            "split.require_all_classes=true: " + "; ".join(problems) + ". These classes have "
            "too few patient groups for every split: choose other split.ratios or split.seed, "
            "a task or magnification with more groups, or set split.require_all_classes=false "
            "(the run then warns and goes on)"
        )
