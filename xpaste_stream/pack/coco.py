"""pack-coco: a COCO or LVIS annotation file plus its image folder -> background shards.

Reader (annotation file, via `lvis` / pycocotools) -> workers (read and check each image, turn
its masks into compressed RLE) -> writer (ShardWriter: atomic shards, DALI index, stats). Images
are stored as they are (no re-encoding). Beside the shards goes `categories.json`: per category
its names, frequency group, counts, the paste-scale statistics and the LVIS repeat factor.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import formats, urls
from ..config import ConfigError
from ..shards import ShardWriter

LVIS_RARE_MAX, LVIS_COMMON_MAX = 10, 100  # LVIS frequency groups by training image count


@dataclass
class PackCocoConfig:
    annotations: str
    images: str
    output: str = "runs/backgrounds/bg-{shard:06d}.tar"
    categories_out: str | None = None  # default: categories.json beside the shards
    repeat_threshold: float = 0.001    # LVIS repeat-factor sampling t
    verify_images: bool = True         # decode every image once to catch corrupt files
    workers: int = 2
    maxcount: int = 1000
    maxsize: int = 1 << 30

    def validate(self) -> None:
        if not 0 < self.repeat_threshold < 1:
            raise ValueError("repeat_threshold must be in (0, 1)")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")

    def check_inputs(self) -> None:
        if not os.path.isfile(self.annotations):
            raise ConfigError(f"annotation file {self.annotations} not found")
        if not os.path.isdir(self.images):
            raise ConfigError(f"image folder {self.images} not found")

    def categories_path(self) -> str:
        return self.categories_out or os.path.join(os.path.dirname(self.output), "categories.json")


def load_dataset(path: str):
    """Open with `lvis.LVIS` when the file is LVIS-format, else `pycocotools.coco.COCO`."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise formats.FormatError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise formats.FormatError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in doc]
    if not isinstance(doc, dict) or missing:
        raise formats.FormatError(f"{path}: not a COCO/LVIS annotation file (missing {missing})")
    is_lvis = any("frequency" in c for c in doc["categories"])
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries print while indexing
        if is_lvis:
            from lvis import LVIS

            class ParsedLVIS(LVIS):
                """LVIS over an already parsed document (LVIS() insists on reading the file)."""

                def __init__(self, dataset: dict):
                    self.logger = logging.getLogger("lvis")
                    self.dataset = dataset
                    self._create_index()

            ds = ParsedLVIS(doc)
        else:
            from pycocotools.coco import COCO

            ds = COCO()
            ds.dataset = doc
            ds.createIndex()
    return ds, is_lvis


