"""The paste plan: every random choice of one batch, drawn on the CPU as small numpy arrays.

Drawing the plan before any pixel is touched makes each batch reproducible from the seed and
lets a user print exactly what was pasted where. The DALI pipeline only executes a plan.

Geometry conventions (all integers, pixels of the output canvas of side S):
- LSJ: the background (h, w) is resized to `lsj_size` = round((h, w) * f) with
  f = min(S * scale / h, S * scale / w), the window [y0, y0 + S) x [x0, x0 + S) is cut from it
  (zero padding bottom/right where the image is smaller), then the window is flipped if asked;
- paste slot k of image i: the instance is resized to `size` (h, w), flipped if asked, and its
  top-left corner goes to `pos` (y, x), which may be negative: the part outside is cut off.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .config import PasteConfig


@dataclass
class PastePlan:
    """One batch of B images with K paste slots each; empty slots have `ids == -1`."""

    image_ids: np.ndarray    # (B,) int64 background image ids
    image_sizes: np.ndarray  # (B, 2) int32 (h, w) of the decoded background
    lsj_size: np.ndarray     # (B, 2) int32 (h, w) after the LSJ resize
    lsj_offset: np.ndarray   # (B, 2) int32 (y0, x0) of the output window in the resized image
    lsj_flip: np.ndarray     # (B,) bool
    ids: np.ndarray          # (B, K) int64 instance ids, -1 for an empty slot
    labels: np.ndarray       # (B, K) int64 category ids, -1 for an empty slot
    size: np.ndarray         # (B, K, 2) int32 (h, w) of the resized instance
    pos: np.ndarray          # (B, K, 2) int32 (y, x) top-left corner on the canvas
    flip: np.ndarray         # (B, K) bool

    @property
    def active(self) -> np.ndarray:
        return self.ids >= 0

    def replace(self, **changes) -> PastePlan:
        return replace(self, **changes)


class CategoryStats:
    """Per-category mean/std of sqrt(box area / image area), looked up vectorised."""

    def __init__(self, categories_doc: dict, paste: PasteConfig):
        ids, means, stds = [], [], []
        for c in categories_doc["categories"]:
            mean, std = c.get("scale_mean"), c.get("scale_std")
            if mean is None or not mean > 0 or std is None or not std >= 0:
                mean, std = paste.default_scale_mean, paste.default_scale_std
            ids.append(int(c["id"]))
            means.append(float(mean))
            stds.append(float(std))
        order = np.argsort(ids)
        self.ids = np.asarray(ids, np.int64)[order]
        self.mean = np.asarray(means, np.float64)[order]
        self.std = np.asarray(stds, np.float64)[order]

    def lookup(self, category_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.searchsorted(self.ids, category_ids)
        return self.mean[at], self.std[at]


class Planner:
    """Draws plans: LSJ per background, then which instances go where, in paste order. Holds
    no random state: every draw comes from the generator passed in (one per sample, seeded by
    (seed, epoch, position); see sample.py)."""

    def __init__(self, paste: PasteConfig, stats: CategoryStats):
        self.paste = paste
        self.stats = stats

    def draw_lsj(self, image_sizes: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lsj_size, lsj_offset, lsj_flip) for backgrounds of the given (h, w)."""
        s = self.paste.output_size
        lo, hi = self.paste.scale_range
        n = len(image_sizes)
        hw = image_sizes.astype(np.float64)
        scale = rng.uniform(lo, hi, n)
        factor = np.minimum(s * scale / hw[:, 0], s * scale / hw[:, 1])
        size = np.maximum(1, np.round(hw * factor[:, None])).astype(np.int32)
        room = np.maximum(0, size - s)
        offset = np.floor(rng.random((n, 2)) * (room + 1)).astype(np.int32)
        flip = rng.random(n) < self.paste.hflip_prob
        return size, offset, flip

    def draw_counts(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.paste.min_pastes, self.paste.max_pastes + 1, batch)

    def place(self, counts: np.ndarray, ids: np.ndarray, labels: np.ndarray,
              inst_w: np.ndarray, inst_h: np.ndarray, rng: np.random.Generator
              ) -> dict[str, np.ndarray]:
        """Sizes, positions and flips for `ids` (image 0's pastes first, each in paste order)."""
        p, s = self.paste, self.paste.output_size
        n = len(ids)
        mean, std = self.stats.lookup(labels)
        ratio = np.clip(rng.normal(mean, std), p.min_size_px / s, p.max_size_ratio)
        aspect = inst_w / np.maximum(inst_h, 1) * rng.uniform(*p.aspect_jitter, n)
        h = np.round(ratio * s / np.sqrt(aspect)).astype(np.int32)
        w = np.round(ratio * s * np.sqrt(aspect)).astype(np.int32)
        centre = rng.integers(0, s, (n, 2))
        pos = (centre - np.stack([h, w], 1) // 2).astype(np.int32)
        flip = rng.random(n) < p.instance_hflip_prob
        big_enough = np.minimum(h, w) >= p.min_side_px
        return {"size": np.stack([h, w], 1), "pos": pos, "flip": flip, "ok": big_enough}


def slot_layout(counts: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, slot) of each of the sum(counts) pastes: image i fills slots 0..counts[i]-1."""
    image = np.repeat(np.arange(len(counts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    slot = np.arange(int(counts.sum())) - first
    assert slot.size == 0 or slot.max() < slots
    return image, slot


def assemble(image_ids: np.ndarray, image_sizes: np.ndarray, lsj: tuple, counts: np.ndarray,
             ids: np.ndarray, labels: np.ndarray, placed: dict, slots: int) -> PastePlan:
    """Scatter the flat per-paste arrays into (B, K) slot arrays; rejected pastes stay empty."""
    b = len(counts)
    image, slot = slot_layout(counts, slots)
    ok = placed["ok"]
    plan = PastePlan(
        image_ids=np.asarray(image_ids, np.int64), image_sizes=image_sizes.astype(np.int32),
        lsj_size=lsj[0], lsj_offset=lsj[1], lsj_flip=lsj[2],
        ids=np.full((b, slots), -1, np.int64), labels=np.full((b, slots), -1, np.int64),
        size=np.ones((b, slots, 2), np.int32), pos=np.zeros((b, slots, 2), np.int32),
        flip=np.zeros((b, slots), bool))
    i, k = image[ok], slot[ok]
    plan.ids[i, k] = ids[ok]
    plan.labels[i, k] = labels[ok]
    plan.size[i, k] = placed["size"][ok]
    plan.pos[i, k] = placed["pos"][ok]
    plan.flip[i, k] = placed["flip"][ok]
    return plan


def lsj_window(plan: PastePlan, size: int) -> dict[str, list]:
    """The LSJ of `plan` as one ROI resize: the window [y0, y0 + S) x [x0, x0 + S) of the image
    resized to `lsj_size`, in input pixels (x reversed for a flip), its output size (the
    window minus what lies beyond the resized image) and where the zero padding goes."""
    scale = plan.image_sizes / plan.lsj_size                        # input px per output px
    out = np.minimum(size, plan.lsj_size - plan.lsj_offset)         # >= 1: offset <= room
    start, end = plan.lsj_offset * scale, (plan.lsj_offset + out) * scale
    flip = plan.lsj_flip
    start[:, 1], end[:, 1] = (np.where(flip, end[:, 1], start[:, 1]),
                              np.where(flip, start[:, 1], end[:, 1]))
    pad = np.zeros((len(out), 3), np.int32)
    pad[:, 1] = np.where(flip, out[:, 1] - size, 0)                 # flipped: padding on the left
    return {"lsj_roi_start": list(start.astype(np.float32)),
            "lsj_roi_end": list(end.astype(np.float32)),
            "lsj_out_size": list(out.astype(np.float32)), "lsj_pad_start": list(pad)}
