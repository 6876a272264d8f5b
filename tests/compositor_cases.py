"""Batches for the compositor's tests, and what the numpy reference says they must give.

`make_case` builds, from a seed, a batch of three images on an S x S canvas: one without pastes,
one with 19 (random sizes and flips, hanging over every border, one fully covered by a later
paste), one with four hanging over the four corners; random instances with soft alphas; real
objects with random box crops under random LSJs (flipped and not, shrunk and enlarged).
`expected` computes every output with the reference (xpaste_stream.loader.reference) alone.
Run as a script (`python compositor_cases.py cpu|cuda-sim`) it prints a JSON verdict: the CUDA
simulator test runs it in a subprocess with NUMBA_ENABLE_CUDASIM=1.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from xpaste_stream.loader import composite as C
from xpaste_stream.loader.config import PasteConfig
from xpaste_stream.loader.plan import PastePlan
from xpaste_stream.loader.reference import Paste, bilinear, box_of, composite, lsj_mask, on_canvas

SLOTS = 19


def make_case(seed: int, size: int, blending: str) -> dict:
    rng = np.random.default_rng(seed)
    b, k = 3, SLOTS
    paste = PasteConfig(output_size=size, max_pastes=k, blending=blending, gaussian_sigma=1.0)
    counts = [0, k, 4]
    ids = np.full((b, k), -1, np.int64)
    sizes = np.ones((b, k, 2), np.int32)
    pos = np.zeros((b, k, 2), np.int32)
    flip = np.zeros((b, k), bool)
    instances = []
    for i, n in enumerate(counts):
        for s in range(n):
            ids[i, s] = len(instances)
            sh, sw = (int(v) for v in rng.integers(3, 16, 2))
            rgb = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
            alpha = rng.integers(0, 256, (sh, sw), dtype=np.uint8)
            alpha[sh // 4:sh - sh // 4, sw // 4:sw - sw // 4] = 255      # an opaque core
            alpha[rng.random((sh, sw)) < 0.2] = 0
            instances.append((rgb, alpha))
            sizes[i, s] = rng.integers(3, size // 2, 2)
            pos[i, s] = rng.integers(-size // 3, size, 2)
            flip[i, s] = rng.random() < 0.5
    # image 1: slot 6 fully covers slot 5 with an opaque instance; image 2: the four corners
    pos[1, 6], sizes[1, 6] = pos[1, 5] - 1, sizes[1, 5] + 2
    instances[ids[1, 6]][1][:] = 255
    corners = [(-3, -4), (-2, size - 5), (size - 4, -3), (size - 5, size - 6)]
    pos[2, :4], sizes[2, :4] = corners, (9, 10)
    plan = PastePlan(np.arange(b), np.zeros((b, 2), np.int32), np.zeros((b, 2), np.int32),
                     np.zeros((b, 2), np.int32), np.zeros(b, bool), ids, ids.copy(), sizes, pos, flip)
    # real objects under each image's LSJ
    image_sizes = rng.integers(size // 2, 2 * size, (b, 2)).astype(np.int32)
    lsj_size = np.maximum(1, (image_sizes * rng.uniform(0.3, 2.0, (b, 1)))).astype(np.int32)
    lsj_offset = (rng.random((b, 2)) * np.maximum(0, lsj_size - size + 1)).astype(np.int32)
    plan.image_sizes, plan.lsj_size, plan.lsj_offset = image_sizes, lsj_size, lsj_offset
    plan.lsj_flip = np.array([False, True, True])
    boxes, crops, real_counts = [], [], []
    for i in range(b):
        n = int(rng.integers(0, 5)) if i else 0
        real_counts.append(n)
        for _ in range(n):
            h, w = (int(v) for v in image_sizes[i])
            bh, bw = int(rng.integers(1, h // 2)), int(rng.integers(1, w // 2))
            y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            boxes.append((y0, x0, bh, bw))
            crops.append(rng.random((bh, bw)) < 0.6)
    background = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    return {"paste": paste, "plan": plan, "instances": instances, "background": background,
            "boxes": np.array(boxes, np.int64).reshape(-1, 4), "crops": crops,
            "real_counts": np.array(real_counts)}


def inputs_of(case: dict) -> dict:
    """What the loader hands the compositor for the case: tables, atlases, packed bits."""
    plan, paste = case["plan"], case["paste"]
    used = plan.ids[plan.active]
    src = np.array([case["instances"][i][1].shape for i in used], np.int64).reshape(-1, 2)
    rgb_len = src[:, 0] * src[:, 1] * 3
    table = C.paste_table(plan, src, np.cumsum(rgb_len) - rgb_len,
                          np.cumsum(rgb_len // 3) - rgb_len // 3, paste)
    rgb = np.concatenate([case["instances"][i][0].ravel() for i in used])
    alpha = np.concatenate([case["instances"][i][1].ravel() for i in used])
    bits = np.concatenate([np.packbits(c.ravel()) for c in case["crops"]] or [np.zeros(0, np.uint8)])
    objects = C.real_object_table(case["boxes"], case["real_counts"], plan, paste.output_size)
    return {"table": table, "rgb": rgb, "alpha": alpha, "bits": bits, "objects": objects}


def run_compositor(case: dict, device: str = "cpu", simulate_cuda: bool = False) -> dict:
    """The compositor's outputs for the case, as numpy."""
    inp = inputs_of(case)
    dev = torch.device(device)
    canvas = torch.from_numpy(case["background"].transpose(0, 3, 1, 2).copy()).to(dev)
    out = C.paste_batch(canvas, inp["table"], torch.from_numpy(inp["rgb"]).to(dev),
                        torch.from_numpy(inp["alpha"]).to(dev), case["paste"], simulate_cuda)
    bits = torch.from_numpy(inp["bits"]).to(dev)
    masks = C.real_masks(inp["objects"], bits, case["paste"].output_size, simulate_cuda)
    targets = C.ObjectTargets(inp["objects"], bits, inp["table"], out["scratch"], out["ids"],
                              case["paste"], simulate_cuda)
    stats, keep, visible = targets.run(lambda t: t.cpu().numpy())
    return {"image": canvas.permute(0, 2, 3, 1).cpu().numpy(), "ids": out["ids"].cpu().numpy(),
            "scratch": out["scratch"].cpu().numpy(), "real_masks": masks.cpu().numpy(),
            "visible": visible.cpu().numpy(), "stats": stats, "keep": keep}


