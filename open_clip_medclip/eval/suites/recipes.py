"""Suite recipes: which candidate images form a suite's test (and train) split.

All randomness comes from one seeded RandomState, consumed in a fixed order, so a recipe is a pure function of
(raw table order, definition).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from open_clip_medclip.eval.suites.definitions import SuiteError


@dataclass
class Candidate:
    """One raw image that a class rule accepted, before the recipe decides whether it is in the suite."""

    id: str
    image_path: str
    label: str
    split: str | None = None  # from the raw data (a split column), when it has one
    frontal: bool | None = None
    where: str = ""


def _by_class(candidates: Sequence[Candidate], classes: Sequence[str]) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = {cls: [] for cls in classes}
    for cand in candidates:
        groups.setdefault(cand.label, []).append(cand)
    return groups


def _sample(rng: np.random.RandomState, items: Sequence, n: int | None) -> list:
    """Like `DataFrame.sample(n, random_state=rng)`: a permutation prefix (all items, shuffled, when n is None)."""
    if n is None or n >= len(items):
        n = len(items)
    order = rng.permutation(len(items))[:n]
    return [items[i] for i in order]


def _recipe_medclip_5x200(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                          rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """MedCLIP's CheXpert/MIMIC-5x200 (as in the MedCLIP reference code): `per_class` per class, half of the pool
    to test."""
    if recipe.get("frontal_only"):
        cands = [c for c in cands if c.frontal]
    groups = _by_class(cands, classes)
    pool = [c for cls in classes for c in _sample(rng, groups[cls], recipe.get("per_class", 400))]
    shuffled = _sample(rng, pool, None)
    n_test = int(round(len(pool) * recipe.get("test_fraction", 0.5)))
    return shuffled[:n_test], shuffled[n_test:]


def _recipe_split_column(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                         rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """Use the raw data's split column when it has one, else a seeded stratified hold-out."""
    test_value, train_value = recipe.get("test_value", "heldout"), recipe.get("train_value", "train")
    if any(c.split for c in cands):
        test = [c for c in cands if c.split == test_value]
        train = [c for c in cands if c.split == train_value]
    else:
        test, train = [], []
        for group in _by_class(cands, classes).values():
            shuffled = _sample(rng, group, None)
            n_test = int(round(len(group) * recipe.get("test_fraction", 0.3)))
            test += shuffled[:n_test]
            train += shuffled[n_test:]
    return test, train


def _recipe_balanced(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                     rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """COVID / RSNA (as in the MedCLIP reference code): optional random hold-out, then all positives + as many
    negatives."""
    positive, negative = recipe.get("positive_class", classes[-1]), recipe.get("negative_class", classes[0])
    holdout = recipe.get("holdout_fraction")
    if holdout:
        shuffled = _sample(rng, cands, None)
        n_pool = int(round(len(shuffled) * holdout))
        pool, train = shuffled[:n_pool], shuffled[n_pool:]
    else:
        pool, train = list(cands), []
    groups = _by_class(pool, classes)
    test = groups[positive] + _sample(rng, groups[negative], len(groups[positive]))
    if recipe.get("max_test"):
        test = _sample(rng, test, recipe["max_test"])
    test_ids = {c.id for c in test}
    if not holdout:
        train = [c for c in pool if c.id not in test_ids]
    return test, train


def _recipe_all(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """Every candidate, split by its own `split` value (test when absent) - the no-code CSV default."""
    return [c for c in cands if (c.split or "test") == "test"], [c for c in cands if c.split == "train"]


RECIPES = {
    "medclip-5x200": _recipe_medclip_5x200,
    "split-column": _recipe_split_column,
    "balanced": _recipe_balanced,
    "all": _recipe_all,
}


def _cap_per_class(rng: np.random.RandomState, items: list[Candidate], classes: Sequence[str],
                   cap: int | None) -> list[Candidate]:
    if not cap:
        return items
    return [c for cls, group in _by_class(items, classes).items() for c in _sample(rng, group, cap)]


def select_split(definition: Mapping, candidates: list[Candidate]) -> dict[str, list[Candidate]]:
    """Run the definition's recipe; returns {"test": [...], "train": [...]} in recipe order."""
    recipe = definition["recipe"]
    kind = recipe.get("kind", "all")
    if kind not in RECIPES:
        raise SuiteError(f"suite {definition['name']!r}: unknown recipe {kind!r}; known: {', '.join(RECIPES)}")
    classes = list(definition["classes"])
    rng = np.random.RandomState(int(recipe.get("seed", definition.get("seed", 42))))
    test, train = RECIPES[kind](candidates, classes, recipe, rng)
    test = _cap_per_class(rng, test, classes, recipe.get("max_test_per_class"))
    train = _cap_per_class(rng, train, classes, recipe.get("max_train_per_class"))
    return {"test": test, "train": train}
