"""Samplers: draw instance ids by category in O(1) per draw, vectorised.

Every kind is the same two-step draw with different category weights w(c):
1. a category with probability w(c) / sum(w), through a Walker/Vose alias table;
2. an instance uniformly within that category's contiguous id range.

Kinds (weights over the bank's non-empty categories, or the `categories` subset):
- "cas": w(c) = 1, class-aware sampling, the original X-Paste draw;
- "instance": w(c) = instances of c, i.e. uniform over all instances;
- "repeat_factor": w(c) = r(c) = max(1, sqrt(t / f(c))), t = 0.001, the LVIS repeat factor from
  the categories JSON written by pack-coco (its "repeat_factor" when present, else computed
  from image_count / num_images; a category seen in no training image counts as seen in one).
  For instance-level repeat factors (w = n(c) r(c)) pass kind="weights" with those weights;
- "weights": w(c) from a dict {category_id: weight}; categories it leaves out get weight 0.

Streams are deterministic given (seed, rank, worker) and independent across ranks and workers:
the generator is seeded with `SeedSequence(seed, spawn_key=(rank, worker))`.
"""

from __future__ import annotations

import math

import numpy as np

from ..formats import read_categories
from .bank import InstanceBank
from .layout import BankError

KINDS = ("cas", "instance", "repeat_factor", "weights")
REPEAT_THRESHOLD = 0.001


class Sampler:
    """Draws instance ids; `category_ids` and `probabilities` say what it draws from."""

    def __init__(self, category_ids: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                 weights: np.ndarray, rng: np.random.Generator):
        self.category_ids = category_ids
        self.probabilities = weights / weights.sum()
        self._starts, self._counts = starts, counts
        self._accept, self._alias = alias_table(self.probabilities)
        self._rng = rng

    def draw(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """`n` instance ids (int64), drawn independently with replacement; from `rng` when
        given (the loader draws each sample from its own (seed, epoch, position) generator)."""
        rng = self._rng if rng is None else rng
        column = rng.integers(0, len(self._accept), n)
        category = np.where(rng.random(n) < self._accept[column], column, self._alias[column])
        counts = self._counts[category]
        within = (rng.random(n) * counts).astype(np.int64)
        np.minimum(within, counts - 1, out=within)  # guards the rare round-up of x * n to n
        return self._starts[category] + within


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method: column i is kept with probability accept[i], else alias[i] is taken.

    Building is O(k) in Python over the categories (done once); each draw is O(1).
    """
    k = len(p)
    scaled = p * k
    accept = np.ones(k)
    alias = np.arange(k)
    small = [i for i in range(k) if scaled[i] < 1.0]
    large = [i for i in range(k) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        accept[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return accept, alias  # leftovers keep accept 1: their scaled weight is 1 up to rounding


def make_sampler(bank: InstanceBank, kind: str = "cas", seed: int = 0, rank: int = 0, worker: int = 0,
                 weights: dict | None = None, categories=None,
                 category_meta: str | dict | None = None) -> Sampler:
    """A sampler over `bank` (see the module docstring for the kinds).

    `categories` restricts draws to a subset of category ids; `category_meta` is the categories
    JSON (path or loaded dict) that "repeat_factor" needs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown sampler kind {kind!r}; choose one of {', '.join(KINDS)}")
    if (kind == "weights") != (weights is not None):
        raise ValueError("pass `weights` exactly when kind='weights'")
    if kind == "repeat_factor" and category_meta is None:
        raise ValueError("kind='repeat_factor' needs category_meta (the categories JSON of pack-coco)")
    ids, starts, counts = _categories_in_use(bank, categories)
    if kind == "cas":
        w = np.ones(len(ids))
    elif kind == "instance":
        w = counts.astype(np.float64)
    elif kind == "repeat_factor":
        w = repeat_factors(category_meta, ids)
    else:
        w = _custom_weights(weights, ids)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise BankError(f"sampler {kind!r}: category weights must be finite, >= 0 and not all 0")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(rank, worker)))
    return Sampler(ids, starts, counts, w, rng)


def _categories_in_use(bank: InstanceBank, categories) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(bank.category_ids, dtype=np.int64)
    starts = np.asarray(bank.category_starts[:-1], dtype=np.int64)
    counts = np.asarray(bank.category_counts(), dtype=np.int64)
    if len(ids) == 0:
        raise BankError(f"bank {bank.path} holds no instances")
    if categories is None:
        return ids, starts, counts
    wanted = np.unique(np.asarray(list(categories), dtype=np.int64))
    keep = np.isin(ids, wanted)
    if not keep.any():
        raise BankError(f"none of the requested categories is in bank {bank.path}: absent "
                        f"{_listed(wanted)}")
    return ids[keep], starts[keep], counts[keep]


def repeat_factors(category_meta: str | dict, category_ids: np.ndarray,
                   threshold: float = REPEAT_THRESHOLD) -> np.ndarray:
    """LVIS repeat factor r(c) of each category id, from a pack-coco categories JSON."""
    doc = read_categories(category_meta) if isinstance(category_meta, str) else category_meta
    by_id = {int(c["id"]): c for c in doc["categories"]}
    missing = [int(c) for c in category_ids if int(c) not in by_id]
    if missing:
        raise BankError(f"categories {_listed(missing)} of the bank are not in the categories JSON")
    num_images = doc.get("num_images")
    out = np.empty(len(category_ids))
    for i, cid in enumerate(category_ids):
        entry = by_id[int(cid)]
        if entry.get("repeat_factor") is not None:
            out[i] = entry["repeat_factor"]
            continue
        if not num_images:
            raise BankError(f"category {cid}: no repeat_factor and no num_images to compute it")
        frequency = max(entry.get("image_count") or 0, 1) / num_images
        out[i] = max(1.0, math.sqrt(threshold / frequency))
    return out


def _custom_weights(weights: dict, ids: np.ndarray) -> np.ndarray:
    given = {int(k): float(v) for k, v in weights.items()}
    w = np.array([given.get(int(c), 0.0) for c in ids])
    if w.sum() <= 0:
        raise BankError(f"the weights give no category of the bank a positive weight; weighted: "
                        f"{_listed(sorted(given))}, in the bank: {_listed(ids)}")
    return w


def _listed(ids, limit: int = 20) -> str:
    ids = [int(i) for i in ids]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(map(str, ids[:limit])) + more
