"""Occlusion-aware targets in torch, on the device the composited batch lives on.

Inputs: the K placed hard masks per image (from DALI) and the real masks (RLE-decoded on the
CPU at the original resolution, moved to the device once, then put through the same LSJ
integers as the image here). Everything after that is batched tensor algebra:
- an id map in paste order (the last paste covering a pixel wins) gives every pasted object's
  visible mask at once; real masks are cleared wherever any paste landed;
- boxes come from masks; an object is kept if it has pixels left and its box moved at most
  `keep_max_box_shift` px from where it was placed, or more than `keep_min_area` pixels remain.
Evaluating the keep rule once at the end equals applying it after every paste as the original
does: masks only shrink, so the area only falls and each box side only moves further inwards.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import PasteConfig
from .plan import PastePlan


def lsj_masks(masks: torch.Tensor, lsj_size, lsj_offset, flip: bool, size: int) -> torch.Tensor:
    """Nearest-neighbour LSJ of (N, h, w) masks with the image's integers, by index gathering:
    only the S x S output window is computed. Pixel centres are aligned as in DALI's resize."""
    n, h, w = masks.shape
    (nh, nw), (y0, x0) = (int(v) for v in lsj_size), (int(v) for v in lsj_offset)
    out = torch.zeros((n, size, size), dtype=torch.bool, device=masks.device)
    rows = torch.arange(y0, min(nh, y0 + size), device=masks.device)
    cols = torch.arange(x0, min(nw, x0 + size), device=masks.device)
    src_r = ((rows + 0.5) * (h / nh)).long().clamp_(max=h - 1)
    src_c = ((cols + 0.5) * (w / nw)).long().clamp_(max=w - 1)
    out[:, :len(rows), :len(cols)] = masks[:, src_r][:, :, src_c].bool()
    return out.flip(-1) if flip else out


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, S, S) bool -> (N, 4) float32 xyxy with exclusive max (x2 = last column + 1), as a
    COCO box from a mask; empty masks give zeros."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    rows, cols = masks.any(2).to(torch.uint8), masks.any(1).to(torch.uint8)
    y1, x1 = rows.argmax(1), cols.argmax(1)
    y2, x2 = h - rows.flip(1).argmax(1), w - cols.flip(1).argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return boxes * masks.flatten(1).any(1, keepdim=True)


def id_map(slot_masks: torch.Tensor) -> torch.Tensor:
    """(B, K, S, S) 0/1 -> (B, S, S) uint8: 1 + index of the last slot covering each pixel, 0
    where nothing was pasted."""
    k = slot_masks.shape[1]
    order = torch.arange(1, k + 1, dtype=torch.uint8, device=slot_masks.device).view(1, k, 1, 1)
    return (slot_masks.to(torch.uint8) * order).amax(1)


def keep_rule(old: torch.Tensor, new: torch.Tensor, area: torch.Tensor, paste: PasteConfig):
    shift = (new - old).abs().amax(1) if len(old) else torch.zeros(0, device=old.device)
    return (area > 0) & ((shift <= paste.keep_max_box_shift) | (area > paste.keep_min_area))


def build_targets(slot_masks: torch.Tensor, real_masks: list[torch.Tensor],
                  real_labels: list[np.ndarray], plan: PastePlan, paste: PasteConfig) -> list[dict]:
    """Per-image torchvision targets; `real_masks[i]` is image i's (N_i, S, S) LSJ'd masks.
    Objects are listed real first (file order), then pasted in paste order."""
    device = slot_masks.device
    b, k = slot_masks.shape[:2]
    ids = id_map(slot_masks)                                             # (B, S, S)

    counts = torch.tensor([len(m) for m in real_masks], device=device)
    real = torch.cat(real_masks) if int(counts.sum()) else \
        torch.zeros((0, *slot_masks.shape[2:]), dtype=torch.bool, device=device)
    real_image = torch.repeat_interleave(torch.arange(b, device=device), counts)
    real_visible = real & (ids[real_image] == 0)

    active = plan.active.reshape(-1)                                     # only filled slots
    active_t = torch.from_numpy(active).to(device)
    pasted_image = torch.arange(b, device=device).repeat_interleave(k)[active_t]
    pasted_slot = torch.arange(1, k + 1, device=device).repeat(b)[active_t]
    placed = slot_masks.flatten(0, 1)[active_t].bool()
    pasted_visible = ids[pasted_image] == pasted_slot.to(torch.uint8).view(-1, 1, 1)

    old = torch.cat([boxes_from_masks(real), boxes_from_masks(placed)])
    visible = torch.cat([real_visible, pasted_visible])
    new = boxes_from_masks(visible)
    area = visible.flatten(1).sum(1)
    keep = keep_rule(old, new, area, paste)

    image_of = torch.cat([real_image, pasted_image])
    labels = torch.from_numpy(np.concatenate([*real_labels, plan.labels.reshape(-1)[active]])
                              .astype(np.int64)).to(device)
    source = torch.cat([torch.zeros(len(real), dtype=torch.uint8),
                        torch.ones(len(placed), dtype=torch.uint8)]).to(device)
    targets = []
    for i in range(b):
        sel = keep & (image_of == i)
        targets.append({"boxes": new[sel], "labels": labels[sel], "masks": visible[sel].to(torch.uint8),
                        "source": source[sel], "image_id": int(plan.image_ids[i])})
    return targets
