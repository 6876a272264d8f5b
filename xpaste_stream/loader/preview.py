"""A PNG grid of composited samples: mask outlines (real green, pasted orange) and labels."""

from __future__ import annotations

import math

import cv2
import numpy as np

REAL, PASTED = (40, 220, 60), (255, 140, 0)


def draw_sample(image: np.ndarray, target: dict, names: dict[int, str]) -> np.ndarray:
    """(S, S, 3) uint8 copy of `image` with each object's outline and name drawn on it."""
    out = np.ascontiguousarray(image.copy())
    masks = target["masks"].cpu().numpy()
    for mask, label, source, box in zip(masks, target["labels"].tolist(), target["source"].tolist(),
                                        target["boxes"].tolist(), strict=True):
        colour = PASTED if source else REAL
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 1)
        x, y = int(box[0]), max(int(box[1]) - 3, 8)
        cv2.putText(out, names.get(label, str(label)), (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1,
                    cv2.LINE_AA)
    return out


def save_grid(batch, names: dict[int, str], path: str, max_images: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_images, len(batch.targets))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        image = batch.images[i].permute(1, 2, 0).cpu().numpy()
        target = batch.targets[i]
        ax = axes.flat[i]
        ax.imshow(draw_sample(image, target, names))
        real = int((target["source"] == 0).sum())
        ax.set_title(f"image {target['image_id']}: {real} real, {len(target['source']) - real} pasted",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
