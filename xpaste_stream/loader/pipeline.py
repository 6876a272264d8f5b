"""The DALI compositing pipeline: one definition for GPU (device_id set) and CPU (device_id None).

Data flow, top to bottom in `copy_paste_pipeline`:
  one sample's inputs (external source: `sample.SampleSource`, called per sample by DALI in
  worker processes, `LoaderConfig.workers`; the inputs are declared once, `input_names`)
  -> background: decode (nvJPEG on GPU) -> LSJ (one ROI resize of the part in the window,
     flip included) -> S x S window, zero padded, with a 4th, zero channel: this RGBI canvas
     carries the image and the id map (0: no paste yet)
  -> K paste slots in paste order; a slot that lands on the image (per-sample condition):
     decode the JPEG (nvJPEG on GPU) + the alpha (raw from the worker; on GPU its LZ4 block,
     inflated on the device) -> resize to the planned size -> flip -> hard mask
     (alpha >= threshold) -> crop (R, G, B, id = k + 1 on the hard mask) blended over the
     window of the canvas it covers, box-locally -> `fn.multi_paste` writes canvas + blended
     window to a new canvas, and the canvas rows / columns its hard mask covers (2 x S bytes)
  -> outputs: the image (3, S, S) uint8, the id map (S, S) uint8 (1 + slot of the last paste
     covering each pixel), the placed rows / columns (K, 2, S) uint8, and the worker's
     pass-through arrays (real objects as box crops, on the device on GPU; plan; counters);
     torch builds the occlusion-aware targets from them on the same device (targets.py).

Why this shape (the pipeline alone, 2 CPU cores, 640, U{0..19} pastes, images/s; v1 figures):
- Every per-slot operation is the size of the slot's box; the only full-canvas work per paste
  is the copy inside `multi_paste` (a memcpy). Every slot on its own S x S canvas: 7 images/s;
  box-local: 35; with the ROI LSJ and cheaper resize below: 41.
- Layers of non-overlapping boxes (one `multi_paste` + one full-canvas blend per layer) were
  measured too: 31. Each DALI arithmetic node is its own full-canvas pass.
- The graph is static with K slots; the per-sample condition skips empty slots and crops
  entirely off the canvas (41 vs 38 without it; 100 vs 41 for images without pastes).
- Loader v2 moved the alpha out of PNG: instance shards (schema /2) store it as one LZ4 block
  of raw bytes, which the GPU inflates (`fn.decoders.inflate`, nvCOMP) and the worker in
  ~8 us (PNG: ~156 us for a 270 x 270 mask, CPU only, and a damaged PNG ended the pipeline).
  The worker also checks every encoded image's structure (sources.py). So the graph holds K
  JPEG decoders and no PNG decoder (v1: 2K + 1 decoders, K PNG decoders on the CPU even in
  GPU mode). What stays on the host in GPU mode is nvJPEG's own Huffman decoding of small
  images: DALI documents that images under `hybrid_huffman_threshold` pixels (default 1M) are
  Huffman-decoded on the host and that its hybrid decoder "still largely uses the CPU"; only
  A100/H100's hardware decoder (`hw_decoder_load`) takes it off the host. One decoder call
  for all of a batch's instances (a second pipeline of batch B x K) is not built: DALI
  operators combine samples of one batch only, so its outputs would have to be re-batched per
  slot on the device; to weigh on a GPU.
- Hard blending is an exact select in wrapping uint8 (window + m * (crop - window) is the crop
  where m = 1, the window where m = 0); the id channel is blended with the same m, so "later
  paste wins" is the same select. Alpha / gaussian blending keep the reference's float "over"
  window + w * (rgb - window), with the hard mask as the id channel's weight.
- LSJ is one resize of only the part of the background that lands in the window (ROI), equal to
  resize + window + flip up to rounding. Instances are resized bilinearly without antialiasing,
  as the original's cv2.resize does (2.5x cheaper in DALI than with antialiasing).
"""

from __future__ import annotations

import math

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from .config import PasteConfig

