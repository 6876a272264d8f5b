"""On-disk formats shared by every stage (documented in docs/FORMATS.md).

This module owns the shard formats: sample keys, component names, JSON fields and schema
versions. Stages build samples and read them back through the helpers here, so a format change
happens in one place. Every shard set is plain tar (DALI cannot read compressed tar); zstandard
compresses what sits inside samples (annotations) and the bank index.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

# Schema versions, written into every JSON component and checked on read.
IMAGE_SCHEMA = "xpaste.image/1"
INSTANCE_SCHEMA = "xpaste.instance/1"
BACKGROUND_SCHEMA = "xpaste.background/1"
CATEGORIES_SCHEMA = "xpaste.categories/1"
STATS_SCHEMA = "xpaste.shard-stats/1"

# Component names (the part of a tar member name after the key and its dot).
IMAGE_COMPONENTS = ("jpg", "json")
INSTANCE_COMPONENTS = ("jpg", "mask.png", "json")
BACKGROUND_COMPONENTS = ("jpg", "json", "ann.zst")  # `png` replaces `jpg` for PNG sources
BACKGROUND_IMAGE_EXTS = ("jpg", "png")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_ZSTD_LEVEL = 10


class FormatError(ValueError):
    """A sample or file does not follow the documented format."""


def check_key(key: str) -> str:
    """Keys are letters, digits, '_' and '-' only: webdataset and DALI split names at the first dot."""
    if not _KEY_RE.match(key):
        raise FormatError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only (no dots)")
    return key


def image_key(category_id: int, index: int) -> str:
    return f"c{category_id:05d}-{index:07d}"


def background_key(image_id: int) -> str:
    return f"img{image_id:012d}"


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def zstd_json(obj: Any) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(json_bytes(obj))


def unzstd_json(data: bytes) -> Any:
    return json.loads(zstandard.ZstdDecompressor().decompress(data))


def _check_schema(meta: dict, schema: str, where: str) -> dict:
    found = meta.get("schema")
    if found != schema:
        raise FormatError(f"{where}: schema {found!r}, expected {schema!r}")
    return meta


# --- image shards (stage 1: generate) -------------------------------------------------------


def image_sample(key: str, jpg: bytes, *, category_id: int, category: str, prompt: str,
                 seed: int, generator: str, width: int, height: int, **extra: Any) -> dict:
    """A generated image: the JPEG bytes plus what produced it."""
    meta = {"schema": IMAGE_SCHEMA, "category_id": int(category_id), "category": category,
            "prompt": prompt, "seed": int(seed), "generator": generator,
            "width": int(width), "height": int(height), **extra}
    return {"__key__": check_key(key), "jpg": jpg, "json": json_bytes(meta)}


def read_image_meta(sample: dict) -> dict:
    return _check_schema(json.loads(sample["json"]), IMAGE_SCHEMA, sample.get("__key__", "?"))


# --- instance shards (stage 2: extract) ---------------------------------------------------


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def instance_sample(key: str, rgb: np.ndarray, alpha: np.ndarray, *, category_id: int,
                    category: str, clip_score: float | None, source_key: str,
                    generator: str, segmenter: str, jpeg_quality: int = 95,
                    **extra: Any) -> dict:
    """A cut-out object cropped to its tight box: RGB as JPEG, alpha (0..255) as 8-bit PNG.

    JPEG keeps the colour payload decodable by nvJPEG on the GPU; the alpha is a separate
    lossless PNG because JPEG has no alpha channel and lossy edges would move the mask.
    """
    if rgb.shape[:2] != alpha.shape[:2] or rgb.ndim != 3 or alpha.ndim != 2:
        raise FormatError(f"{key}: rgb {rgb.shape} and alpha {alpha.shape} do not match")
    h, w = alpha.shape
    meta = {"schema": INSTANCE_SCHEMA, "category_id": int(category_id), "category": category,
            "width": int(w), "height": int(h), "area": int((alpha >= 128).sum()),
            "clip_score": None if clip_score is None else float(clip_score),
            "source_key": source_key, "generator": generator, "segmenter": segmenter, **extra}
    return {"__key__": check_key(key), "jpg": encode_jpeg(rgb, jpeg_quality),
            "mask.png": encode_png(alpha.astype(np.uint8)), "json": json_bytes(meta)}


def read_instance_meta(sample: dict) -> dict:
    return _check_schema(json.loads(sample["json"]), INSTANCE_SCHEMA, sample.get("__key__", "?"))


# --- background shards (pack-coco) --------------------------------------------------------


@dataclass(frozen=True)
class BackgroundAnnotation:
    """One real object of a background image, mask as COCO compressed RLE."""

    id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels
    area: float
    iscrowd: int
    rle: dict  # {"size": [h, w], "counts": str}


def background_sample(key: str, image_bytes: bytes, image_ext: str, *, image_id: int,
                      file_name: str, width: int, height: int,
                      annotations: list[BackgroundAnnotation], neg_category_ids: list[int],
                      not_exhaustive_category_ids: list[int], repeat_factor: float = 1.0) -> dict:
    """A real training image with its annotations; image bytes are stored as they were."""
    if image_ext not in BACKGROUND_IMAGE_EXTS:
        raise FormatError(f"{file_name}: background image extension {image_ext!r} not in "
                          f"{BACKGROUND_IMAGE_EXTS}")
    meta = {"schema": BACKGROUND_SCHEMA, "image_id": int(image_id), "file_name": file_name,
            "width": int(width), "height": int(height), "num_annotations": len(annotations),
            "category_ids": sorted({a.category_id for a in annotations}),
            "neg_category_ids": sorted(int(c) for c in neg_category_ids),
            "not_exhaustive_category_ids": sorted(int(c) for c in not_exhaustive_category_ids),
            "repeat_factor": round(float(repeat_factor), 6)}
    anns = [{"id": a.id, "category_id": a.category_id, "bbox": list(a.bbox), "area": a.area,
             "iscrowd": a.iscrowd, "segmentation": a.rle} for a in annotations]
    return {"__key__": check_key(key), image_ext: image_bytes, "json": json_bytes(meta),
            "ann.zst": zstd_json({"schema": BACKGROUND_SCHEMA, "annotations": anns})}


def read_background(sample: dict) -> tuple[dict, list[dict]]:
    """Metadata and annotation list of a background sample (masks still RLE)."""
    where = sample.get("__key__", "?")
    meta = _check_schema(json.loads(sample["json"]), BACKGROUND_SCHEMA, where)
    anns = _check_schema(unzstd_json(sample["ann.zst"]), BACKGROUND_SCHEMA, where)["annotations"]
    return meta, anns


def background_image(sample: dict) -> tuple[str, bytes]:
    for ext in BACKGROUND_IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    raise FormatError(f"{sample.get('__key__', '?')}: no image component ({BACKGROUND_IMAGE_EXTS})")


def decode_masks(anns: list[dict], height: int, width: int) -> np.ndarray:
    """RLE annotations -> uint8 masks of shape (N, H, W) with values 0/1."""
    from pycocotools import mask as mask_utils

    if not anns:
        return np.zeros((0, height, width), np.uint8)
    rles = []
    for a in anns:
        rle = dict(a["segmentation"])
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
        rles.append(rle)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


# --- category metadata (written by pack-coco next to the background shards) ---------------


def read_categories(path: str) -> dict:
    """Load a categories file (see docs/FORMATS.md); fails with the path named."""
    from .urls import open_url

    try:
        with open_url(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise FormatError(f"{path}: categories file not found") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    return _check_schema(doc, CATEGORIES_SCHEMA, path)
