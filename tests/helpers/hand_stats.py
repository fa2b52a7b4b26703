"""Statistics recomputed by hand in the tests, independently of breakhis_ft.evaluate."""

from __future__ import annotations

import numpy as np


def hand_stratified_draws(groups_of_class: dict[int, list[str]], rng: np.random.Generator):
    """One stratified resample drawn by hand: one uniform number per slot, classes in order,
    each class's groups sorted; slot k of a class of n groups takes group floor(u * n)."""
    slots = [(c, g) for c in sorted(groups_of_class) for g in sorted(groups_of_class[c])]
    u = rng.random(len(slots))
    return [
        sorted(groups_of_class[c])[int(x * len(groups_of_class[c]))]
        for (c, _), x in zip(slots, u, strict=True)
    ]