# The inputs, declared once: the sample function (sample.py) returns one array per name, in
# this order. Few arrays, packed: the main process pays per array and sample to take a worker's
# output (~20 us; 45 arrays per sample made it 0.35 of a core at 420 images/s).
# - `bg_bytes`: the encoded background; `lsj_roi` float32 (6,): its LSJ as one ROI resize,
#   roi start (y, x), roi end, output size; `lsj_pad` int32 (3,): where the window's padding
#   starts (plan.lsj_window);
# - `slot_size` float32 (K, 2): (h, w) of each resized instance; `slot_ints` int32 (K, W): the
#   rest of each slot, fields in SLOT_FIELDS (`pack_slots`);
# - `jpg_blob` / `alpha_blob`: every slot's JPEG bytes / alpha one after the other (empty slots
#   hold a transparent 8 x 8 placeholder), found by the slot's `jpg_at` / `alpha_at`
#   (offset, length). The alpha is raw (h, w) bytes on the CPU, an LZ4 block on a GPU.
GRAPH_INPUTS = ("bg_bytes", "lsj_roi", "lsj_pad", "slot_size", "slot_ints", "jpg_blob",
                "alpha_blob")
# Per slot: `flip` 0/1 and `pos` (top-left on the canvas) of the resized instance; `on` 0/1
# (something lands on the canvas); `crop_start` / `crop_shape`: where the crop (the instance
# plus the blur margin for gaussian edges) sits on the canvas; `in_anchors`, `out_anchors`,
# `paste_shapes` (2 x 2): the two `multi_paste` regions, the whole canvas and the crop's
# on-canvas part; `jpg_at`, `alpha_at`; `alpha_shape` (h, w, 1) of the stored alpha.
SLOT_FIELDS = (("flip", 1), ("pos", 2), ("on", 1), ("crop_start", 2), ("crop_shape", 2),
               ("in_anchors", 4), ("out_anchors", 4), ("paste_shapes", 4), ("jpg_at", 2),
               ("alpha_at", 2), ("alpha_shape", 3))
SLOT_OFFSETS = {name: (sum(w for _, w in SLOT_FIELDS[:i]), width)
                for i, (name, width) in enumerate(SLOT_FIELDS)}
SLOT_WIDTH = sum(w for _, w in SLOT_FIELDS)
# Passed through the graph unchanged, so that what a worker made reaches the training thread
# with its batch: the real objects (mask boxes [y0, x0, h, w], the masks' bits crop after crop,
# category ids), the plan and skip counters (`sample.PLAN_HEAD` + 7 K + counters integers) and
# the named skips (JSON bytes).
PASSTHROUGH = ("real_boxes", "real_bits", "real_labels", "plan_row", "skipped")
TO_DEVICE = ("real_boxes", "real_bits")  # copied to the GPU by DALI, with the batch


def input_names() -> list[str]:
    return [*GRAPH_INPUTS, *PASSTHROUGH]


def pack_slots(fields: dict) -> np.ndarray:
    """(K, SLOT_WIDTH) int32 from per-field (K, width) arrays, in SLOT_FIELDS order."""
    k = len(fields["on"])
    return np.concatenate([np.asarray(fields[name], np.int32).reshape(k, width)
                           for name, width in SLOT_FIELDS], 1)


def slot_field(slot_ints, k: int, name: str):
    """Field `name` of slot k in the graph: a scalar for width 1, (2, 2) for the anchors."""
    start, width = SLOT_OFFSETS[name]
    if width == 1:
        return slot_ints[k, start]
    field = slot_ints[k, start:start + width]
    return fn.reshape(field, shape=[2, 2]) if width == 4 else field


def crop_padding(paste: PasteConfig) -> int:
    """Pixels each crop extends beyond the instance: the reach of the gaussian edge blur."""
    return math.ceil(3 * paste.gaussian_sigma) if paste.blending == "gaussian" else 0


