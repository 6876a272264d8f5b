"""Foreground segmenters: image (H, W, 3) uint8 -> alpha (H, W) uint8.

Both need no weights and are labelled as what they are in every instance they produce
(`segmenter` in the instance JSON):
- `PlainBackgroundSegmenter`: generated objects sit on a plain background (the X-Paste prompt
  yields mostly such images), so a pixel is foreground when its colour is far from the
  background colour estimated on the image border.
- `GrabCutSegmenter`: OpenCV GrabCut seeded with that estimate; its colour models follow soft
  edges and shadows that a fixed tolerance cuts wrongly, and it fails differently, which is what
  makes keeping the best mask by CLIP score (the original's choice among segmenters) worthwhile.
"""

from __future__ import annotations

import cv2
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


class GrabCutSegmenter:
    """GrabCut from the plain-background estimate: border = background, estimate = probably
    foreground, the rest probably background. Runs on a copy at most `max_side` pixels wide
    (GrabCut's cost grows with the pixel count) and scales the mask back."""

    name = "grabcut"

    def __init__(self, iterations: int = 3, max_side: int = 256, tolerance: float = 40.0,
                 border: int = 4):
        self.iterations = iterations
        self.max_side = max_side
        self.border = border
        self.seed = PlainBackgroundSegmenter(tolerance, border)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = rgb if scale == 1 else cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        mask = np.where(self.seed(small) >= 128, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        b = max(1, round(self.border * scale))
        mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = (cv2.GC_BGD,) * 4
        if not (mask == cv2.GC_PR_FGD).any():
            return np.zeros((h, w), np.uint8)
        models = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), mask, None, *models,
                        self.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error:  # degenerate colour models (e.g. a single-colour image)
            return np.zeros((h, w), np.uint8)
        alpha = np.where((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD), 255, 0).astype(np.uint8)
        return alpha if scale == 1 else cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)


SEGMENTERS = {"plain-background": PlainBackgroundSegmenter, "grabcut": GrabCutSegmenter}
