"""Compositor v3: every paste of a batch in a constant number of kernel launches, CPU or GPU.

The work per batch is three element-wise passes over a paste table (one row per paste, built
on the host from the plan, `paste_table`) and one over the real objects' windows:
1. resample: every pixel of every pasted instance at its planned size that lands on the
   canvas (or within the gaussian's reach of it): bilinear from the decoded instance (RGB
   atlas + alpha atlas), flipped, into a scratch RGBA buffer (zeros elsewhere);
2. blur (gaussian blending only): the hard mask's horizontal gaussian sums, padded by 3 sigma;
3. composite: every canvas pixel under a paste, pastes in paste order: hard (copy where the
   hard mask is set), alpha ("over" with the resampled alpha) or gaussian ("over" with the
   blurred hard mask); the id map (1 + slot of the last paste whose hard mask covers the
   pixel) falls out of the same pass;
4. targets: every object's visible mask and its box before and after occlusion and its area,
   in its own window only: the background's masks (box crops as packed bits) put through the
   image's LSJ (nearest neighbour) and cleared under the pastes (id map != 0), each paste's
   hard mask cleared under later pastes (id map != its slot + 1).

Why this shape (docs/LOADER.md has the figures): the v2 graph scheduled 1,089 DALI nodes per
batch at 19 slots (the CPU loader spent ~97 % of its time there). Here the number of launches
is 3 (+1) whatever the number of slots K or images B, and each pass touches only the pixels
it changes (box-local on the CPU, one thread per element on the GPU).

One source for both devices. The per-element bodies (`_resample_pixel`, `_blur_pixel`,
`_composite_pixel`, `_mask_pixel`) are plain Python functions compiled by numba twice: with
`numba.njit` for the CPU drivers (loops over each paste's box) and with `numba.cuda.jit`
(device functions) for the CUDA drivers (one thread per element; the composite thread walks
its image's pastes in paste order, so "later wins" is the same sequence of operations as on
the CPU). Every array index is cast to `np.uint64` where it is used: numba then drops its
negative-index wraparound test, which cost ~16 % of the CPU paste (31.7 -> 26.6 ns per pasted
pixel on 2-core EPYC, the loader's own 640 batches) and ~10 % of the target pass; every
index is non-negative by construction. All arithmetic is integer (fixed-point bilinear
weights of 1/2048 as in OpenCV's INTER_LINEAR, integer "over" blending), so the two devices
give the same bits. The tests run the CUDA drivers under numba's CUDA simulator
(`NUMBA_ENABLE_CUDASIM=1`) against the CPU drivers; what the simulator cannot show is the
real device's launch and memory behaviour: the CUDA drivers are kept to index arithmetic and
the body call, nothing else.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from functools import cache

import numba
import numpy as np
import torch
from numba import cuda  # (no driver is touched until a CUDA kernel runs)

from .config import PasteConfig

# The paste table: one int64 row per paste, columns by name (`PASTE[name]`), rows sorted by
# (image, slot). `rgb_at` / `alpha_at`: where the decoded instance starts in the RGB atlas
# (bytes, (src_h, src_w, 3) row-major) and the alpha atlas ((src_h, src_w)); `y, x, h, w`:
# the resized instance's top-left on the canvas and size; `scratch_at`: its first pixel in the
# scratch RGBA buffer (h * w pixels); `pad_at`: its first entry in the gaussian sums
# ((h + 2r) * (w + 2r)); `top, bottom, left, right`: the canvas pixels the paste can change
# (its box, padded by r for gaussian blending, cut to the canvas; empty when off the canvas).
PASTE_COLUMNS = ("image", "slot", "rgb_at", "alpha_at", "src_h", "src_w", "y", "x", "h", "w",
                 "flip", "scratch_at", "pad_at", "top", "bottom", "left", "right")
PASTE = {name: i for i, name in enumerate(PASTE_COLUMNS)}
(C_IMAGE, C_SLOT, C_RGB_AT, C_ALPHA_AT, C_SRC_H, C_SRC_W, C_Y, C_X, C_H, C_W, C_FLIP,
 C_SCRATCH_AT, C_PAD_AT, C_TOP, C_BOTTOM, C_LEFT, C_RIGHT) = range(len(PASTE_COLUMNS))
# Real objects: one int64 row per object. `box` (y0, x0, h, w) in image pixels, `bits_at` the
# first byte of its packed bits (row-major, MSB first, each crop starting on a byte); the
# image's LSJ: `src_h, src_w` (decoded size), `lsj_h, lsj_w` (resized), `lsj_y, lsj_x` (window
# offset), `flip`; `top, bottom, left, right`: the output window its mask can occupy; `out_at`:
# its first pixel in the flat enumeration of windows (GPU driver).
REAL_COLUMNS = ("image", "by", "bx", "bh", "bw", "bits_at", "src_h", "src_w", "lsj_h", "lsj_w",
                "lsj_y", "lsj_x", "flip", "top", "bottom", "left", "right", "out_at")
REAL = {name: i for i, name in enumerate(REAL_COLUMNS)}
(R_IMAGE, R_BY, R_BX, R_BH, R_BW, R_BITS_AT, R_SRC_H, R_SRC_W, R_LSJ_H, R_LSJ_W, R_LSJ_Y,
 R_LSJ_X, R_FLIP, R_TOP, R_BOTTOM, R_LEFT, R_RIGHT, R_OUT_AT) = range(len(REAL_COLUMNS))
# Per object, what the target pass measures (int64): visible pixels, then the box of the mask
# before occlusion (`placed`: the LSJ'd real mask / the paste's hard mask on the canvas) and
# of the visible mask, each as (y_min, y_max, x_min, x_max) inclusive (min > max: empty).
STATS = ("area", "placed_y0", "placed_y1", "placed_x0", "placed_x1", "visible_y0", "visible_y1",
         "visible_x0", "visible_x1")

BLENDING = {"hard": 0, "alpha": 1, "gaussian": 2}
COEF_BITS = 11                       # bilinear weights in 1/2048 (OpenCV's INTER_RESIZE_COEF_BITS)
GAUSS_BITS = 8                       # each 1-D gaussian tap in 1/256; the 2-D weight in 1/65536


def gaussian_taps(sigma: float) -> np.ndarray:
    """(2r + 1,) int64 taps of a 1-D gaussian, r = ceil(3 sigma), summing to exactly 256."""
    r = math.ceil(3 * sigma)
    g = np.exp(-np.arange(-r, r + 1) ** 2 / (2.0 * sigma * sigma))
    taps = np.round(g / g.sum() * (1 << GAUSS_BITS)).astype(np.int64)
    taps[r] += (1 << GAUSS_BITS) - taps.sum()
    return taps


def blur_radius(paste: PasteConfig) -> int:
    """Pixels the gaussian edge reaches beyond the instance's box (0 for hard / alpha)."""
    return math.ceil(3 * paste.gaussian_sigma) if paste.blending == "gaussian" else 0