def expected(case: dict) -> dict:
    """The same outputs from the numpy reference alone."""
    plan, paste = case["plan"], case["paste"]
    size = paste.output_size
    b = len(plan.ids)
    images, ids = [], np.zeros((b, size, size), np.uint8)
    crops, placed = [], []
    for i in range(b):
        pastes = []
        for s in np.flatnonzero(plan.active[i]):
            rgb, alpha = case["instances"][plan.ids[i, s]]
            rgba = bilinear(np.dstack([rgb, alpha]), *plan.size[i, s])
            if plan.flip[i, s]:
                rgba = np.ascontiguousarray(rgba[:, ::-1])
            if paste.blending == "hard":   # colour outside the hard mask is never used: 0
                rgba[rgba[:, :, 3] < paste.mask_threshold, :3] = 0
            r = C.blur_radius(paste)          # only what lands within r of the canvas
            kept = on_canvas(np.ones(rgba.shape[:2], bool), *(plan.pos[i, s] + r), size + 2 * r)
            crop = np.zeros_like(rgba)
            (y, x), (h, w) = plan.pos[i, s] + r, rgba.shape[:2]
            window = kept[max(y, 0):y + h, max(x, 0):x + w]
            crop[max(-y, 0):max(-y, 0) + window.shape[0], max(-x, 0):max(-x, 0) + window.shape[1]] = \
                rgba[max(-y, 0):max(-y, 0) + window.shape[0], max(-x, 0):max(-x, 0) + window.shape[1]]
            crops.append(crop.reshape(-1, 4))
            pastes.append(Paste(rgba, int(plan.pos[i, s, 0]), int(plan.pos[i, s, 1]), 1))
            hard = on_canvas(rgba[:, :, 3] >= paste.mask_threshold, *plan.pos[i, s], size)
            ids[i][hard] = s + 1
            placed.append((i, s, hard))
        image, _ = composite(case["background"][i], np.zeros((0, size, size)), [], pastes, paste)
        images.append(image)
    real, at, before, after = [], 0, [], []
    for i, n in enumerate(case["real_counts"]):
        h, w = (int(v) for v in plan.image_sizes[i])
        for (y0, x0, bh, bw), crop in zip(case["boxes"][at:at + n], case["crops"][at:at + n], strict=True):
            full = np.zeros((h, w), np.uint8)
            full[y0:y0 + bh, x0:x0 + bw] = crop
            real.append(lsj_mask(full, plan.lsj_size[i], plan.lsj_offset[i], bool(plan.lsj_flip[i]), size))
            before.append(real[-1].astype(bool))
            after.append(before[-1] & (ids[i] == 0))
        at += n
    image_of = list(np.repeat(np.arange(b), case["real_counts"]))
    for i, s, hard in placed:
        before.append(hard)
        after.append(hard & (ids[i] == s + 1))
        image_of.append(i)
    stats = np.array([[m.sum(), *ranges(p), *ranges(m)] for p, m in zip(before, after, strict=True)],
                     np.int64).reshape(-1, 9)
    keep = np.array([m.any() and (np.abs(box_of(m) - box_of(p)).max() <= paste.keep_max_box_shift
                                  or m.sum() > paste.keep_min_area)
                     for p, m in zip(before, after, strict=True)], bool)
    n_real = int(sum(case["real_counts"]))
    order = sorted(range(len(after)), key=lambda o: (image_of[o], o >= n_real, o))
    kept = [after[o] for o in order if keep[o]]
    return {"image": np.stack(images), "ids": ids, "scratch": np.concatenate(crops),
            "real_masks": np.array(real, np.uint8).reshape(-1, size, size),
            "visible": np.array(kept, np.uint8).reshape(-1, size, size), "stats": stats, "keep": keep}


def ranges(mask: np.ndarray) -> list[int]:
    """(y_min, y_max, x_min, x_max) inclusive of a mask; (S, -1, S, -1) when empty."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    return [ys.min(), ys.max(), xs.min(), xs.max()] if len(ys) else [size, -1, size, -1]


def differences(got: dict, want: dict) -> dict:
    """Per output, the number of differing elements (0 everywhere: equal)."""
    return {name: int((got[name].astype(np.int64) != want[name].astype(np.int64)).sum())
            if got[name].shape == want[name].shape else -1 for name in want}


if __name__ == "__main__":   # python compositor_cases.py cpu|cuda-sim SIZE
    mode, size = sys.argv[1], int(sys.argv[2])
    verdict = {}
    for blending in ("hard", "alpha", "gaussian"):
        case = make_case(11, size, blending)
        got = run_compositor(case, simulate_cuda=mode == "cuda-sim")
        verdict[blending] = {"vs_reference": differences(got, expected(case)),
                             "vs_cpu": differences(got, run_compositor(case))}
    print(json.dumps(verdict))