def to_rle(segmentation, height: int, width: int) -> dict:
    """Polygon, uncompressed or compressed RLE -> compressed RLE with a str `counts`."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode() if isinstance(counts, bytes) else counts}


def category_table(ds, is_lvis: bool, repeat_threshold: float) -> list[dict]:
    """Per-category metadata and statistics (docs/FORMATS.md, "Category metadata")."""
    images = ds.dataset["images"]
    n_images = max(1, len(images))
    area_of = {im["id"]: float(im["height"]) * float(im["width"]) for im in images}
    image_sets: dict[int, set[int]] = {c["id"]: set() for c in ds.dataset["categories"]}
    scales: dict[int, list[float]] = {c["id"]: [] for c in ds.dataset["categories"]}
    for a in ds.dataset["annotations"]:
        cid = a["category_id"]
        if cid not in image_sets or a["image_id"] not in area_of:
            continue
        image_sets[cid].add(a["image_id"])
        if not a.get("iscrowd", 0):
            w, h = a["bbox"][2], a["bbox"][3]
            scales[cid].append(math.sqrt(max(w * h, 0.0) / area_of[a["image_id"]]))
    table = []
    for c in sorted(ds.dataset["categories"], key=lambda c: c["id"]):
        cid, s = c["id"], np.asarray(scales[c["id"]], float)
        image_count = len(image_sets[cid])
        freq = image_count / n_images
        frequency = c.get("frequency") if is_lvis else None
        if frequency is None:
            frequency = ("r" if image_count <= LVIS_RARE_MAX else
                         "c" if image_count <= LVIS_COMMON_MAX else "f")
        table.append({
            "id": cid, "name": c["name"], "synonyms": c.get("synonyms", [c["name"]]),
            "definition": c.get("def", ""), "frequency": frequency,
            "image_count": image_count, "instance_count": int(len(s)),
            "scale_mean": float(s.mean()) if len(s) else None,
            "scale_std": float(s.std()) if len(s) > 1 else None,
            "repeat_factor": max(1.0, math.sqrt(repeat_threshold / freq)) if freq > 0 else None,
        })
    return table


# -- worker ------------------------------------------------------------------------------


def pack_image(task: tuple) -> dict | tuple[str, str]:
    """Read one image and build its background sample, or return (reason, detail)."""
    image, anns, image_dir, known_categories, repeat_factors, verify = task
    path = os.path.join(image_dir, image["file_name"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "missing_image", f"{path}: {e.strerror or e}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, size = im.format, im.size
            if verify:
                im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return "corrupt_image", f"{path}: {e}"
    ext = {"JPEG": "jpg", "PNG": "png"}.get(fmt)
    if ext is None:
        return "unsupported_image_format", f"{path}: {fmt}"
    h, w = int(image["height"]), int(image["width"])
    if size != (w, h):
        return "size_mismatch", f"{path}: file is {size[0]}x{size[1]}, annotation says {w}x{h}"
    unknown = sorted({a["category_id"] for a in anns} - known_categories)
    if unknown:
        return "unknown_category", f"{path}: annotations use category ids {unknown} not in the file"
    try:
        annotations = [formats.BackgroundAnnotation(
            id=int(a["id"]), category_id=int(a["category_id"]), bbox=tuple(float(v) for v in a["bbox"]),
            area=float(a.get("area", 0.0)), iscrowd=int(a.get("iscrowd", 0)),
            rle=to_rle(a["segmentation"], h, w)) for a in anns]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return "bad_annotation", f"{path}: {type(e).__name__}: {e}"
    rf = max([repeat_factors.get(a.category_id) or 1.0 for a in annotations], default=1.0)
    return formats.background_sample(
        formats.background_key(int(image["id"])), data, ext, image_id=int(image["id"]),
        file_name=image["file_name"], width=w, height=h, annotations=annotations,
        neg_category_ids=image.get("neg_category_ids", []),
        not_exhaustive_category_ids=image.get("not_exhaustive_category_ids", []),
        repeat_factor=rf)


def run_pack_coco(cfg: PackCocoConfig, progress: bool = True) -> dict:
    cfg.check_inputs()
    ds, is_lvis = load_dataset(cfg.annotations)
    table = category_table(ds, is_lvis, cfg.repeat_threshold)
    doc = {"schema": formats.CATEGORIES_SCHEMA, "dataset": "lvis" if is_lvis else "coco",
           "source": os.path.abspath(cfg.annotations), "num_images": len(ds.dataset["images"]),
           "repeat_threshold": cfg.repeat_threshold, "categories": table}
    urls.write_bytes(cfg.categories_path(), json.dumps(doc, indent=1).encode())

    known = {c["id"] for c in table}
    repeat_factors = {c["id"]: c["repeat_factor"] for c in table}
    images = sorted(ds.dataset["images"], key=lambda im: im["id"])
    anns_of: dict[int, list] = {}
    for a in ds.dataset["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)

    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
    start = writer.resume()
    tasks = ((im, anns_of.get(im["id"], []), cfg.images, known, repeat_factors, cfg.verify_images)
             for im in images[start:])
    with contextlib.ExitStack() as stack:
        if cfg.workers > 1:
            pool = stack.enter_context(get_context("spawn").Pool(cfg.workers))
            results = pool.imap(pack_image, tasks, chunksize=8)
        else:
            results = map(pack_image, tasks)
        bar = stack.enter_context(tqdm(total=len(images), initial=start, desc="pack-coco",
                                       unit="img", disable=not progress))
        for position, result in enumerate(results, start=start):
            if isinstance(result, tuple):
                writer.fail(position, *result)
            else:
                writer.add(position, result)
            bar.update(1)
    summary = writer.close()
    summary["categories"] = cfg.categories_path()
    return summary
