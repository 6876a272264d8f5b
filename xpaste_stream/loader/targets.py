"""Occlusion-aware targets from the compositor's per-object measurements (composite.py).

The target pass of the compositor (`composite.ObjectTargets`) measures every object's visible
area and its box before and after occlusion, in the object's own window: real objects (LSJ'd
from their packed box crops) are cleared wherever any paste landed, pasted ones wherever a
later paste covers them. The pass also applies the keep rule (`composite._keeps`): an object
is kept if it has pixels left and its box moved at most `keep_max_box_shift` px from where it
was placed, or more than `keep_min_area` pixels remain. Here, on the host: boxes as COCO
boxes from masks (xyxy, exclusive max) and the per-image dicts.
Evaluating the keep rule once at the end equals applying it after every paste as the original
does: masks only shrink, so the area only falls and each box side only moves further inwards.
The measurements are the one device -> host transfer per batch (`to_host`, counted); the kept
objects' visible masks come image after image in one tensor, so each image's masks are a
slice of it (no per-object copy).
"""

from __future__ import annotations

import numpy as np
import torch

from .config import PasteConfig
from .plan import PastePlan


class HostSyncs:
    """Counts the loader's device -> host transfers (each one waits for the device); the tests
    hold the loader to at most one per batch."""

    def __init__(self):
        self.count = 0


HOST_SYNCS = HostSyncs()


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` as numpy: the only way the loader brings a device tensor to the host."""
    HOST_SYNCS.count += 1
    return tensor.cpu().numpy()


def boxes_of(y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """(N, 4) float32 xyxy boxes with exclusive max from inclusive pixel ranges; zeros where
    the range is empty (min > max)."""
    empty = (y1 < y0)[:, None]
    boxes = np.stack([x0, y0, x1 + 1, y1 + 1], 1).astype(np.float32)
    return np.where(empty, np.float32(0), boxes)


def build_targets(objects, real_counts: list[int], real_labels: list[np.ndarray],
                  plan: PastePlan, paste: PasteConfig) -> list[dict]:
    """Per-image torchvision targets from a `composite.ObjectTargets` pass over the batch's
    real objects (image after image, file order) and pastes (image after image, paste order).
    Each image lists its kept real objects, then its kept pastes."""
    st, keep, masks = objects.run(to_host)      # the batch's one device -> host transfer
    n_real = sum(real_counts)
    area = st[:, 0]
    visible = boxes_of(*st[:, 5:9].T)
    image = np.concatenate([np.repeat(np.arange(len(real_counts)), real_counts),
                            np.nonzero(plan.active)[0]]).astype(np.int64)
    labels = np.concatenate([*real_labels, plan.labels[plan.active]]).astype(np.int64)
    device = masks.device
    targets, at = [], 0
    for i in range(len(real_counts)):
        idx = np.flatnonzero(keep & (image == i))   # real ones first: they come first in index
        targets.append({
            "boxes": torch.from_numpy(visible[idx]).to(device),
            "labels": torch.from_numpy(labels[idx]).to(device),
            "masks": masks[at:at + len(idx)],
            "source": torch.from_numpy((idx >= n_real).astype(np.uint8)).to(device),
            "area": torch.from_numpy(area[idx].astype(np.float32)).to(device),
            "iscrowd": torch.zeros(len(idx), dtype=torch.int64, device=device),
            "image_id": int(plan.image_ids[i])})
        at += len(idx)
    return targets
