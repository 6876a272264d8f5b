"""rle.box_crop reads a mask's tight box and crop from its runs: the same bytes as decoding the
whole mask with pycocotools and cropping it, on the masks pack-coco meets."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from xpaste_stream import formats
from xpaste_stream.rle import box_crop, run_lengths


def full_decode_crop(rle: dict) -> tuple[list[int], np.ndarray]:
    m = mask_utils.decode({**rle, "counts": rle["counts"].encode()} if isinstance(rle["counts"], str)
                          else rle)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if len(rows) == 0:
        return [0, 0, 0, 0], np.zeros((0, 0), np.uint8)
    y0, x0, y1, x1 = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
    return [int(y0), int(x0), int(y1 - y0), int(x1 - x0)], m[y0:y1, x0:x1]


def masks_pack_coco_meets(rng) -> list[dict]:
    h, w = 37, 53
    out = []
    for _ in range(40):                                   # polygons, some over the borders
        n = rng.integers(3, 9)
        poly = np.stack([rng.uniform(-10, w + 10, n), rng.uniform(-10, h + 10, n)], 1).ravel()
        out.append(mask_utils.frPyObjects([poly.tolist()], h, w)[0])
    for density in (0.02, 0.5, 0.98):                     # crowd-like RLEs of noisy masks
        m = (rng.random((h, w)) < density).astype(np.uint8)
        out.append(mask_utils.encode(np.asfortranarray(m)))
    edge = np.zeros((h, w), np.uint8)
    edge[h - 1, 3], edge[0, 4] = 1, 1                     # a run across a column end
    out.append(mask_utils.encode(np.asfortranarray(edge)))
    out.append(mask_utils.encode(np.asfortranarray(np.ones((h, w), np.uint8))))   # full
    out.append(mask_utils.encode(np.asfortranarray(np.zeros((h, w), np.uint8))))  # empty
    corner = np.zeros((h, w), np.uint8)
    corner[h - 1, w - 1] = 1                                                      # last pixel
    out.append(mask_utils.encode(np.asfortranarray(corner)))
    return [{"size": r["size"], "counts": r["counts"].decode()} for r in out]


def test_box_and_crop_equal_the_full_decode():
    for rle in masks_pack_coco_meets(np.random.default_rng(0)):
        box, crop = box_crop(rle)
        want_box, want_crop = full_decode_crop(rle)
        assert box == want_box
        np.testing.assert_array_equal(crop, want_crop)


def test_uncompressed_counts_read_as_the_compressed_ones():
    rle = masks_pack_coco_meets(np.random.default_rng(1))[3]
    counts = run_lengths(rle)
    assert int(counts.sum()) == rle["size"][0] * rle["size"][1]
    box, crop = box_crop({"size": rle["size"], "counts": counts.tolist()})
    want_box, want_crop = full_decode_crop(rle)
    assert box == want_box
    np.testing.assert_array_equal(crop, want_crop)


def test_counts_that_do_not_fill_the_mask_are_refused_naming_the_file():
    rle = {"size": [4, 4], "counts": [3, 2, 5]}               # 10 of 16 pixels
    with pytest.raises(ValueError, match="10 pixels"):
        box_crop(rle)
    with pytest.raises(formats.FormatError, match=r"img\.jpg: annotation 1: bad RLE"):
        formats.rle_crops([{"size": [4, 4], "counts": [16]}, rle], "img.jpg")
