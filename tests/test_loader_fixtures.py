"""Small on-disk fixtures for the loader tests: background shards, categories.json, a bank.

Backgrounds are flat grey with each annotated object drawn in its own flat colour exactly on
its mask, so image/mask alignment after LSJ can be checked pixel by pixel. Instances are flat
coloured rectangles or ellipses with a hard alpha.
"""

from __future__ import annotations

import json
import os

import numpy as np
from pycocotools import mask as mask_utils

from xpaste_stream import formats
from xpaste_stream.bank import build_index
from xpaste_stream.shards import ShardWriter, write_samples

BG_GREY = 90
OBJECT_COLOURS = {1: (230, 30, 30), 2: (30, 230, 30), 3: (30, 30, 230), 4: (230, 230, 30)}


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def background(image_id: int, h: int, w: int, boxes: list[tuple[int, int, int, int, int]],
               ext: str = "png") -> dict:
    """A background sample with one rectangle object per (category, x, y, bw, bh)."""
    img = np.full((h, w, 3), BG_GREY, np.uint8)
    anns = []
    for n, (cid, x, y, bw, bh) in enumerate(boxes):
        m = np.zeros((h, w), np.uint8)
        m[y:y + bh, x:x + bw] = 1
        img[m.astype(bool)] = OBJECT_COLOURS[cid]
        anns.append(formats.BackgroundAnnotation(id=image_id * 100 + n, category_id=cid,
                                                 bbox=(x, y, bw, bh), area=float(m.sum()),
                                                 iscrowd=0, rle=rle_of(m)))
    data = formats.encode_png(img) if ext == "png" else formats.encode_jpeg(img, 95)
    return formats.background_sample(formats.background_key(image_id), data, ext,
                                     image_id=image_id, file_name=f"{image_id}.{ext}", width=w,
                                     height=h, annotations=anns, neg_category_ids=[],
                                     not_exhaustive_category_ids=[])


def write_backgrounds(folder: str, samples: list[dict], per_shard: int = 4) -> list[str]:
    return write_samples(os.path.join(folder, "bg-{shard:06d}.tar"), samples, per_shard)


def default_backgrounds(n: int = 10, seed: int = 0) -> list[dict]:
    """n backgrounds of varied sizes, 0-3 rectangle objects each (image 0 has none)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(64, 160)), int(rng.integers(64, 160))
        boxes = []
        for _ in range(0 if i == 0 else int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            boxes.append((int(rng.integers(1, 4)), int(rng.integers(0, w - bw)),
                          int(rng.integers(0, h - bh)), bw, bh))
        out.append(background(i, h, w, boxes))
    return out


def write_categories(folder: str, stats: dict[int, tuple[float, float] | None]) -> str:
    """categories.json; `None` stats = a category without real annotations (no statistics)."""
    cats = []
    for cid, st in sorted(stats.items()):
        mean, std = st if st else (None, None)
        cats.append({"id": cid, "name": f"cat{cid}", "frequency": "c", "image_count": 1,
                     "instance_count": 1 if st else 0, "scale_mean": mean, "scale_std": std,
                     "repeat_factor": 1.0})
    path = os.path.join(folder, "categories.json")
    with open(path, "w") as f:
        json.dump({"schema": formats.CATEGORIES_SCHEMA, "categories": cats}, f)
    return path


def instance(key: str, cid: int, h: int, w: int, colour, shape: str = "rect") -> dict:
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:] = colour
    alpha = np.full((h, w), 255, np.uint8)
    if shape == "ellipse":
        yy, xx = np.mgrid[:h, :w]
        alpha = (((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 1)
        alpha = alpha.astype(np.uint8) * 255
    return formats.instance_sample(key, rgb, alpha, category_id=cid, category=f"cat{cid}",
                                   clip_score=30.0, source_key=key, generator="test",
                                   segmenter="test")


def write_bank(folder: str, categories: tuple[int, ...] = (1, 2, 3), per_category: int = 3,
               corrupt: int = 0) -> str:
    """Instance shards and their bank; the first `corrupt` instances get truncated JPEGs."""
    writer = ShardWriter(os.path.join(folder, "inst", "inst-{shard:06d}.tar"), maxcount=100)
    writer.resume()
    n = 0
    for cid in categories:
        for j in range(per_category):
            colour = tuple(int(v) % 256 for v in (40 + 50 * cid, 250 - 40 * j, 60 + 30 * j))
            s = instance(formats.image_key(cid, j), cid, 20 + 6 * j, 30 - 4 * j, colour,
                         "ellipse" if j % 2 else "rect")
            if n < corrupt:
                s["jpg"] = s["jpg"][: len(s["jpg"]) // 2]
            writer.add(n, s)
            n += 1
    writer.close()
    shards = sorted(os.path.join(folder, "inst", f) for f in os.listdir(os.path.join(folder, "inst"))
                    if f.endswith(".tar"))
    bank_dir = os.path.join(folder, "bank")
    build_index(shards, bank_dir, workers=1, progress=False)
    return bank_dir


def make_dataset(folder: str, n_backgrounds: int = 10, per_shard: int = 4,
                 **bank_kw) -> tuple[list[str], str]:
    """Backgrounds (+ categories.json with cat 4 absent from the bank and cat 3 without
    statistics) and a bank of categories 1-3."""
    bg_dir = os.path.join(folder, "bg")
    os.makedirs(bg_dir, exist_ok=True)
    urls = write_backgrounds(bg_dir, default_backgrounds(n_backgrounds), per_shard)
    write_categories(bg_dir, {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None, 4: (0.1, 0.02)})
    return urls, write_bank(folder, **bank_kw)


def mismatched_bank_dataset(folder: str) -> tuple[list[str], str]:
    """Backgrounds whose categories.json lists 1 and 2, and a bank that also holds 7."""
    bg_dir = os.path.join(folder, "bg")
    os.makedirs(bg_dir, exist_ok=True)
    urls = write_backgrounds(bg_dir, default_backgrounds(4))
    write_categories(bg_dir, {1: (0.2, 0.05), 2: (0.3, 0.1)})
    return urls, write_bank(folder, categories=(1, 2, 7))


def corrupt_instance_dataset(folder: str) -> tuple[list[str], str, set[int]]:
    """8 backgrounds and a bank of 6 instances whose first 3 have truncated JPEGs."""
    from xpaste_stream.bank import InstanceBank
    from xpaste_stream.loader.sources import jpeg_size

    bg_dir = os.path.join(folder, "bg")
    os.makedirs(bg_dir, exist_ok=True)
    urls = write_backgrounds(bg_dir, default_backgrounds(8))
    write_categories(bg_dir, {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    bank = write_bank(folder, per_category=2, corrupt=3)
    opened = InstanceBank.open(bank)
    corrupt = {i for i in range(opened.num_instances) if jpeg_size(opened.read(i)["jpg"]) is None}
    return urls, bank, corrupt


def fingerprint(batches) -> list:
    """What identifies a run's batches: positions, plan ids and pixel sums (resume and
    worker-loss tests compare runs by it)."""
    return [(b.positions.tolist(), b.plan.ids.tolist(), b.images.sum().item()) for b in batches]
