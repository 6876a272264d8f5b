"""The DALI compositing pipeline: one definition for GPU (device_id set) and CPU (device_id None).

Data flow, top to bottom in `copy_paste_pipeline`:
  plan + bytes (external source, one batch from the CPU planner)
  -> background: decode -> LSJ resize -> fixed-size window (zero padded) -> flip
  -> K paste slots, each: decode RGB + alpha -> resize to the planned size -> flip
     -> place on a zero canvas at the planned position (parts outside are cut off)
     -> blend "over" the canvas in paste order (hard / alpha / gaussian edges)
  -> outputs: composited image (CHW uint8) and the K placed hard masks (K, S, S), from which
     torch builds the occlusion-aware targets on the same device (see targets.py).

Why K fixed slots: a DALI graph is static, so the ragged number of pastes per image becomes
K = max_pastes slots per image; an empty slot decodes an 8x8 transparent placeholder and adds
nothing. Placing by `fn.slice` with out-of-bounds padding gives exact integer placement,
negative positions included, where `fn.multi_paste` (no alpha, later rectangle wins) cannot.
"""

from __future__ import annotations

import math

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from .config import PasteConfig

# Order of the external source outputs; `CopyPasteLoader` builds each batch in this order.
BACKGROUND_INPUTS = ("bg_bytes", "lsj_size", "lsj_start", "lsj_flip")
SLOT_INPUTS = ("slot_size", "slot_start", "slot_flip")


def input_names(slots: int) -> list[str]:
    return ([*BACKGROUND_INPUTS, *SLOT_INPUTS] + [f"jpg{k}" for k in range(slots)]
             + [f"mask{k}" for k in range(slots)])


@pipeline_def
def copy_paste_pipeline(source, paste: PasteConfig, gpu: bool, debug: bool = False):
    """Composite one planned batch; `source` is a callable returning the inputs of
    `input_names(K)` as lists of per-sample arrays."""
    k_slots, size = paste.slots, paste.output_size
    decode_device = "mixed" if gpu else "cpu"
    inputs = dict(zip(input_names(k_slots),
                      fn.external_source(source=source, num_outputs=len(input_names(k_slots)),
                                         batch=True), strict=True))

    background = fn.decoders.image(inputs["bg_bytes"], device=decode_device, output_type=types.RGB)
    background = large_scale_jitter(background, inputs["lsj_size"], inputs["lsj_start"],
                                    inputs["lsj_flip"], size)

    canvas = fn.cast(background, dtype=types.FLOAT)
    masks, crops = [], []
    for k in range(k_slots):
        rgba = decode_instance(inputs[f"jpg{k}"], inputs[f"mask{k}"], decode_device)
        rgba = fn.resize(rgba, resize_y=inputs["slot_size"][k, 0], resize_x=inputs["slot_size"][k, 1],
                         interp_type=types.INTERP_LINEAR, antialias=True)
        rgba = fn.flip(rgba, horizontal=inputs["slot_flip"][k])
        crops.append(rgba)
        layer = place(rgba, inputs["slot_start"][k], size)
        mask = layer[:, :, 3] >= paste.mask_threshold
        weight = blend_weight(rgba, layer, mask, inputs["slot_size"][k], inputs["slot_start"][k], paste)
        canvas = canvas + weight * (layer[:, :, 0:3] - canvas)
        masks.append(fn.cast(mask, dtype=types.UINT8))

    image = fn.cast(dmath.floor(canvas + 0.5), dtype=types.UINT8)
    image = fn.transpose(image, perm=[2, 0, 1])
    slot_masks = fn.stack(*masks, axis=0)
    if debug:
        return (image, slot_masks, background, *crops)
    return image, slot_masks


def large_scale_jitter(image, lsj_size, lsj_start, lsj_flip, size: int):
    """Resize to the planned size, cut the S x S window (zero padding), flip: LSJ as planned."""
    image = fn.resize(image, resize_y=lsj_size[0], resize_x=lsj_size[1],
                      interp_type=types.INTERP_LINEAR, antialias=True)
    image = fn.slice(image, start=lsj_start, shape=[size, size], axis_names="HW",
                     out_of_bounds_policy="pad", fill_values=0)
    return fn.flip(image, horizontal=lsj_flip)


def decode_instance(jpg, mask_png, device: str):
    """RGB from the JPEG (nvJPEG on GPU) plus the PNG alpha as a 4th channel."""
    rgb = fn.decoders.image(jpg, device=device, output_type=types.RGB)
    alpha = fn.decoders.image(mask_png, device=device, output_type=types.GRAY)
    return fn.cat(rgb, alpha, axis=2)


def place(rgba, start, size: int):
    """The instance on an S x S zero canvas; `start` = -position, so a slice of the instance
    beginning at `start` puts its top-left corner at the position (outside parts are cut)."""
    return fn.slice(rgba, start=start, shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def blend_weight(rgba, layer, mask, size_hw, start, paste: PasteConfig):
    """Per-pixel weight of the paste in the "over" blend, shape (S, S, 1), float."""
    if paste.blending == "hard":
        weight = fn.cast(mask, dtype=types.FLOAT)
    elif paste.blending == "alpha":
        weight = fn.cast(layer[:, :, 3], dtype=types.FLOAT) / 255.0
    else:
        weight = gaussian_weight(rgba, size_hw, start, paste)
    return fn.expand_dims(weight, axes=[2])


def gaussian_weight(rgba, size_hw, start, paste: PasteConfig):
    """The hard mask blurred with a Gaussian, so the edges fade; the blur runs on the small
    instance padded by 3 sigma (not on the whole canvas) and is then placed like the RGB."""
    pad = math.ceil(3 * paste.gaussian_sigma)
    hard = fn.cast(rgba[:, :, 3:4] >= paste.mask_threshold, dtype=types.FLOAT)
    padded = fn.slice(hard, start=[-pad, -pad], end=fn.cast(size_hw, dtype=types.INT32) + pad,
                      axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    blurred = fn.gaussian_blur(padded, sigma=paste.gaussian_sigma, dtype=types.FLOAT)
    placed = fn.slice(blurred, start=start + pad, shape=[paste.output_size, paste.output_size],
                      axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    return placed[:, :, 0]


@pipeline_def
def decode_only_pipeline(paths: list[str], index_paths: list[str], gpu: bool, shard_id: int = 0,
                         num_shards: int = 1):
    """The ceiling the loader is compared with: read and decode backgrounds, nothing else."""
    image = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg;png"],
                                  shard_id=shard_id, num_shards=num_shards, random_shuffle=False,
                                  name="backgrounds")
    return fn.decoders.image(image, device="mixed" if gpu else "cpu", output_type=types.RGB)
