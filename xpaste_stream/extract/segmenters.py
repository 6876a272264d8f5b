"""Foreground segmenters: image (H, W, 3) uint8 -> alpha (H, W) uint8.

`PlainBackgroundSegmenter` is the embedded default that needs no weights: generated objects sit
on a plain background (the X-Paste prompt yields mostly such images), so a pixel is foreground
when its colour is far from the background colour estimated on the image border. It is labelled
as what it is in every instance it produces (`segmenter: plain-background`).
"""

from __future__ import annotations

import numpy as np


class PlainBackgroundSegmenter:
    name = "plain-background"

    def __init__(self, tolerance: float = 40.0, border: int = 4):
        self.tolerance = tolerance
        self.border = border

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        b = self.border
        edge = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                               rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
        background = np.median(edge, axis=0)
        distance = np.abs(rgb.astype(np.int16) - background.astype(np.int16)).max(axis=2)
        # a soft ramp around the tolerance, so the 128 threshold sits at the tolerance
        alpha = np.clip((distance - self.tolerance) * 8 + 128, 0, 255)
        return alpha.astype(np.uint8)


SEGMENTERS = {"plain-background": PlainBackgroundSegmenter}
