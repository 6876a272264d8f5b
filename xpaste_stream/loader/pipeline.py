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

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from .config import PasteConfig

# The inputs, declared once: the sample function (sample.py) returns one array per name, in
# this order. Background: the encoded bytes and its LSJ as one ROI resize (plan.lsj_window).
BACKGROUND_INPUTS = ("bg_bytes", "lsj_roi_start", "lsj_roi_end", "lsj_out_size", "lsj_pad_start")
# Per slot k (arrays of K rows per image): `slot_size` (h, w) float, `slot_flip` and
# `slot_pos` (top-left on the canvas) of the resized instance; `on_canvas` 0/1; `crop_start` /
# `crop_shape`: where the crop (the instance, plus the blur margin for gaussian edges) sits on
# the canvas; `in_anchors`, `out_anchors`, `paste_shapes` (2, 2): the two `multi_paste`
# regions, the whole canvas and the crop's on-canvas part. On a GPU also `alpha_shape`
# (h, w, 1): what the device inflates each slot's LZ4 alpha block to.
SLOT_INPUTS = ("slot_size", "slot_flip", "slot_pos", "on_canvas", "crop_start", "crop_shape",
               "in_anchors", "out_anchors", "paste_shapes")
# Passed through the graph unchanged, so that what a worker made reaches the training thread
# with its batch: the real objects (mask boxes [y0, x0, h, w], the masks' bits crop after crop,
# category ids), the plan (sample.PLAN_HEAD + 7 K integers), skip counters and named skips.
PASSTHROUGH = ("real_boxes", "real_bits", "real_labels", "plan_row", "counts", "skipped")
TO_DEVICE = ("real_boxes", "real_bits")  # copied to the GPU by DALI, with the batch


def graph_input_names(slots: int, gpu: bool = False) -> list[str]:
    """Background and slot geometry, then per slot the instance's JPEG bytes (`jpg{k}`) and
    its alpha (`alpha{k}`): on the CPU raw (h, w, 1) uint8 from the worker, on a GPU the LZ4
    block the device inflates."""
    return ([*BACKGROUND_INPUTS, *SLOT_INPUTS] + (["alpha_shape"] if gpu else [])
            + [f"jpg{k}" for k in range(slots)] + [f"alpha{k}" for k in range(slots)])


def passthrough_names() -> list[str]:
    return list(PASSTHROUGH)


def input_names(slots: int, gpu: bool = False) -> list[str]:
    return graph_input_names(slots, gpu) + passthrough_names()


def crop_padding(paste: PasteConfig) -> int:
    """Pixels each crop extends beyond the instance: the reach of the gaussian edge blur."""
    return math.ceil(3 * paste.gaussian_sigma) if paste.blending == "gaussian" else 0


@pipeline_def(enable_conditionals=True)
def copy_paste_pipeline(source, paste: PasteConfig, gpu: bool, workers: int, debug: bool = False,
                        bytes_per_sample: int = 1 << 20):
    """Composite one batch; `source(SampleInfo)` returns one sample's inputs in the order of
    `input_names(K)` (sample.SampleSource). With `workers` > 0 DALI calls it in that many
    worker processes (parallel external source), otherwise in the pipeline's thread."""
    k_slots, size = paste.slots, paste.output_size
    device = "gpu" if gpu else "cpu"
    names = input_names(k_slots, gpu)
    parallel = {"parallel": True, "bytes_per_sample_hint": bytes_per_sample} if workers else {}
    outputs = fn.external_source(source=source, num_outputs=len(names), batch=False,
                                 layout=["HWC" if n.startswith("alpha") and n != "alpha_shape"
                                         and not gpu else "" for n in names], **parallel)
    inputs = {name: outputs[i] for i, name in enumerate(names)}

    canvas = fn.decoders.image(inputs["bg_bytes"], device="mixed" if gpu else "cpu",
                               output_type=types.RGB)
    canvas = large_scale_jitter(canvas, inputs["lsj_roi_start"], inputs["lsj_roi_end"],
                                inputs["lsj_out_size"], inputs["lsj_pad_start"], size)
    background = canvas[:, :, 0:3] if debug else None
    if paste.blending != "hard":
        canvas = fn.cast(canvas, dtype=types.FLOAT)

    # what an empty slot outputs: no placed rows / columns, a 1 x 1 transparent instance
    no_extent = fn.constant(idata=0, shape=[2, size], dtype=types.UINT8, device=device)
    no_instance = fn.constant(idata=0, shape=[1, 1, 4], dtype=types.UINT8, layout="HWC",
                              device=device)
    instances, extents = [], []
    for k in range(k_slots):
        if inputs["on_canvas"][k] > 0:
            rgba = decode_instance(inputs[f"jpg{k}"], inputs[f"alpha{k}"],
                                   inputs["alpha_shape"][k] if gpu else None, gpu)
            rgba = fn.resize(rgba, resize_y=inputs["slot_size"][k, 0],
                             resize_x=inputs["slot_size"][k, 1], interp_type=types.INTERP_LINEAR,
                             antialias=False)
            rgba = fn.flip(rgba, horizontal=inputs["slot_flip"][k])
            hard = fn.cast(rgba[:, :, 3:4] >= paste.mask_threshold, dtype=types.UINT8)
            extent = placed_extent(hard, inputs["slot_pos"][k], size)
            crop, weight = slot_crop(rgba, hard, k + 1, inputs["crop_shape"][k], paste)
            canvas = paste_over(canvas, crop, weight, inputs, k, size)
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


def decode_instance(jpg, alpha, alpha_shape, gpu: bool):
    """RGB from the JPEG (nvJPEG on GPU) plus the alpha as a 4th channel: on a GPU inflated
    from its LZ4 block on the device, on the CPU as the worker decoded it."""
    if gpu:
        rgb = fn.decoders.image(jpg, device="mixed", output_type=types.RGB)
        alpha = fn.decoders.inflate(alpha.gpu(), shape=alpha_shape, dtype=types.UINT8,
                                    layout="HWC")
        return fn.cat(rgb, alpha, axis=2)
    return fn.cat(fn.decoders.image(jpg, device="cpu", output_type=types.RGB), alpha, axis=2)


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


def paste_over(canvas, crop, weight, inputs, k: int, size: int):
    """Slot k "over" the canvas, box-locally: blend the crop with the canvas window under it
    (zero padded where the crop hangs over the border), then `fn.multi_paste` copies the
    canvas and the blended window's on-canvas part into the new canvas."""
    window = fn.slice(canvas, start=inputs["crop_start"][k], shape=inputs["crop_shape"][k],
                      axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    blended = window + weight * (crop - window)
    return fn.multi_paste(canvas, blended, in_anchors=inputs["in_anchors"][k],
                          out_anchors=inputs["out_anchors"][k], shapes=inputs["paste_shapes"][k],
                          output_size=[size, size])


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