@pipeline_def(enable_conditionals=True)
def copy_paste_pipeline(source, paste: PasteConfig, gpu: bool, workers: int, debug: bool = False,
                        worker_prefetch: int = 4, bytes_per_sample: int = 1 << 20):
    """Composite one batch; `source(SampleInfo)` returns one sample's inputs in the order of
    `input_names()` (sample.SampleSource). With `workers` > 0 DALI calls it in that many
    worker processes (parallel external source), otherwise in the pipeline's thread."""
    k_slots, size = paste.slots, paste.output_size
    device = "gpu" if gpu else "cpu"
    names = input_names()
    parallel = {"parallel": True, "prefetch_queue_depth": worker_prefetch,
                "bytes_per_sample_hint": bytes_per_sample} if workers else {}
    outputs = fn.external_source(source=source, num_outputs=len(names), batch=False, **parallel)
    inputs = {name: outputs[i] for i, name in enumerate(names)}  # (autograph: no zip strict)
    slots = inputs["slot_ints"]

    lsj = inputs["lsj_roi"]
    canvas = fn.decoders.image(inputs["bg_bytes"], device="mixed" if gpu else "cpu",
                               output_type=types.RGB)
    canvas = large_scale_jitter(canvas, lsj[0:2], lsj[2:4], lsj[4:6], inputs["lsj_pad"], size)
    background = canvas[:, :, 0:3] if debug else None
    if paste.blending != "hard":
        canvas = fn.cast(canvas, dtype=types.FLOAT)

    # what an empty slot outputs: no placed rows / columns, a 1 x 1 transparent instance
    no_extent = fn.constant(idata=0, shape=[2, size], dtype=types.UINT8, device=device)
    no_instance = fn.constant(idata=0, shape=[1, 1, 4], dtype=types.UINT8, layout="HWC",
                              device=device)
    instances, extents = [], []
    for k in range(k_slots):
        if slot_field(slots, k, "on") > 0:
            rgba = decode_instance(inputs["jpg_blob"], inputs["alpha_blob"], slots, k, gpu)
            rgba = fn.resize(rgba, resize_y=inputs["slot_size"][k, 0],
                             resize_x=inputs["slot_size"][k, 1], interp_type=types.INTERP_LINEAR,
                             antialias=False)
            rgba = fn.flip(rgba, horizontal=slot_field(slots, k, "flip"))
            hard = fn.cast(rgba[:, :, 3:4] >= paste.mask_threshold, dtype=types.UINT8)
            extent = placed_extent(hard, slot_field(slots, k, "pos"), size)
            crop, weight = slot_crop(rgba, hard, k + 1, slot_field(slots, k, "crop_shape"), paste)
            canvas = paste_over(canvas, crop, weight, slots, k, size)
        else:
            rgba, extent = no_instance, no_extent
        instances.append(rgba)
        extents.append(extent)

    if paste.blending != "hard":
        canvas = fn.cast(dmath.floor(canvas + 0.5), dtype=types.UINT8)
    canvas = fn.transpose(canvas, perm=[2, 0, 1])
    image, ids = canvas[0:3], canvas[3]
    extents = fn.stack(*extents, axis=0)
    passed = [inputs[n].gpu() if gpu and n in TO_DEVICE else inputs[n] for n in PASSTHROUGH]
    if debug:
        return (image, ids, extents, *passed, background, *instances)
    return (image, ids, extents, *passed)


