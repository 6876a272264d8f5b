"""Mask post-processing of the original method: binarise, largest contour, fill holes, crop."""

from __future__ import annotations

import cv2
import numpy as np


def clean_mask(alpha: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Binarise at `threshold`, keep the largest external contour with its holes filled.

    Returns a uint8 0/255 mask of the input's size (all zero when nothing is foreground).
    """
    binary = (alpha >= threshold).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(binary)
    if contours:
        largest = max(contours, key=cv2.contourArea)
        cv2.drawContours(out, [largest], -1, color=255, thickness=cv2.FILLED)
    return out


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) exclusive bounds of the non-zero pixels, or None for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if not len(ys):
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1
