"""The segmenter contract and the two classical segmenters that need no weights.

A segmenter turns a batch of images into one candidate mask per image (docs/SEGMENTERS.md):

    segment(images: list[(H, W, 3) uint8], categories: list[str]) -> list[SegmentResult]

`SegmentResult.alpha` is (H, W) uint8 (>= 128 is the object: soft maps are welcome, the stage
binarises them), `confidence` the segmenter's own belief in that mask in [0, 1]. Confidence is
what picks the mask when no CLIP model scores the candidates. Model-backed segmenters live in
models.py; plug-ins (dotted paths, entry points) are resolved in plugins.py.

The classical pair is labelled as what it is in every instance it produces (`segmenter` in the
instance JSON):
- `PlainBackgroundSegmenter` (the classical default): generated objects sit on a plain background
  (the X-Paste prompt yields mostly such images), so a pixel is foreground when its colour is far
  from the background colour estimated on the image border.
- `GrabCutSegmenter`: OpenCV GrabCut seeded with that estimate; its colour models follow soft
  edges and shadows that a fixed tolerance cuts wrongly, and it fails differently, which is what
  makes keeping the best mask by CLIP score (the original's choice among segmenters) worthwhile.
Both report as confidence the share of border pixels that match the estimated background colour:
the assumption they rest on. A cluttered photo scores low, so a model-backed segmenter wins there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np


@dataclass
class SegmentResult:
    """One candidate mask of one image."""

    alpha: np.ndarray   # (H, W) uint8, >= 128 is the object
    confidence: float   # the segmenter's belief in this mask, 0..1


@runtime_checkable
class Segmenter(Protocol):
    name: str  # written as `segmenter` into every instance whose mask it produced

    def segment(self, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
        """One result per image, in the order given."""


def border_pixels(rgb: np.ndarray, border: int) -> np.ndarray:
    """The pixels of a `border`-wide frame around the image, (N, 3)."""
    b = border
    return np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                           rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])


def border_plainness(rgb: np.ndarray, border: int, tolerance: float) -> float:
    """Share of border pixels within `tolerance` of their median colour: 1.0 for a plain
    background, low for a cluttered photo where the classical estimate means little."""
    edge = border_pixels(rgb, border).astype(np.int16)
    distance = np.abs(edge - np.median(edge, axis=0).astype(np.int16)).max(axis=1)
    return float((distance <= tolerance).mean())


class PlainBackgroundSegmenter:
    """Classical default: foreground = colour far from the border's median colour."""

    name = "plain-background"

    def __init__(self, tolerance: float = 40.0, border: int = 4):
        self.tolerance = tolerance
        self.border = border

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        background = np.median(border_pixels(rgb, self.border), axis=0)
        distance = np.abs(rgb.astype(np.int16) - background.astype(np.int16)).max(axis=2)
        # a soft ramp around the tolerance, so the 128 threshold sits at the tolerance
        alpha = np.clip((distance - self.tolerance) * 8 + 128, 0, 255)
        return alpha.astype(np.uint8)

    def segment(self, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
        return [SegmentResult(self(rgb), border_plainness(rgb, self.border, self.tolerance))
                for rgb in images]


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

    def segment(self, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
        return [SegmentResult(self(rgb), border_plainness(rgb, self.border, self.seed.tolerance))
                for rgb in images]


CLASSICAL = {"plain-background": PlainBackgroundSegmenter, "grabcut": GrabCutSegmenter}