def large_scale_jitter(image, roi_start, roi_end, out_size, pad_start, size: int):
    """LSJ as planned in one resize: only the part of the image that lands in the S x S window
    is resized (ROI; the flip is a reversed ROI), then zero padded to the window, with a 4th
    channel of zeros for the id map."""
    image = fn.resize(image, roi_start=roi_start, roi_end=roi_end, resize_y=out_size[0],
                      resize_x=out_size[1], interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.slice(image, start=pad_start, shape=[size, size, 4], axes=[0, 1, 2],
                    out_of_bounds_policy="pad", fill_values=0)


def decode_instance(jpg_blob, alpha_blob, slots, k: int, gpu: bool):
    """Slot k's RGB from its JPEG (nvJPEG on GPU) plus its alpha as a 4th channel: on a GPU
    inflated from its LZ4 block on the device, on the CPU the raw bytes the worker decoded."""
    jpg_at, alpha_at = slot_field(slots, k, "jpg_at"), slot_field(slots, k, "alpha_at")
    jpg = fn.slice(jpg_blob, start=jpg_at[0:1], shape=jpg_at[1:2], axes=[0])
    alpha = fn.slice(alpha_blob, start=alpha_at[0:1], shape=alpha_at[1:2], axes=[0])
    shape = slot_field(slots, k, "alpha_shape")
    if gpu:
        rgb = fn.decoders.image(jpg, device="mixed", output_type=types.RGB)
        alpha = fn.decoders.inflate(alpha.gpu(), shape=shape, dtype=types.UINT8, layout="HWC")
    else:
        rgb = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        alpha = fn.reshape(alpha, shape=shape, layout="HWC")
    return fn.cat(rgb, alpha, axis=2)


def slot_crop(rgba, hard, slot_id: int, crop_shape, paste: PasteConfig):
    """(crop, weight) of one slot: the crop's channels are R, G, B and the slot id on the hard
    mask; the weight lays it over the canvas: the hard mask, or for soft blending the colour
    weight (alpha / 255, or the blurred hard mask) and the hard mask for the id channel."""
    crop = fn.cat(rgba[:, :, 0:3], hard * types.Constant(slot_id, dtype=types.UINT8), axis=2)
    if paste.blending == "hard":
        return crop, hard
    if paste.blending == "alpha":
        weight = fn.cast(rgba[:, :, 3:4], dtype=types.FLOAT) / 255.0
    else:  # gaussian: the hard mask blurred on the crop padded by 3 sigma
        pad = crop_padding(paste)
        padded = fn.slice(fn.cat(crop, hard, axis=2), start=[-pad, -pad], shape=crop_shape,
                          axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
        crop, hard = padded[:, :, 0:4], padded[:, :, 4:5]
        weight = fn.gaussian_blur(fn.cast(hard, dtype=types.FLOAT), sigma=paste.gaussian_sigma,
                                  dtype=types.FLOAT)
    weight = fn.cat(weight, weight, weight, fn.cast(hard, dtype=types.FLOAT), axis=2)
    return fn.cast(crop, dtype=types.FLOAT), weight


def paste_over(canvas, crop, weight, slots, k: int, size: int):
    """Slot k "over" the canvas, box-locally: blend the crop with the canvas window under it
    (zero padded where the crop hangs over the border), then `fn.multi_paste` copies the
    canvas and the blended window's on-canvas part into the new canvas."""
    window = fn.slice(canvas, start=slot_field(slots, k, "crop_start"),
                      shape=slot_field(slots, k, "crop_shape"), axis_names="HW",
                      out_of_bounds_policy="pad", fill_values=0)
    blended = window + weight * (crop - window)
    return fn.multi_paste(canvas, blended, in_anchors=slot_field(slots, k, "in_anchors"),
                          out_anchors=slot_field(slots, k, "out_anchors"),
                          shapes=slot_field(slots, k, "paste_shapes"), output_size=[size, size])


def placed_extent(hard, pos, size: int):
    """(2, S) uint8: the canvas rows and columns the crop's hard mask covers (cut to the
    canvas), so torch gets each paste's placed box without a full-canvas mask."""
    rows = fn.reductions.max(hard, axes=[1, 2])
    cols = fn.reductions.max(hard, axes=[0, 2])
    rows = fn.slice(rows, start=-pos[0:1], shape=[size], axes=[0],
                    out_of_bounds_policy="pad", fill_values=0)
    cols = fn.slice(cols, start=-pos[1:2], shape=[size], axes=[0],
                    out_of_bounds_policy="pad", fill_values=0)
    return fn.stack(rows, cols, axis=0)


@pipeline_def
def decode_only_pipeline(paths: list[str], index_paths: list[str], gpu: bool, shard_id: int = 0,
                         num_shards: int = 1):
    """The ceiling the loader is compared with: read and decode backgrounds, nothing else."""
    image = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg;png"],
                                  shard_id=shard_id, num_shards=num_shards, random_shuffle=False,
                                  name="backgrounds")
    return fn.decoders.image(image, device="mixed" if gpu else "cpu", output_type=types.RGB)
