"""Reference compositor in plain numpy, written for clarity; the tests hold the loader to it.

It follows the original X-Paste procedure literally: objects are pasted one at a time; after
each paste every earlier object's mask (real or pasted) is cleared under the new mask, its box
recomputed from the mask, and it is dropped unless its box moved at most `keep_max_box_shift`
px from where it was placed or more than `keep_min_area` pixels remain.

Two ways in. `composite` takes placed inputs: the LSJ'd background and real masks and each
paste's resized, flipped RGBA crop with its position; fed with the loader's debug outputs it
checks placement, blending, occlusion, boxes and the keep rule exactly. `independent_inputs`
makes those inputs itself from the raw shard sample and the bank's encoded instances (its own
decode, LSJ, full-resolution RLE masks, bilinear resize, flips), following only the plan: a
flip on the wrong axis or a shifted window in the pipeline shows up against it.
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


def over(under: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Integer "over": (under (255 - w) + colour w + 127) // 255 per channel, w in [0, 255]."""
    w = weight.astype(np.int64)[..., None]
    return ((under.astype(np.int64) * (255 - w) + colour.astype(np.int64) * w + 127) // 255
            ).astype(np.uint8)


def gaussian_weight(hard: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """The hard mask (h, w) blurred by the separable integer taps, zero padded by r on every
    side: (h + 2r, w + 2r) weights in [0, 255] (1/65536 sums rounded to 1/255)."""
    r = len(taps) // 2
    padded = np.pad(hard.astype(np.int64), r)
    rows = np.stack([np.convolve(line, taps, mode="same") for line in padded])
    both = np.stack([np.convolve(col, taps, mode="same") for col in rows.T]).T
    return ((both * 255 + (1 << 15)) >> 16).astype(np.uint8)


def composite(background: np.ndarray, real_masks: np.ndarray, real_labels, pastes: list[Paste],
              paste: PasteConfig) -> tuple[np.ndarray, dict]:
    """(image (S, S, 3) uint8, targets with numpy boxes/labels/masks/source). Blending is in
    integers: hard copies where alpha >= threshold; alpha and gaussian lay the crop "over" the
    canvas with its alpha or with the gaussian-blurred hard mask (the crop's colours extended
    from its edge over the blur's reach)."""
    from .composite import gaussian_taps

    size = background.shape[0]
    canvas = background.copy()
    objects = [_Object(m.astype(bool), box_of(m), int(c), 0)
               for m, c in zip(real_masks, real_labels, strict=True)]
    objects = [o for o in objects if o.mask.any()]
    for p in pastes:
        layer = on_canvas(p.rgba, p.y, p.x, size)
        mask = layer[:, :, 3] >= paste.mask_threshold
        if paste.blending == "hard":
            canvas[mask] = layer[:, :, :3][mask]
        elif paste.blending == "alpha":
            canvas = over(canvas, layer[:, :, :3], layer[:, :, 3])
        else:
            taps = gaussian_taps(paste.gaussian_sigma)
            r = len(taps) // 2
            weight = gaussian_weight(p.rgba[:, :, 3] >= paste.mask_threshold, taps)
            colour = np.pad(p.rgba[:, :, :3], ((r, r), (r, r), (0, 0)), mode="edge")
            canvas = over(canvas, on_canvas(colour, p.y - r, p.x - r, size),
                          on_canvas(weight, p.y - r, p.x - r, size))
        for obj in objects:
            obj.mask = obj.mask & ~mask
        objects = [o for o in objects if keeps(o, paste)]
        if mask.any():
            objects.append(_Object(mask, box_of(mask), p.label, 1))
    targets = {"boxes": np.array([box_of(o.mask) for o in objects], np.float32).reshape(-1, 4),
               "labels": np.array([o.label for o in objects], np.int64),
               "masks": np.array([o.mask for o in objects], np.uint8).reshape(-1, size, size),
               "source": np.array([o.source for o in objects], np.uint8)}
    return canvas, targets


def pastes_of(batch, i: int) -> list[Paste]:
    """Image i's pastes in paste order, from a loader batch made with `debug=True`."""
    plan, crops = batch.plan, batch.debug["crops"]
    return [Paste(crops[k][i], int(plan.pos[i, k, 0]), int(plan.pos[i, k, 1]), int(plan.labels[i, k]))
            for k in range(plan.ids.shape[1]) if plan.ids[i, k] >= 0]


# --- independent inputs: LSJ, instance resize and flips from the raw data, in numpy ------------


def bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize without antialiasing, pixel centres aligned, in fixed point: source
    coordinate (o + 0.5) n_in / n_out - 0.5 and weights in 1/2048 (OpenCV's INTER_LINEAR
    precision), the result rounded; written out in numpy, axis by axis."""
    ih, iw = image.shape[:2]

    def axis(n_out: int, n_in: int):
        q = ((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in - n_out) * 1024 // n_out
        q = np.clip(q, 0, (n_in - 1) * 2048)
        lo = q >> 11
        return lo, np.minimum(lo + 1, n_in - 1), q - (lo << 11)

    y0, y1, fy = axis(out_h, ih)
    x0, x1, fx = axis(out_w, iw)
    img = image.astype(np.int64)
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = img[y0][:, x0] * (2048 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (2048 - fx) + img[y1][:, x1] * fx
    return ((top * (2048 - fy) + bottom * fy + (1 << 21)) >> 22).astype(np.uint8)


def lsj_image(image: np.ndarray, lsj_size, lsj_offset, flip: bool, size: int) -> np.ndarray:
    """Resize to `lsj_size` (area averaging when shrinking, as an antialiased resize does),
    cut the S x S window at `lsj_offset` (zero padded), flip it if asked."""
    import cv2

    (nh, nw), (y0, x0) = (int(v) for v in lsj_size), (int(v) for v in lsj_offset)
    shrink = nh < image.shape[0]
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    out = np.zeros((size, size) + image.shape[2:], image.dtype)
    part = resized[y0:y0 + size, x0:x0 + size]
    out[:part.shape[0], :part.shape[1]] = part
    return out[:, ::-1].copy() if flip else out


def lsj_mask(mask: np.ndarray, lsj_size, lsj_offset, flip: bool, size: int) -> np.ndarray:
    """Nearest-neighbour LSJ of a full-resolution mask: output pixel (r, c) of the window takes
    the source pixel under its centre, floor((y0 + r + 0.5) h / nh), in integers."""
    (h, w), (nh, nw), (y0, x0) = mask.shape, (int(v) for v in lsj_size), (int(v) for v in lsj_offset)
    rows = np.arange(y0, min(nh, y0 + size))
    cols = np.arange(x0, min(nw, x0 + size))
    src_r = np.minimum((2 * rows + 1) * h // (2 * nh), h - 1)
    src_c = np.minimum((2 * cols + 1) * w // (2 * nw), w - 1)
    out = np.zeros((size, size), np.uint8)
    out[:len(rows), :len(cols)] = mask[src_r][:, src_c]
    return out[:, ::-1].copy() if flip else out


def independent_inputs(sample: dict, plan, i: int, bank, paste: PasteConfig):
    """(background, real masks, real labels, pastes) of image i of a batch, made from the raw
    background sample (as read from its tar: image bytes, json, ann.zst with full RLE) and the
    bank's encoded instances, following only the plan: nothing from the pipeline."""
    import cv2

    from .. import formats

    meta, anns = formats.read_background(sample)
    if paste.drop_crowd:
        anns = [a for a in anns if not a.get("iscrowd")]
    _, data = formats.background_image(sample)
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    size, flip = paste.output_size, bool(plan.lsj_flip[i])
    background = lsj_image(rgb, plan.lsj_size[i], plan.lsj_offset[i], flip, size)
    full = formats.decode_masks(anns, int(meta["height"]), int(meta["width"]))
    masks = np.array([lsj_mask(m, plan.lsj_size[i], plan.lsj_offset[i], flip, size) for m in full],
                     np.uint8).reshape(-1, size, size)
    labels = [a["category_id"] for a in anns]
    pastes = []
    for k in np.flatnonzero(plan.ids[i] >= 0):
        payload = bank.read(int(plan.ids[i, k]))
        bgr = cv2.imdecode(np.frombuffer(payload["jpg"], np.uint8), cv2.IMREAD_COLOR)
        component, data = formats.instance_mask(payload)
        alpha = formats.decode_alpha(data, component, bgr.shape[1], bgr.shape[0])
        rgba = np.dstack([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), alpha])
        h, w = (int(v) for v in plan.size[i, k])
        rgba = bilinear(rgba, h, w)
        if plan.flip[i, k]:
            rgba = rgba[:, ::-1]
        pastes.append(Paste(np.ascontiguousarray(rgba), int(plan.pos[i, k, 0]),
                            int(plan.pos[i, k, 1]), int(plan.labels[i, k])))
    return background, masks, labels, pastes