# -- the per-element bodies: one source, compiled for the CPU and for CUDA ---------------------
# Source coordinates are their own bodies (`_source_q`, `_nearest`): each needs an integer
# division, which the CPU drivers hoist out of the pixel loop (once per row / column) and the
# CUDA drivers compute per thread.

def _source_q(o, n_in, n_out):
    """Fixed-point (1/2048) source coordinate of output index o of a bilinear resize n_in ->
    n_out with pixel centres aligned: (o + 0.5) n_in / n_out - 0.5, clamped to the input."""
    q = (max(0, (2 * o + 1) * n_in - n_out) << (COEF_BITS - 1)) // n_out
    return min(q, (n_in - 1) << COEF_BITS)


def _nearest(o, n_in, n_out):
    """Source index of output index o of a nearest-neighbour resize n_in -> n_out:
    floor((o + 0.5) n_in / n_out)."""
    return min(((2 * o + 1) * n_in) // (2 * n_out), n_in - 1)


def _resample_pixel(oy, ox, qy, qx, w, sh, sw, scratch_at, rgb_at, alpha_at, rgb, alpha, scratch,
                    mode, threshold):
    """Pixel (oy, ox) of a paste resized to width w, bilinear from its decoded sh x sw instance
    (RGB from byte `rgb_at` of the atlas, alpha from `alpha_at`) at source coordinate (qy, qx)
    (`_source_q`; mirrored when flipped), into scratch row scratch_at + oy w + ox. With hard
    blending a pixel outside the hard mask gets RGB 0 (its colour is never used)."""
    y0 = qy >> COEF_BITS
    x0 = qx >> COEF_BITS
    fy = qy - (y0 << COEF_BITS)
    fx = qx - (x0 << COEF_BITS)
    y1 = min(y0 + 1, sh - 1)
    x1 = min(x0 + 1, sw - 1)
    one = 1 << COEF_BITS
    half = 1 << (2 * COEF_BITS - 1)
    at = scratch_at + oy * w + ox
    top = np.int64(alpha[np.uint64(alpha_at + y0 * sw + x0)]) * (one - fx) + \
        np.int64(alpha[np.uint64(alpha_at + y0 * sw + x1)]) * fx
    bottom = np.int64(alpha[np.uint64(alpha_at + y1 * sw + x0)]) * (one - fx) + \
        np.int64(alpha[np.uint64(alpha_at + y1 * sw + x1)]) * fx
    a = (top * (one - fy) + bottom * fy + half) >> (2 * COEF_BITS)
    scratch[np.uint64(at), 3] = a
    if mode == 0 and a < threshold:
        for c in range(3):
            scratch[np.uint64(at), np.uint64(c)] = 0
        return
    for c in range(3):
        top = np.int64(rgb[np.uint64(rgb_at + (y0 * sw + x0) * 3 + c)]) * (one - fx) + \
            np.int64(rgb[np.uint64(rgb_at + (y0 * sw + x1) * 3 + c)]) * fx
        bottom = np.int64(rgb[np.uint64(rgb_at + (y1 * sw + x0) * 3 + c)]) * (one - fx) + \
            np.int64(rgb[np.uint64(rgb_at + (y1 * sw + x1) * 3 + c)]) * fx
        scratch[np.uint64(at), np.uint64(c)] = (top * (one - fy) + bottom * fy + half) >> (2 * COEF_BITS)


def _blur_pixel(py, px, h, w, scratch_at, pad_at, scratch, sums, taps, radius, threshold):
    """Entry (py, px) of an h x w paste's padded grid ((h + 2r) x (w + 2r)): the horizontal
    gaussian sum of its hard mask (zero outside the instance)."""
    iy = py - radius
    total = 0
    if 0 <= iy < h:
        for d in range(2 * radius + 1):
            ix = px - 2 * radius + d
            if 0 <= ix < w and scratch[np.uint64(scratch_at + iy * w + ix), 3] >= threshold:
                total += taps[np.uint64(d)]
    sums[np.uint64(pad_at + py * (w + 2 * radius) + px)] = total


def _composite_pixel(y, x, ly, lx, h, w, scratch_at, pad_at, image, slot, canvas, ids, scratch,
                     sums, taps, radius, mode, threshold):
    """Canvas pixel (y, x) of image `image` under an h x w paste whose pixel (ly, lx) lies
    there (inside its region, padded by r for gaussian): hard copy, alpha or gaussian "over"
    in integers, and the id map (slot + 1) where its hard mask covers the pixel."""
    inside = 0 <= ly < h and 0 <= lx < w
    at = scratch_at + min(max(ly, 0), h - 1) * w + min(max(lx, 0), w - 1)
    hard = inside and scratch[np.uint64(at), 3] >= threshold
    if mode == 0:
        weight = 255 if hard else 0
    elif mode == 1:
        weight = np.int64(scratch[np.uint64(at), 3]) if inside else 0
    else:
        wide = w + 2 * radius
        total = 0
        for d in range(2 * radius + 1):
            py = ly + d                      # padded row of tap d: (ly + r) + (d - r)
            if 0 <= py < h + 2 * radius:
                total += taps[np.uint64(d)] * sums[np.uint64(pad_at + py * wide + lx + radius)]
        weight = (total * 255 + (1 << (2 * GAUSS_BITS - 1))) >> (2 * GAUSS_BITS)
    if weight == 255:
        for c in range(3):
            canvas[np.uint64(image), np.uint64(c), np.uint64(y), np.uint64(x)] = \
                scratch[np.uint64(at), np.uint64(c)]
    elif weight > 0:
        for c in range(3):
            under = np.int64(canvas[np.uint64(image), np.uint64(c), np.uint64(y), np.uint64(x)])
            over = np.int64(scratch[np.uint64(at), np.uint64(c)])
            canvas[np.uint64(image), np.uint64(c), np.uint64(y), np.uint64(x)] = \
                (under * (255 - weight) + over * weight + 127) // 255
    if hard:
        ids[np.uint64(image), np.uint64(y), np.uint64(x)] = slot + 1


def _mask_pixel(o, r, j, sy, sx, objects, bits, out):
    """Output pixel (r, j) of real object o, whose source pixel in the image is (sy, sx)
    (`_nearest` of the window row / unflipped column): the bit of its box crop there."""
    cy = sy - objects[o, R_BY]
    cx = sx - objects[o, R_BX]
    if 0 <= cy < objects[o, R_BH] and 0 <= cx < objects[o, R_BW]:
        i = cy * objects[o, R_BW] + cx
        out[o, r, j] = (bits[objects[o, R_BITS_AT] + (i >> 3)] >> (7 - (i & 7))) & 1


def _real_target_pixel(y, x, cy, cx, bh, bw, bits_at, image, bits, ids):
    """Output pixel (y, x) of a real object whose box crop (bh x bw bits from byte `bits_at`)
    has its pixel (cy, cx) under it (`_nearest` minus the box's corner): 1 if the mask covers
    it, 2 if also no paste does (its visible mask), else 0."""
    if not (0 <= cy < bh and 0 <= cx < bw):
        return 0
    i = cy * bw + cx
    if (bits[np.uint64(bits_at + (i >> 3))] >> (7 - (i & 7))) & 1 == 0:
        return 0
    return 1 if ids[np.uint64(image), np.uint64(y), np.uint64(x)] != 0 else 2


def _pasted_target_pixel(y, x, ly, lx, h, w, scratch_at, image, slot, scratch, ids, threshold):
    """Canvas pixel (y, x) of a paste placed h x w with (ly, lx) its pixel there: 1 if its
    hard mask covers it, 2 if no later paste covers it too (its visible mask), else 0."""
    if not (0 <= ly < h and 0 <= lx < w):
        return 0
    if scratch[np.uint64(scratch_at + ly * w + lx), 3] < threshold:
        return 0
    return 1 if ids[np.uint64(image), np.uint64(y), np.uint64(x)] != slot + 1 else 2


def _keeps(area, py0, py1, px0, px1, vy0, vy1, vx0, vx1, max_shift, min_area):
    """The keep rule on one object's `STATS`: pixels left, and its box moved at most
    `max_shift` px from where it was placed or more than `min_area` pixels remain (area > 0
    implies both boxes are non-empty; their exclusive max sides move as the inclusive ones)."""
    if area <= 0:
        return False
    shift = max(abs(vy0 - py0), abs(vy1 - py1), abs(vx0 - px0), abs(vx1 - px1))
    return shift <= max_shift or area > min_area


_jit = numba.njit(cache=True, nogil=True)
_body = numba.njit(cache=True, nogil=True, inline="always")   # inlined into the drivers' loops
_source_q_cpu = _body(_source_q)
_nearest_cpu = _body(_nearest)
_resample_cpu = _body(_resample_pixel)
_blur_cpu = _body(_blur_pixel)
_composite_cpu = _body(_composite_pixel)
_mask_cpu = _body(_mask_pixel)
_real_target_cpu = _body(_real_target_pixel)
_pasted_target_cpu = _body(_pasted_target_pixel)
_keeps_cpu = _body(_keeps)


# -- CPU drivers: box-local loops, coordinates once per row / column --------------------------

@_jit
def _paste_cpu(table, rgb, alpha, scratch, sums, taps, radius, canvas, ids, mode, threshold):
    """Paste by paste in paste order: resample its pixels near the canvas and, for hard and
    alpha blending (no neighbourhood), composite each at once; gaussian blending composites
    after every paste's sums (the CUDA drivers run the three passes one after the other)."""
    for row in range(table.shape[0]):
        h, w, sh, sw = table[row, C_H], table[row, C_W], table[row, C_SRC_H], table[row, C_SRC_W]
        scratch_at, rgb_at, alpha_at = table[row, C_SCRATCH_AT], table[row, C_RGB_AT], table[row, C_ALPHA_AT]
        size = canvas.shape[2]                    # only what lands within r of the canvas
        oy0, oy1 = max(0, -radius - table[row, C_Y]), min(h, size + radius - table[row, C_Y])
        ox0, ox1 = max(0, -radius - table[row, C_X]), min(w, size + radius - table[row, C_X])
        qx = np.empty(w, np.int64)
        for ox in range(ox0, ox1):
            qx[ox] = _source_q_cpu(w - 1 - ox if table[row, C_FLIP] else ox, sw, w)
        y0, x0, pad_at = table[row, C_Y], table[row, C_X], table[row, C_PAD_AT]
        image, slot = table[row, C_IMAGE], table[row, C_SLOT]
        for oy in range(oy0, oy1):
            qy = _source_q_cpu(oy, sh, h)
            for ox in range(ox0, ox1):
                _resample_cpu(oy, ox, qy, qx[ox], w, sh, sw, scratch_at, rgb_at, alpha_at, rgb,
                              alpha, scratch, mode, threshold)
                if mode != 2:   # no neighbourhood: composite at once (the same pixels, in order)
                    _composite_cpu(y0 + oy, x0 + ox, oy, ox, h, w, scratch_at, pad_at, image, slot,
                                   canvas, ids, scratch, sums, taps, radius, mode, threshold)
    if mode != 2:
        return
    for row in range(table.shape[0]):
        h, w = table[row, C_H], table[row, C_W]
        scratch_at, pad_at = table[row, C_SCRATCH_AT], table[row, C_PAD_AT]
        for py in range(h + 2 * radius):
            for px in range(w + 2 * radius):
                _blur_cpu(py, px, h, w, scratch_at, pad_at, scratch, sums, taps, radius, threshold)
    for row in range(table.shape[0]):            # gaussian: after every paste's sums
        y0, x0, h, w = table[row, C_Y], table[row, C_X], table[row, C_H], table[row, C_W]
        scratch_at, pad_at = table[row, C_SCRATCH_AT], table[row, C_PAD_AT]
        image, slot = table[row, C_IMAGE], table[row, C_SLOT]
        for y in range(table[row, C_TOP], table[row, C_BOTTOM]):
            for x in range(table[row, C_LEFT], table[row, C_RIGHT]):
                _composite_cpu(y, x, y - y0, x - x0, h, w, scratch_at, pad_at, image, slot, canvas,
                               ids, scratch, sums, taps, radius, mode, threshold)


@_jit
def _masks_cpu(objects, bits, out):
    size = out.shape[1]
    for o in range(objects.shape[0]):
        left, right = objects[o, R_LEFT], objects[o, R_RIGHT]
        sx = np.empty(max(right - left, 0), np.int64)
        for j in range(left, right):
            u = size - 1 - j if objects[o, R_FLIP] else j          # unflipped window column
            sx[j - left] = _nearest_cpu(objects[o, R_LSJ_X] + u, objects[o, R_SRC_W], objects[o, R_LSJ_W])
        for r in range(objects[o, R_TOP], objects[o, R_BOTTOM]):
            sy = _nearest_cpu(objects[o, R_LSJ_Y] + r, objects[o, R_SRC_H], objects[o, R_LSJ_H])
            for j in range(left, right):
                _mask_cpu(o, r, j, sy, sx[j - left], objects, bits, out)


@_body
def _fold(kind, y, x, acc):
    """Pixel (y, x) of kind 1 (placed) or 2 (placed and visible) into an object's running
    `STATS` (a 9-tuple: area, placed box, visible box)."""
    area, py0, py1, px0, px1, vy0, vy1, vx0, vx1 = acc
    py0, py1, px0, px1 = min(py0, y), max(py1, y), min(px0, x), max(px1, x)
    if kind == 2:
        area += 1
        vy0, vy1, vx0, vx1 = min(vy0, y), max(vy1, y), min(vx0, x), max(vx1, x)
    return area, py0, py1, px0, px1, vy0, vy1, vx0, vx1


@_jit
def _object_cpu(o, objects, bits, table, scratch, ids, stats, masks, row_out, threshold):
    """One object's window (o < len(objects): real object o, else paste o - len(objects)):
    its `STATS` into stats[o] and, if row_out >= 0, its visible mask into masks[row_out].
    Returns the window (y0, y1, x0, x1)."""
    size = ids.shape[1]
    n_real = objects.shape[0]
    acc = (0, size, -1, size, -1, size, -1, size, -1)
    if o < n_real:
        y0, y1, x0, x1 = objects[o, R_TOP], objects[o, R_BOTTOM], objects[o, R_LEFT], objects[o, R_RIGHT]
        by, bx, bh, bw = objects[o, R_BY], objects[o, R_BX], objects[o, R_BH], objects[o, R_BW]
        bits_at, image = objects[o, R_BITS_AT], objects[o, R_IMAGE]
        cx = np.empty(max(x1 - x0, 0), np.int64)
        for j in range(x0, x1):
            u = size - 1 - j if objects[o, R_FLIP] else j
            cx[j - x0] = _nearest_cpu(objects[o, R_LSJ_X] + u, objects[o, R_SRC_W], objects[o, R_LSJ_W]) - bx
        for y in range(y0, y1):
            cy = _nearest_cpu(objects[o, R_LSJ_Y] + y, objects[o, R_SRC_H], objects[o, R_LSJ_H]) - by
            for x in range(x0, x1):
                kind = _real_target_cpu(y, x, cy, cx[x - x0], bh, bw, bits_at, image, bits, ids)
                if kind:
                    acc = _fold(kind, y, x, acc)
                    if kind == 2 and row_out >= 0:
                        masks[np.uint64(row_out), np.uint64(y), np.uint64(x)] = 1
    else:
        row = o - n_real
        py, px, h, w = table[row, C_Y], table[row, C_X], table[row, C_H], table[row, C_W]
        y0, y1, x0, x1 = max(py, 0), min(py + h, size), max(px, 0), min(px + w, size)
        scratch_at, image, slot = table[row, C_SCRATCH_AT], table[row, C_IMAGE], table[row, C_SLOT]
        for y in range(y0, y1):
            for x in range(x0, x1):
                kind = _pasted_target_cpu(y, x, y - py, x - px, h, w, scratch_at, image, slot,
                                          scratch, ids, threshold)
                if kind:
                    acc = _fold(kind, y, x, acc)
                    if kind == 2 and row_out >= 0:
                        masks[np.uint64(row_out), np.uint64(y), np.uint64(x)] = 1
    for k in range(9):
        stats[o, k] = acc[k]
    return y0, y1, x0, x1


@_jit
def _targets_cpu(objects, bits, table, scratch, ids, stats, keep, masks, threshold, max_shift,
                 min_area):
    """One pass: image after image, its real objects then its pastes, each written to the
    next free mask row and kept there if the keep rule holds (else its window is cleared)."""
    n_real = objects.shape[0]
    real = paste = out = 0
    for b in range(ids.shape[0]):
        while real < n_real and objects[real, R_IMAGE] == b or \
                paste < table.shape[0] and table[paste, C_IMAGE] == b:
            if real < n_real and objects[real, R_IMAGE] == b:
                o, real = real, real + 1
            else:
                o, paste = n_real + paste, paste + 1
            y0, y1, x0, x1 = _object_cpu(o, objects, bits, table, scratch, ids, stats, masks, out,
                                         threshold)
            st = stats[o]
            keep[o] = _keeps_cpu(st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8],
                                 max_shift, min_area)
            if keep[o]:
                out += 1
            else:
                masks[out, y0:y1, x0:x1] = 0


