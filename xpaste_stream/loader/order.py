"""The global sample order: a pure function of (seed, epoch, data set), sliced by rank.

Epoch e of a data set of N backgrounds:
1. repeat factors (LVIS repeat-factor sampling, on by default): background i appears
   floor(r_i) + Bernoulli(frac(r_i)) times, drawn from (seed, epoch); all r_i = 1 gives each once;
2. the list is permuted by (seed, epoch) (or kept in data-set order with `shuffle=False`);
3. global batch g holds positions [start + g*B*W, start + (g+1)*B*W) of that list, rank r the B
   positions from start + g*B*W + r*B. Positions past the end wrap to the list's beginning, so
   every rank gets the same number of full batches (no DDP hang); with `drop_last` the last,
   incomplete global batch is dropped instead. Each epoch is permuted afresh, so the samples a
   wrap repeats (or `drop_last` drops) differ from epoch to epoch.

Everything a sample holds (background, LSJ, paste plan, instances) is then drawn from
(seed, epoch, position) alone (sample.py), so the global order is the same for any number of
ranks and workers, and `start` (global samples consumed) is all a resume needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

STATE_VERSION = 1


def epoch_repeats(factors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """floor(r) + Bernoulli(frac(r)) copies of each background in `epoch`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EF]))
    whole = np.floor(factors)
    return (whole + (rng.random(len(factors)) < factors - whole)).astype(np.int64)


def epoch_order(factors: np.ndarray, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Background indices of one epoch, in the order they are consumed (int64)."""
    order = np.repeat(np.arange(len(factors), dtype=np.int64), epoch_repeats(factors, seed, epoch))
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x0D3]))
        order = order[rng.permutation(len(order))]
    return order


def batches_per_rank(epoch_size: int, start: int, batch_size: int, world_size: int,
                     drop_last: bool = False) -> int:
    """Batches each rank gets from the positions [start, epoch_size) of an epoch."""
    remaining = max(0, epoch_size - start)
    per_global = batch_size * world_size
    return remaining // per_global if drop_last else -(-remaining // per_global)


def position(start: int, local_index: int, batch_size: int, rank: int, world_size: int) -> int:
    """Global position of sample `local_index` of a rank's epoch that starts at `start`."""
    batch, within = divmod(local_index, batch_size)
    return start + batch * batch_size * world_size + rank * batch_size + within


@dataclass(frozen=True)
class LoaderState:
    """What resumes a loader: the epoch and the global samples consumed in it, plus the
    fingerprints of what makes the order (data set, seed, paste and order settings)."""

    epoch: int
    samples: int              # global samples consumed in `epoch` (all ranks together)
    seed: int
    dataset: str              # fingerprint of the background index (order.fingerprint)
    config: str               # fingerprint of the settings that shape samples
    version: int = STATE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> LoaderState:
        missing = sorted({"epoch", "samples", "seed", "dataset", "config"} - set(state))
        if missing:
            raise ValueError(f"not a loader state dict (missing {', '.join(missing)})")
        if state.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not "
                             f"{STATE_VERSION}: it was written by another version")
        return cls(int(state["epoch"]), int(state["samples"]), int(state["seed"]),
                   str(state["dataset"]), str(state["config"]))


def fingerprint(*parts) -> str:
    """A short stable hash of reprs (dataclasses, lists, strings)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
