"""What a worker process sends the main process for one sample: declared once, read by name.

The sample function (sample.py) returns one numpy array per name of `WIRE`, in that order;
DALI's parallel external source carries them through shared memory, the DALI graph consumes
the first three (background decode + LSJ), the rest pass through to the main process with the
batch. Few arrays, packed: the main process pays ~20 us per array and sample to take a
worker's output.

- `bg_bytes` uint8 (n,): the encoded background;
- `lsj_roi` float32 (6,): its LSJ as one ROI resize: roi start (y, x), roi end, output size;
- `lsj_pad` int32 (3,): where the window's zero padding starts (plan.lsj_window);
- `plan` uint8: one `plan_dtype(K)` record: the sample's plan, its instances' sizes and
  JPEG lengths, its skip counters;
- `inst_jpegs` uint8 (n,): the JPEG bytes of the active slots, slot after slot;
- `inst_alphas` uint8 (n,): their alphas, raw (src_h, src_w) bytes, slot after slot;
- `real_boxes` int32 (N, 4): the real objects' mask boxes (y0, x0, h, w) in image pixels;
- `real_bits` uint8 (n,): their masks as packed bits, box crop after box crop, each starting
  on a byte (as stored in `masks.zst`);
- `real_labels` int64 (N,): their category ids;
- `skipped` uint8 (n,): JSON list of [shard, key, reason] of what this sample skipped.
"""

from __future__ import annotations

import numpy as np

from .plan import PastePlan

WIRE = ("bg_bytes", "lsj_roi", "lsj_pad", "plan", "inst_jpegs", "inst_alphas", "real_boxes",
        "real_bits", "real_labels", "skipped")
GRAPH_INPUTS = WIRE[:3]                 # consumed by the DALI graph
PASSTHROUGH = WIRE[3:]                  # handed to the main process unchanged
COUNTERS = ("backgrounds_corrupt", "backgrounds_substituted", "instances_corrupt",
            "instances_given_up", "pastes_too_small")


def plan_dtype(slots: int) -> np.dtype:
    """One sample's plan record (packed, so its bytes are the same on every platform)."""
    k = slots
    return np.dtype([
        ("image_id", "<i8"), ("position", "<i8"), ("background", "<i8"),
        ("image_size", "<i4", 2), ("lsj_size", "<i4", 2), ("lsj_offset", "<i4", 2),
        ("lsj_flip", "u1"),
        ("ids", "<i8", k), ("labels", "<i8", k), ("size", "<i4", (k, 2)), ("pos", "<i4", (k, 2)),
        ("flip", "u1", k),
        ("src_size", "<i4", (k, 2)),    # (h, w) of each slot's decoded instance
        ("jpg_len", "<i8", k),          # bytes of each active slot's JPEG in `inst_jpegs`
        ("counters", "<i8", len(COUNTERS)),
    ])


def pack_plan(plan: PastePlan, position: int, background: int, src_size: np.ndarray,
              jpg_len: np.ndarray, counters: dict) -> np.ndarray:
    """The `plan` wire array of a one-image PastePlan."""
    rec = np.zeros((), plan_dtype(plan.ids.shape[1]))
    rec["image_id"], rec["position"], rec["background"] = plan.image_ids[0], position, background
    rec["image_size"], rec["lsj_size"] = plan.image_sizes[0], plan.lsj_size[0]
    rec["lsj_offset"], rec["lsj_flip"] = plan.lsj_offset[0], plan.lsj_flip[0]
    rec["ids"], rec["labels"] = plan.ids[0], plan.labels[0]
    rec["size"], rec["pos"], rec["flip"] = plan.size[0], plan.pos[0], plan.flip[0]
    rec["src_size"], rec["jpg_len"] = src_size, jpg_len
    rec["counters"] = [counters[c] for c in COUNTERS]
    return np.frombuffer(rec.tobytes(), np.uint8)


def unpack_plans(rows: list[np.ndarray], slots: int) -> np.ndarray:
    """The batch's records, (B,) of `plan_dtype(slots)`, from the per-sample `plan` arrays."""
    return np.stack(rows).view(plan_dtype(slots)).reshape(len(rows))


def plan_of(records: np.ndarray) -> PastePlan:
    """The batch's PastePlan from its records."""
    return PastePlan(
        image_ids=records["image_id"].copy(), image_sizes=records["image_size"].copy(),
        lsj_size=records["lsj_size"].copy(), lsj_offset=records["lsj_offset"].copy(),
        lsj_flip=records["lsj_flip"].astype(bool), ids=records["ids"].copy(),
        labels=records["labels"].copy(), size=records["size"].copy(), pos=records["pos"].copy(),
        flip=records["flip"].astype(bool))
