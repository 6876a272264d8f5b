"""A 64-bit difference hash (dHash) of a JPEG, for near-duplicate removal at index time.

The image is decoded at reduced scale (JPEG draft mode: DCT scaling, so a large crop costs
little), turned to grey and resized to 9x8; bit i says whether a pixel is brighter than its
right neighbour. Re-encodes and small resizes of one image keep the same hash; the bank drops
an instance whose hash equals that of an earlier instance of the same category.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_BIT_WEIGHTS = (1 << np.arange(64, dtype=np.uint64)).astype(np.uint64)


def dhash64(jpg: bytes) -> int:
    with Image.open(io.BytesIO(jpg)) as im:
        im.draft("L", (18, 16))
        grey = np.asarray(im.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).reshape(-1)
    return int(np.bitwise_or.reduce(_BIT_WEIGHTS[bits], initial=np.uint64(0)))
