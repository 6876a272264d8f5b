"""Procedural images: the embedded default generator, needing no model weights.

Each category is a coloured polygon family ("red_star", "blue_hexagon", ...). Objects are drawn
on a plain white background, so the classical segmenter can cut them out exactly as Stable
Diffusion objects are cut out by a foreground segmenter in the original method. The same shapes
drawn into textured scenes make a small COCO/LVIS-format dataset (real JPEGs, polygon and RLE
masks) for backgrounds, demos and test fixtures. Output is labelled `generator: procedural`:
it exercises the whole engine, it does not replace real data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .base import Generated, WorkItem

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 20),
           "teal": (20, 160, 160), "pink": (240, 110, 170), "brown": (130, 80, 40),
           "grey": (120, 120, 120)}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "arrow",
          "crescent", "lshape")
GENERATOR = "procedural"


def style_of(category_id: int) -> tuple[str, str]:
    """(colour, shape) drawn for a category id; ids beyond the 100 styles wrap around, so any
    category list (LVIS's 1203 included) can be generated procedurally."""
    i = (int(category_id) - 1) % (len(COLOURS) * len(SHAPES))
    colour, round_ = i % len(COLOURS), i // len(COLOURS)
    # colours vary fastest, the shape shifts each round: 100 distinct (colour, shape) pairs
    return list(COLOURS)[colour], SHAPES[(colour + round_) % len(SHAPES)]


def category_names(n: int) -> list[str]:
    """Names of procedural categories 1..n ("red_circle", "red_square", ...)."""
    if not 1 <= n <= len(COLOURS) * len(SHAPES):
        raise ValueError(f"procedural categories: 1..{len(COLOURS) * len(SHAPES)}, got {n}")
    return ["_".join(style_of(i)) for i in range(1, n + 1)]


def seed_for(*parts: int) -> np.random.Generator:
    """Deterministic generator for (run seed, category, index, ...): stages restart anywhere."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float,
                  aspect: float = 1.0) -> list[tuple[float, float]]:
    """Vertices of one shape, centred at (cx, cy); every family is a simple polygon."""
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif shape == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
               for i in range(10)]
    elif shape == "hexagon":
        pts = [(math.cos(i * math.pi / 3), math.sin(i * math.pi / 3)) for i in range(6)]
    elif shape == "cross":
        a, b = 0.3, 0.9
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
               (-b, a), (-b, -a), (-a, -a)]
    elif shape == "diamond":
        pts = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    elif shape == "arrow":
        pts = [(-0.9, -0.25), (0.2, -0.25), (0.2, -0.6), (0.9, 0), (0.2, 0.6), (0.2, 0.25),
               (-0.9, 0.25)]
    elif shape == "crescent":
        outer = [(math.cos(t), math.sin(t)) for t in np.linspace(math.pi / 2, 3 * math.pi / 2, 16)]
        inner = [(0.45 * math.cos(t) - 0.1, math.sin(t)) for t in
                 np.linspace(3 * math.pi / 2, math.pi / 2, 16)]
        pts = outer + inner
    elif shape == "lshape":
        pts = [(-0.7, -0.9), (-0.1, -0.9), (-0.1, 0.3), (0.7, 0.3), (0.7, 0.9), (-0.7, 0.9)]
    else:
        raise ValueError(f"unknown procedural shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + radius * aspect * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in pts]


def draw_object(canvas: Image.Image, category_id: int, rng: np.random.Generator, cx: float,
                cy: float, radius: float) -> tuple[list[tuple[float, float]], np.ndarray]:
    """Draw category `category_id` onto `canvas` (RGB); returns its polygon and binary mask."""
    colour_name, shape = style_of(category_id)
    base = np.array(COLOURS[colour_name], float)
    colour = tuple(int(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))
    poly = shape_polygon(shape, cx, cy, radius, float(rng.uniform(0, 2 * math.pi)),
                         float(rng.uniform(0.75, 1.25)))
    mask_img = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask_img).polygon(poly, fill=255)
    shade = Image.new("RGB", canvas.size, colour)
    # a darker inner detail makes instances visually distinct without breaking the silhouette
    inner = shape_polygon(shape, cx, cy, radius * 0.45, float(rng.uniform(0, 2 * math.pi)))
    ImageDraw.Draw(shade).polygon(inner, fill=tuple(int(v * 0.6) for v in colour))
    canvas.paste(shade, (0, 0), mask_img)
    return poly, np.asarray(mask_img) >= 128


def object_image(category_id: int, index: int, seed: int, size: int = 512) -> np.ndarray:
    """One object on a white background, as Stable Diffusion is prompted to draw it."""
    rng = seed_for(seed, category_id, index)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    radius = size * float(rng.uniform(0.18, 0.4))
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1, 2) * size).tolist()
    draw_object(img, category_id, rng, cx, cy, radius)
    return np.asarray(img)


class ProceduralGenerator:
    """Stage-1 generator drawing `object_image`s: no weights, any number per category."""

    name = GENERATOR
    batch_size = 1  # drawing is per image; batching would buy nothing

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size

    def available(self, category: str) -> None:
        return None

    def report(self) -> dict:
        return {}

    def generate(self, items: list[WorkItem]) -> list[Generated]:
        return [Generated(object_image(i.category_id, i.index, self.seed, self.size)) for i in items]


# --- a COCO / LVIS-format scene dataset ---------------------------------------------------


@dataclass
class SceneSpec:
    num_images: int = 64
    image_size: tuple[int, int] = (480, 640)  # height, width
    max_objects: int = 6
    lvis: bool = True  # write LVIS fields (frequency, neg/not-exhaustive lists)
    seed: int = 0


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A smooth two-colour gradient with noise: plausible clutter-free 'real' images."""
    c0, c1 = rng.integers(60, 230, 3), rng.integers(60, 230, 3)
    t = np.linspace(0, 1, w)[None, :, None] * np.ones((h, 1, 1))
    arr = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_scene_dataset(folder: str, names: list[str], spec: SceneSpec) -> str:
    """Write images/ and annotations.json (COCO, or LVIS with `spec.lvis`); returns the json path.

    Category occurrence is long-tailed (Zipf-like), so the frequency groups and repeat factors
    that pack-coco computes are not all equal. Even annotation ids use polygons, odd ids RLE.
    """
    from pycocotools import mask as mask_utils

    rng = seed_for(spec.seed, 1_000_003)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    weights = 1.0 / np.arange(1, len(names) + 1) ** 1.1
    weights /= weights.sum()
    h, w = spec.image_size
    images, annotations = [], []
    for image_id in range(1, spec.num_images + 1):
        img = _background(rng, h, w)
        n = int(rng.integers(0, spec.max_objects + 1))
        for cat_index in rng.choice(len(names), size=n, p=weights):
            radius = float(rng.uniform(0.05, 0.25)) * min(h, w)
            cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
            poly, mask = draw_object(img, int(cat_index) + 1, rng, cx, cy, radius)
            if mask.sum() < 16:
                continue
            ann_id = len(annotations) + 1
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            if ann_id % 2 == 0:
                flat = [min(max(v, 0.0), (w if i % 2 == 0 else h)) for xy in poly
                        for i, v in enumerate(xy)]
                seg: object = [flat]
            else:
                seg = {"size": [h, w], "counts": rle["counts"].decode()}
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": int(cat_index) + 1,
                                "bbox": [x, y, bw, bh], "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": seg})
        file_name = f"{image_id:012d}.jpg"
        img.save(os.path.join(folder, "images", file_name), quality=92)
        entry = {"id": image_id, "file_name": file_name, "height": h, "width": w}
        if spec.lvis:
            present = {a["category_id"] for a in annotations if a["image_id"] == image_id}
            absent = [c for c in range(1, len(names) + 1) if c not in present]
            entry["neg_category_ids"] = sorted(rng.choice(absent, size=min(2, len(absent)),
                                                          replace=False).tolist()) if absent else []
            entry["not_exhaustive_category_ids"] = sorted(present)[:1]
            entry["coco_url"] = f"http://images.local/{file_name}"
        images.append(entry)
    categories = []
    for i, name in enumerate(names, start=1):
        cat = {"id": i, "name": name, "supercategory": "shape"}
        if spec.lvis:
            cat["synonyms"] = [name, name.replace("_", " ")]
            cat["def"] = f"a procedural {name.replace('_', ' ')}"
            cat["frequency"] = "f" if i <= max(1, len(names) // 5) else ("c" if i <= len(names) // 2 else "r")
            cat["synset"] = f"{name}.n.01"
            cat["image_count"] = len({a["image_id"] for a in annotations if a["category_id"] == i})
            cat["instance_count"] = sum(1 for a in annotations if a["category_id"] == i)
        categories.append(cat)
    doc = {"info": {"description": "xpaste-stream procedural scenes"}, "images": images,
           "annotations": annotations, "categories": categories, "licenses": []}
    path = os.path.join(folder, "annotations.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path
