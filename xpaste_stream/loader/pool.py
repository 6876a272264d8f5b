"""A pool of decoded instances: decode once, paste many times, sampling distribution kept.

Decoding a pasted instance (JPEG + PNG alpha) was the largest cost of a paste on CPU. The
pool holds P decoded RGBA instances; a paste takes a pool entry, and each batch a few entries
are replaced by fresh draws, so decoding is amortised over the ~P / R batches an entry lives
(R entries refreshed per batch) and over time every instance of the bank is used.

Why the marginal distribution stays the sampler's: every entry is, at every moment, an
independent draw from the bank sampler (filled by draws, refreshed by draws at uniformly
random places, never chosen by content), and a paste picks an entry uniformly at random with
its own generator, independently of what the entries hold. So P(paste is instance i) =
sum_j P(pick j) P(entry j is i) = sampler(i). The price is correlation: pastes close in time
can repeat an instance (two pastes share an entry with probability ~1 / P while it lives), so
nearby batches are not independent. Corrupt bytes are redrawn exactly as on demand, so both
modes draw from the sampler conditioned on readable bytes.
"""

from __future__ import annotations

import cv2
import numpy as np

from .sources import InstanceFetcher

PLACEHOLDER_RGBA = np.zeros((1, 1, 4), np.uint8)  # what an empty slot gets in pool mode


def decode_rgba(payload: dict) -> np.ndarray | None:
    """(h, w, 4) uint8 RGB + alpha of one bank payload, or None when it does not decode to
    matching sizes (bytes that passed the header checks but are still corrupt)."""
    bgr = cv2.imdecode(np.frombuffer(payload["jpg"], np.uint8), cv2.IMREAD_COLOR)
    alpha = cv2.imdecode(np.frombuffer(payload["mask.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
    if bgr is None or alpha is None or bgr.shape[:2] != alpha.shape:
        return None
    rgba = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
    rgba[:, :, 3] = alpha
    return rgba


class InstancePool:
    """P decoded instances, each an independent sampler draw (see the module docstring).

    `draw(n)` first refreshes max(1, round(refresh * n)) uniformly random entries (at most P)
    with new draws, then returns n pastes, each a uniformly random entry."""

    def __init__(self, fetcher: InstanceFetcher, size: int, refresh: float, seed: int, rank: int,
                 progress: bool = True):
        self.fetcher = fetcher
        self.size, self.refresh = size, refresh
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, rank, 0x9001]))
        self.progress = progress
        self.ids = np.zeros(0, np.int64)
        self.rgba: list[np.ndarray] = []
        self.decoded = 0  # instances decoded so far (fill + refreshes)

    def fill(self) -> None:
        """The initial P draws; done once, at the first batch (a bar shows if it is slow)."""
        if len(self.ids):
            return
        from tqdm import tqdm

        ids, rgba = [], []
        with tqdm(total=self.size, desc="instance pool", unit="inst", delay=2,
                  disable=not self.progress, leave=False) as bar:
            while len(rgba) < self.size:
                step = min(256, self.size - len(rgba))
                more_ids, more_rgba = self.fresh(step)
                ids.append(more_ids)
                rgba += more_rgba
                bar.update(step)
        self.ids, self.rgba = np.concatenate(ids), rgba

    def draw(self, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(ids, decoded instances) of n pastes; refreshes part of the pool first."""
        self.fill()
        if n and self.refresh > 0:
            r = min(self.size, max(1, round(self.refresh * n)))
            at = self.rng.choice(self.size, r, replace=False)
            ids, rgba = self.fresh(r)
            self.ids[at] = ids
            for j, a in zip(at.tolist(), rgba, strict=True):
                self.rgba[j] = a
        picks = self.rng.integers(0, self.size, n)
        return self.ids[picks], [self.rgba[j] for j in picks.tolist()]

    def fresh(self, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """n new sampler draws, decoded. Corrupt bytes are counted and redrawn by the fetcher;
        what it gives up on, or what fails to decode, is counted and drawn again here."""
        ids, payloads = self.fetcher.draw(n)
        self.decoded += n
        rgba = [decode_rgba(p) if i >= 0 else None for i, p in zip(ids.tolist(), payloads, strict=True)]
        for _ in range(100):
            bad = [j for j, a in enumerate(rgba) if a is None]
            if not bad:
                return ids, rgba
            undecodable = sum(int(ids[j] >= 0) for j in bad)  # fetcher did not count these yet
            self.fetcher.counters.add("instances_corrupt", undecodable)
            more_ids, more = self.fetcher.draw(len(bad))
            self.decoded += len(bad)
            for j, i, p in zip(bad, more_ids.tolist(), more, strict=True):
                ids[j], rgba[j] = i, decode_rgba(p) if i >= 0 else None
        raise RuntimeError("instance pool: no decodable instance in 100 rounds of draws; "
                           "is most of the bank corrupt?")
