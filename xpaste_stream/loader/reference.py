"""Reference compositor in plain numpy, written for clarity; the tests hold the loader to it.

It follows the original X-Paste procedure literally: objects are pasted one at a time; after
each paste every earlier object's mask (real or pasted) is cleared under the new mask, its box
recomputed from the mask, and it is dropped unless its box moved at most `keep_max_box_shift`
px from where it was placed or more than `keep_min_area` pixels remain.

Inputs are what the loader's debug outputs give: the LSJ'd background and real masks, and each
paste's resized, flipped RGBA crop with its top-left position. Resampling is thus out of the
comparison; placement, blending, occlusion, boxes and the keep rule are in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import PasteConfig


@dataclass
class Paste:
    rgba: np.ndarray   # (h, w, 4) uint8, already resized and flipped
    y: int             # top-left corner on the canvas, may be negative
    x: int
    label: int


@dataclass
class _Object:
    mask: np.ndarray
    placed_box: np.ndarray
    label: int
    source: int


def box_of(mask: np.ndarray) -> np.ndarray:
    """xyxy box with exclusive max; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def on_canvas(crop: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """The crop on a zero canvas of side `size`, top-left at (y, x), outside parts cut off."""
    canvas = np.zeros((size, size) + crop.shape[2:], crop.dtype)
    h, w = crop.shape[:2]
    top, left = max(y, 0), max(x, 0)
    bottom, right = min(y + h, size), min(x + w, size)
    if bottom > top and right > left:
        canvas[top:bottom, left:right] = crop[top - y:bottom - y, left - x:right - x]
    return canvas


def keeps(obj: _Object, paste: PasteConfig) -> bool:
    area = int(obj.mask.sum())
    shift = np.abs(box_of(obj.mask) - obj.placed_box).max()
    return area > 0 and (shift <= paste.keep_max_box_shift or area > paste.keep_min_area)


def composite(background: np.ndarray, real_masks: np.ndarray, real_labels, pastes: list[Paste],
              paste: PasteConfig) -> tuple[np.ndarray, dict]:
    """(image (S, S, 3) uint8, targets with numpy boxes/labels/masks/source)."""
    if paste.blending == "gaussian":
        raise ValueError("the reference covers 'hard' and 'alpha' blending")
    size = background.shape[0]
    canvas = background.astype(np.float32)
    objects = [_Object(m.astype(bool), box_of(m), int(c), 0)
               for m, c in zip(real_masks, real_labels, strict=True)]
    objects = [o for o in objects if o.mask.any()]
    for p in pastes:
        layer = on_canvas(p.rgba, p.y, p.x, size)
        mask = layer[:, :, 3] >= paste.mask_threshold
        if paste.blending == "hard":
            weight = mask.astype(np.float32)
        else:
            weight = layer[:, :, 3].astype(np.float32) / np.float32(255.0)
        canvas = canvas + weight[:, :, None] * (layer[:, :, :3].astype(np.float32) - canvas)
        for obj in objects:
            obj.mask = obj.mask & ~mask
        objects = [o for o in objects if keeps(o, paste)]
        if mask.any():
            objects.append(_Object(mask, box_of(mask), p.label, 1))
    image = np.floor(canvas + np.float32(0.5)).astype(np.uint8)
    targets = {"boxes": np.array([box_of(o.mask) for o in objects], np.float32).reshape(-1, 4),
               "labels": np.array([o.label for o in objects], np.int64),
               "masks": np.array([o.mask for o in objects], np.uint8).reshape(-1, size, size),
               "source": np.array([o.source for o in objects], np.uint8)}
    return image, targets


def pastes_of(batch, i: int) -> list[Paste]:
    """Image i's pastes in paste order, from a loader batch made with `debug=True`."""
    plan, crops = batch.plan, batch.debug["crops"]
    return [Paste(crops[k][i], int(plan.pos[i, k, 0]), int(plan.pos[i, k, 1]), int(plan.labels[i, k]))
            for k in range(plan.ids.shape[1]) if plan.ids[i, k] >= 0]