# -- CUDA drivers: one thread per element ------------------------------------------------------

@cache
def cuda_kernels():
    """The CUDA drivers, compiled on first use (under NUMBA_ENABLE_CUDASIM=1: simulated)."""
    source_q = cuda.jit(device=True)(_source_q)
    nearest = cuda.jit(device=True)(_nearest)
    resample = cuda.jit(device=True)(_resample_pixel)
    blur = cuda.jit(device=True)(_blur_pixel)
    composite = cuda.jit(device=True)(_composite_pixel)
    mask = cuda.jit(device=True)(_mask_pixel)

    @cuda.jit(device=True)
    def owner(starts, n, t):
        """The row whose range [starts[row], starts[row + 1]) holds t (starts ascending)."""
        lo, hi = 0, n - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if starts[mid] <= t:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @cuda.jit
    def resample_kernel(table, starts, total, rgb, alpha, scratch, mode, threshold, size, radius):
        t = cuda.grid(1)
        if t < total:
            row = owner(starts, table.shape[0], t)
            h, w = table[row, C_H], table[row, C_W]
            oy = (t - starts[row]) // w
            ox = (t - starts[row]) - oy * w
            cy, cx = table[row, C_Y] + oy, table[row, C_X] + ox
            if cy < -radius or cy >= size + radius or cx < -radius or cx >= size + radius:
                return                                # farther than r off the canvas
            sh, sw = table[row, C_SRC_H], table[row, C_SRC_W]
            qy = source_q(oy, sh, h)
            qx = source_q(w - 1 - ox if table[row, C_FLIP] else ox, sw, w)
            resample(oy, ox, qy, qx, w, sh, sw, table[row, C_SCRATCH_AT], table[row, C_RGB_AT],
                     table[row, C_ALPHA_AT], rgb, alpha, scratch, mode, threshold)

    @cuda.jit
    def blur_kernel(table, starts, total, scratch, sums, taps, radius, threshold):
        t = cuda.grid(1)
        if t < total:
            row = owner(starts, table.shape[0], t)
            wide = table[row, C_W] + 2 * radius
            py = (t - starts[row]) // wide
            blur(py, (t - starts[row]) - py * wide, table[row, C_H], table[row, C_W],
                 table[row, C_SCRATCH_AT], table[row, C_PAD_AT], scratch, sums, taps, radius,
                 threshold)

    @cuda.jit
    def composite_kernel(table, image_rows, canvas, ids, scratch, sums, taps, radius, mode,
                         threshold):
        t = cuda.grid(1)
        size = canvas.shape[2]
        if t < canvas.shape[0] * size * size:
            b = t // (size * size)
            y = (t // size) % size
            x = t % size
            for row in range(image_rows[b], image_rows[b + 1]):      # paste order
                if table[row, C_TOP] <= y < table[row, C_BOTTOM] and \
                        table[row, C_LEFT] <= x < table[row, C_RIGHT]:
                    composite(y, x, y - table[row, C_Y], x - table[row, C_X], table[row, C_H],
                              table[row, C_W], table[row, C_SCRATCH_AT], table[row, C_PAD_AT], b,
                              table[row, C_SLOT], canvas, ids, scratch, sums, taps, radius, mode,
                              threshold)

    @cuda.jit
    def masks_kernel(objects, starts, total, bits, out):
        t = cuda.grid(1)
        if t < total:
            o = owner(starts, objects.shape[0], t)
            cols = objects[o, R_RIGHT] - objects[o, R_LEFT]
            r = objects[o, R_TOP] + (t - starts[o]) // cols
            j = objects[o, R_LEFT] + (t - starts[o]) % cols
            size = out.shape[1]
            u = size - 1 - j if objects[o, R_FLIP] else j
            sy = nearest(objects[o, R_LSJ_Y] + r, objects[o, R_SRC_H], objects[o, R_LSJ_H])
            sx = nearest(objects[o, R_LSJ_X] + u, objects[o, R_SRC_W], objects[o, R_LSJ_W])
            mask(o, r, j, sy, sx, objects, bits, out)

    real_target = cuda.jit(device=True)(_real_target_pixel)
    pasted_target = cuda.jit(device=True)(_pasted_target_pixel)

    @cuda.jit
    def targets_kernel(objects, n_real, real_starts, real_total, table, n_paste, paste_starts,
                       paste_total, bits, scratch, ids, stats, out_row, write, masks, threshold):
        """One thread per pixel of every object's window: pass 1 (write 0) folds it into the
        object's stats with atomics, pass 2 (write 1) writes the visible masks kept."""
        t = cuda.grid(1)
        size = ids.shape[1]
        kind = 0
        if t < real_total:
            o = owner(real_starts, n_real, t)
            cols = objects[o, R_RIGHT] - objects[o, R_LEFT]
            y = objects[o, R_TOP] + (t - real_starts[o]) // cols
            x = objects[o, R_LEFT] + (t - real_starts[o]) % cols
            u = size - 1 - x if objects[o, R_FLIP] else x
            cy = nearest(objects[o, R_LSJ_Y] + y, objects[o, R_SRC_H], objects[o, R_LSJ_H]) - objects[o, R_BY]
            cx = nearest(objects[o, R_LSJ_X] + u, objects[o, R_SRC_W], objects[o, R_LSJ_W]) - objects[o, R_BX]
            kind = real_target(y, x, cy, cx, objects[o, R_BH], objects[o, R_BW], objects[o, R_BITS_AT],
                               objects[o, R_IMAGE], bits, ids)
        elif t < real_total + paste_total:
            p = t - real_total
            row = owner(paste_starts, n_paste, p)
            y0, x0 = max(table[row, C_Y], 0), max(table[row, C_X], 0)
            cols = min(table[row, C_X] + table[row, C_W], size) - x0
            y = y0 + (p - paste_starts[row]) // cols
            x = x0 + (p - paste_starts[row]) % cols
            o = n_real + row
            kind = pasted_target(y, x, y - table[row, C_Y], x - table[row, C_X], table[row, C_H],
                                 table[row, C_W], table[row, C_SCRATCH_AT], table[row, C_IMAGE],
                                 table[row, C_SLOT], scratch, ids, threshold)
        if kind == 0:
            return
        if write:
            if kind == 2 and out_row[o] >= 0:
                masks[out_row[o], y, x] = 1
            return
        cuda.atomic.min(stats, (o, 1), y)
        cuda.atomic.max(stats, (o, 2), y)
        cuda.atomic.min(stats, (o, 3), x)
        cuda.atomic.max(stats, (o, 4), x)
        if kind == 2:
            cuda.atomic.add(stats, (o, 0), 1)
            cuda.atomic.min(stats, (o, 5), y)
            cuda.atomic.max(stats, (o, 6), y)
            cuda.atomic.min(stats, (o, 7), x)
            cuda.atomic.max(stats, (o, 8), x)

    return resample_kernel, blur_kernel, composite_kernel, masks_kernel, targets_kernel


THREADS = 256


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


# -- host side: tables from the plan, and the two entry points ---------------------------------

def paste_table(plan, src_sizes: np.ndarray, rgb_at: np.ndarray, alpha_at: np.ndarray,
                paste: PasteConfig) -> np.ndarray:
    """(P, len(PASTE_COLUMNS)) int64 for the active slots of `plan` (PastePlan of B images),
    rows in (image, slot) order; `src_sizes` (P, 2) (h, w) of the decoded instances and their
    atlas offsets, in the same order."""
    size, r = paste.output_size, blur_radius(paste)
    image, slot = np.nonzero(plan.active)
    n = len(image)
    table = np.zeros((n, len(PASTE_COLUMNS)), np.int64)
    if n == 0:
        return table
    hw = plan.size[image, slot].astype(np.int64)
    yx = plan.pos[image, slot].astype(np.int64)
    table[:, C_IMAGE], table[:, C_SLOT] = image, slot
    table[:, C_RGB_AT], table[:, C_ALPHA_AT] = rgb_at, alpha_at
    table[:, [C_SRC_H, C_SRC_W]] = src_sizes
    table[:, [C_Y, C_X]] = yx
    table[:, [C_H, C_W]] = hw
    table[:, C_FLIP] = plan.flip[image, slot]
    pixels = hw[:, 0] * hw[:, 1]
    table[:, C_SCRATCH_AT] = np.cumsum(pixels) - pixels
    padded = (hw[:, 0] + 2 * r) * (hw[:, 1] + 2 * r) if r else np.zeros(n, np.int64)
    table[:, C_PAD_AT] = np.cumsum(padded) - padded
    lo = np.clip(yx - r, 0, size)
    hi = np.clip(yx + hw + r, 0, size)
    hi = np.where((hi > lo).all(1, keepdims=True), hi, lo)      # off the canvas: empty
    table[:, [C_TOP, C_LEFT]] = lo
    table[:, [C_BOTTOM, C_RIGHT]] = hi
    return table


def _first_at_least(origin: np.ndarray, length: np.ndarray, bound: np.ndarray,
                    limit: np.ndarray) -> np.ndarray:
    """Smallest window index r >= 0 with floor((2 (origin + r) + 1) length / (2 limit)) >=
    bound: the first output row (column) whose source row falls at or after `bound`."""
    r = -((-(2 * limit * bound - length)) // (2 * length)) - origin    # ceil((2 L b - l) / 2l)
    return np.maximum(r, 0)


def real_object_table(boxes: np.ndarray, counts: np.ndarray, plan, size: int) -> np.ndarray:
    """(N, len(REAL_COLUMNS)) int64 for the batch's real objects (`boxes` (N, 4) y0, x0, h, w
    of every image's objects, image after image; `counts` objects per image): each object's
    LSJ and the output window its mask can occupy, computed exactly as the kernel samples."""
    n = len(boxes)
    table = np.zeros((n, len(REAL_COLUMNS)), np.int64)
    if n == 0:
        return table
    image = np.repeat(np.arange(len(counts)), counts)
    boxes = boxes.astype(np.int64)
    table[:, [R_BY, R_BX, R_BH, R_BW]] = boxes
    nbytes = (boxes[:, 2] * boxes[:, 3] + 7) // 8
    table[:, R_BITS_AT] = np.cumsum(nbytes) - nbytes
    src, lsj, off = (plan.image_sizes[image].astype(np.int64), plan.lsj_size[image].astype(np.int64),
                     plan.lsj_offset[image].astype(np.int64))
    flip = plan.lsj_flip[image].astype(bool)
    table[:, [R_SRC_H, R_SRC_W]] = src
    table[:, [R_LSJ_H, R_LSJ_W]] = lsj
    table[:, [R_LSJ_Y, R_LSJ_X]] = off
    table[:, R_FLIP] = flip
    table[:, R_IMAGE] = image
    valid = np.minimum(size, lsj - off)                   # window rows / columns on the image
    start = _first_at_least(off, src, boxes[:, 0:2], lsj)
    stop = _first_at_least(off, src, boxes[:, 0:2] + boxes[:, 2:4], lsj)
    start, stop = np.minimum(start, valid), np.minimum(stop, valid)
    stop = np.maximum(stop, start)
    table[:, R_TOP], table[:, R_BOTTOM] = start[:, 0], stop[:, 0]
    left = np.where(flip, size - stop[:, 1], start[:, 1])
    right = np.where(flip, size - start[:, 1], stop[:, 1])
    table[:, R_LEFT], table[:, R_RIGHT] = left, right
    area = (table[:, R_BOTTOM] - table[:, R_TOP]) * (table[:, R_RIGHT] - table[:, R_LEFT])
    table[:, R_OUT_AT] = np.cumsum(area) - area
    return table


HUGE_PAGE_BYTES = 4 << 20


def zeros(shape: tuple, dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU from fresh anonymous memory: pages nobody writes are never
    touched (torch.zeros writes every byte: ~9 ms per 640 image for the masks), and large
    buffers ask for transparent huge pages, since the kernel's zeroing of 4 KiB pages on first
    write (one fault per page a mask row touches) cost ~5 ms per 640 image here."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    nbytes = int(np.prod(shape)) * np_dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.from_numpy(np.zeros(shape, np_dtype))
    memory = mmap.mmap(-1, nbytes)
    with contextlib.suppress(OSError):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.from_numpy(np.frombuffer(memory, np_dtype).reshape(shape))


def _device_array(tensor: torch.Tensor):
    """The numba view of a tensor: numpy on the CPU, a CUDA array interface on a GPU."""
    if tensor.device.type == "cpu":
        return tensor.numpy()
    return cuda.as_cuda_array(tensor)


def paste_batch(canvas: torch.Tensor, table: np.ndarray, rgb: torch.Tensor, alpha: torch.Tensor,
                paste: PasteConfig, simulate_cuda: bool = False) -> dict[str, torch.Tensor]:
    """Composite every paste of `table` into `canvas` (B, 3, S, S) uint8, in place, on the
    canvas's device. Returns the id map (B, S, S) uint8 and the resampled instances
    (`scratch`, (sum h w, 4) uint8 RGBA, paste after paste: what `object_targets` reads and
    debugging shows). `simulate_cuda` runs the CUDA drivers on CPU tensors (with
    NUMBA_ENABLE_CUDASIM=1)."""
    b, _, size, _ = canvas.shape
    device = canvas.device
    radius = blur_radius(paste)
    mode = BLENDING[paste.blending]
    threshold = paste.mask_threshold
    pixels = int((table[:, C_H] * table[:, C_W]).sum()) if len(table) else 0
    padded = int(((table[:, C_H] + 2 * radius) * (table[:, C_W] + 2 * radius)).sum()) \
        if len(table) and radius else 0
    ids = zeros((b, size, size), torch.uint8, device)
    scratch = zeros((max(pixels, 1), 4), torch.uint8, device)   # 0 farther than r off the canvas
    sums = torch.empty(max(padded, 1), dtype=torch.int64, device=device)
    taps = gaussian_taps(paste.gaussian_sigma) if radius else np.zeros(1, np.int64)
    if len(table) == 0:
        return {"ids": ids, "scratch": scratch[:0]}
    if device.type == "cpu" and not simulate_cuda:
        _paste_cpu(table, rgb.numpy(), alpha.numpy(), scratch.numpy(), sums.numpy(), taps,
                   radius, canvas.numpy(), ids.numpy(), mode, threshold)
        return {"ids": ids, "scratch": scratch[:pixels]}
    resample_k, blur_k, composite_k, *_ = cuda_kernels()
    dev = _to_device(device, table=table, taps=taps, starts=table[:, C_SCRATCH_AT],
                     pad_starts=table[:, C_PAD_AT],
                     image_rows=np.searchsorted(table[:, C_IMAGE], np.arange(b + 1)))
    view = {name: _device_array(t) for name, t in (("rgb", rgb), ("alpha", alpha), ("scratch", scratch),
                                                   ("sums", sums), ("canvas", canvas), ("ids", ids))}
    with _numba_stream(device) as stream:
        resample_k[_blocks(pixels), THREADS, stream](
            dev["table"], dev["starts"], pixels, view["rgb"], view["alpha"], view["scratch"], mode,
            threshold, size, radius)
        if radius:
            blur_k[_blocks(padded), THREADS, stream](
                dev["table"], dev["pad_starts"], padded, view["scratch"], view["sums"], dev["taps"],
                radius, threshold)
        composite_k[_blocks(b * size * size), THREADS, stream](
            dev["table"], dev["image_rows"], view["canvas"], view["ids"], view["scratch"],
            view["sums"], dev["taps"], radius, mode, threshold)
    return {"ids": ids, "scratch": scratch[:pixels]}


class ObjectTargets:
    """The target pass over every object of a batch: real ones (`objects`) and pastes (`table`
    rows). `run()` returns each object's `STATS` (N, 9) (visible area, box before and after
    occlusion) and keep decision on the host, and the visible masks of the kept objects, image
    after image (its real objects, then its pastes), as one (M, S, S) uint8 tensor on the
    device: real masks LSJ'd from their packed bits and cleared where any paste landed, pasted
    hard masks cleared where a later paste covers them. Only each object's window is visited.
    On the CPU one pass does it all (a dropped object's window is cleared again); on a GPU a
    measuring pass, the keep decisions on the host (the batch's one device -> host transfer),
    then a pass writing the kept masks."""

    def __init__(self, objects: np.ndarray, bits: torch.Tensor, table: np.ndarray,
                 scratch: torch.Tensor, ids: torch.Tensor, paste: PasteConfig,
                 simulate_cuda: bool = False):
        self.objects, self.bits, self.table, self.scratch, self.ids = objects, bits, table, scratch, ids
        self.paste, self.size = paste, ids.shape[1]
        self.n = len(objects) + len(table)
        self.on_cpu = ids.device.type == "cpu" and not simulate_cuda

    def run(self, to_host) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """(stats (N, 9), keep (N,) bool, masks (kept, S, S)); `to_host` brings the stats over."""
        device, size, p = self.ids.device, self.size, self.paste
        init = np.array([0, size, -1, size, -1, size, -1, size, -1], np.int64)
        stats = torch.from_numpy(np.tile(init, (self.n, 1))).to(device)
        masks = zeros((max(self.n, 1), size, size), torch.uint8, device)
        if self.on_cpu:
            keep = np.zeros(self.n, bool)
            if self.n:
                _targets_cpu(self.objects, self.bits.numpy(), self.table, self.scratch.numpy(),
                             self.ids.numpy(), stats.numpy(), keep, masks.numpy(),
                             p.mask_threshold, p.keep_max_box_shift, p.keep_min_area)
            return to_host(stats), keep, masks[:int(keep.sum())]
        if self.n:
            self._cuda(stats, np.zeros(0, np.int64), masks)
        st = to_host(stats)
        keep = np.array([_keeps(*row, p.keep_max_box_shift, p.keep_min_area) for row in st.tolist()],
                        bool).reshape(-1)
        image = np.concatenate([self.objects[:, R_IMAGE], self.table[:, C_IMAGE]])
        first = np.lexsort((np.arange(self.n) >= len(self.objects), image))   # image, real first
        order = first[keep[first]]
        out_row = np.full(self.n, -1, np.int64)
        out_row[order] = np.arange(len(order))
        if len(order):
            self._cuda(stats, out_row, masks)
        return st, keep, masks[:len(order)]

    def _cuda(self, stats: torch.Tensor, out_row: np.ndarray, masks: torch.Tensor) -> None:
        """Pass 1 (`out_row` empty): stats with atomics; pass 2: the masks of out_row >= 0."""
        objects, table, size = self.objects, self.table, self.size
        real_area = (objects[:, R_BOTTOM] - objects[:, R_TOP]) * (objects[:, R_RIGHT] - objects[:, R_LEFT])
        rows = np.clip(table[:, C_Y] + table[:, C_H], 0, size) - np.clip(table[:, C_Y], 0, size)
        cols = np.clip(table[:, C_X] + table[:, C_W], 0, size) - np.clip(table[:, C_X], 0, size)
        paste_area = np.where((rows > 0) & (cols > 0), rows * cols, 0)
        real_total, paste_total = int(real_area.sum()), int(paste_area.sum())
        dev = _to_device(self.ids.device, objects=objects, table=table,
                         real_starts=objects[:, R_OUT_AT], paste_starts=np.cumsum(paste_area) - paste_area,
                         out_row=out_row)
        *_, targets_k = cuda_kernels()
        with _numba_stream(self.ids.device) as stream:
            targets_k[_blocks(real_total + paste_total), THREADS, stream](
                dev["objects"], len(objects), dev["real_starts"], real_total, dev["table"], len(table),
                dev["paste_starts"], paste_total, _device_array(self.bits), _device_array(self.scratch),
                _device_array(self.ids), _device_array(stats), dev["out_row"], int(len(out_row) > 0),
                _device_array(masks), self.paste.mask_threshold)


def _to_device(device: torch.device, **arrays: np.ndarray) -> dict:
    """Host int64 arrays as numba device views, copied without waiting (host -> device); an
    empty array becomes one row of zeros (the kernels are given the true counts)."""
    def one(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, np.int64)
        return a if a.size else np.zeros((1,) + a.shape[1:], np.int64)
    return {name: _device_array(torch.from_numpy(one(a)).to(device, non_blocking=True))
            for name, a in arrays.items()}


def real_masks(objects: np.ndarray, bits: torch.Tensor, size: int,
               simulate_cuda: bool = False) -> torch.Tensor:
    """(N, S, S) uint8 0/1: the LSJ'd masks of the batch's real objects (`real_object_table`),
    before any paste, from their packed box crops `bits` (uint8, on the output's device);
    `object_targets` gives the visible ones."""
    device = bits.device
    out = zeros((len(objects), size, size), torch.uint8, device)
    if len(objects) == 0:
        return out
    if device.type == "cpu" and not simulate_cuda:
        _masks_cpu(objects, bits.numpy(), out.numpy())
        return out
    masks_k = cuda_kernels()[3]
    last = objects[-1]
    total = int(last[R_OUT_AT] + (last[R_BOTTOM] - last[R_TOP]) * (last[R_RIGHT] - last[R_LEFT]))
    if total == 0:
        return out
    dev = _to_device(device, objects=objects, starts=objects[:, R_OUT_AT])
    with _numba_stream(device) as stream:
        masks_k[_blocks(total), THREADS, stream](dev["objects"], dev["starts"], total,
                                                 _device_array(bits), _device_array(out))
    return out


class _numba_stream:
    """numba launches on torch's current stream of `device` (so they are ordered with the
    DALI -> torch copies before and the torch target algebra after, with no host sync); the
    simulator and CPU tensors take the default stream (0)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type != "cuda":
            return 0
        return cuda.external_stream(torch.cuda.current_stream(self.device).cuda_stream)

    def __exit__(self, *exc) -> None:
        return None
