"""CPU side of the loader: backgrounds from DALI's webdataset reader, instances from the bank.

Backgrounds are read by a small CPU-only DALI pipeline (`fn.readers.webdataset`: index files,
sharding by rank, shuffling). Their bytes come back to Python once per batch because three
things need them there before the GPU pipeline runs: a cheap integrity check (a corrupt image
is skipped and counted instead of failing the decoder mid-epoch), the COCO RLE annotations
(decoded with pycocotools; DALI has no RLE decoder) and the image size the LSJ plan needs.
Instance bytes are fetched from the bank and checked the same way; a corrupt instance is
replaced by another draw.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from nvidia.dali import fn, pipeline_def

from .. import formats
from ..shards import dali_index_path

JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def looks_like_jpeg(data: bytes) -> bool:
    """Start-of-image marker and an end-of-image marker near the end: catches garbage and
    truncation without decoding (a truncated JPEG is the common corruption)."""
    return len(data) > 4 and data[:3] == JPEG_SOI and JPEG_EOI in data[-1024:]


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete PNG (signature, IHDR, IEND present), else None."""
    if len(data) < 45 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    if b"IEND" not in data[-12:]:
        return None
    return struct.unpack(">II", data[16:24])


def image_ok(data: bytes, ext: str) -> bool:
    return looks_like_jpeg(data) if ext == "jpg" else png_size(data) is not None


@pipeline_def
def background_reader(paths: list[str], shard_id: int, num_shards: int, shuffle: bool,
                      shuffle_buffer: int, index_paths: list[str] | None = None):
    """Raw background samples; the last batch of a shard is padded by repeating a sample.
    `index_paths` replace the shards' own DALI indexes (repeat-factor sampling's per epoch)."""
    image, meta, ann = fn.readers.webdataset(
        paths=paths, index_paths=index_paths or [dali_index_path(p) for p in paths],
        ext=["jpg;png", "json", "ann.zst"], missing_component_behavior="empty",
        shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle,
        initial_fill=shuffle_buffer, pad_last_batch=True, name="backgrounds")
    return image, meta, ann


@dataclass
class Background:
    """One usable background: encoded bytes, its size and its real objects (masks decoded)."""

    image_id: int
    data: np.ndarray        # encoded image bytes, uint8
    height: int
    width: int
    masks: np.ndarray       # (N, h, w) uint8 0/1 at the original resolution
    labels: np.ndarray      # (N,) int64


def parse_background(data: np.ndarray, meta: bytes, ann: bytes, drop_crowd: bool) -> Background:
    """Check and unpack one reader sample; raises FormatError/ValueError when it is unusable."""
    raw = data.tobytes()
    sample = {"json": meta, "ann.zst": ann}
    info, anns = formats.read_background(sample)
    ext = "png" if raw[:8] == PNG_SIGNATURE else "jpg"
    if not image_ok(raw, ext):
        raise formats.FormatError(f"image {info.get('image_id')}: corrupt or truncated {ext}")
    if drop_crowd:
        anns = [a for a in anns if not a.get("iscrowd")]
    h, w = int(info["height"]), int(info["width"])
    masks = formats.decode_masks(anns, h, w)
    labels = np.asarray([a["category_id"] for a in anns], np.int64)
    return Background(int(info["image_id"]), data, h, w, masks, labels)


@dataclass
class LoaderCounters:
    """What the loader skipped or replaced; reported in `CopyPasteLoader.stats()`."""

    counts: Counter = field(default_factory=Counter)

    def add(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] += int(n)


class InstanceFetcher:
    """Draws instance ids and fetches their bytes, replacing corrupt payloads by new draws."""

    def __init__(self, bank, sampler, retries: int, counters: LoaderCounters):
        self.bank = bank
        self.sampler = sampler
        self.retries = retries
        self.counters = counters
        self.placeholder = _placeholder_payload()

    def draw(self, n: int) -> tuple[np.ndarray, list[dict]]:
        """n valid ids and their payloads; an id whose bytes stay corrupt after the retries
        comes back as -1 (its slot is left empty)."""
        ids = self.sampler.draw(n).astype(np.int64) if n else np.zeros(0, np.int64)
        payloads = self.bank.read_many(ids) if n else []
        bad = np.flatnonzero([not self._ok(i, p) for i, p in zip(ids, payloads, strict=True)])
        for _ in range(self.retries):
            if not bad.size:
                break
            self.counters.add("instances_corrupt", bad.size)
            ids[bad] = self.sampler.draw(bad.size)
            fresh = self.bank.read_many(ids[bad])
            for j, p in zip(bad, fresh, strict=True):
                payloads[j] = p
            bad = bad[[not self._ok(ids[j], payloads[j]) for j in bad]]
        if bad.size:
            self.counters.add("instances_corrupt", bad.size)
            self.counters.add("instances_given_up", bad.size)
            ids[bad] = -1
        return ids, payloads

    def _ok(self, iid: int, payload: dict) -> bool:
        w, h = self.bank.sizes_of([iid])
        return looks_like_jpeg(payload["jpg"]) and png_size(payload["mask.png"]) == (w[0], h[0])


def _placeholder_payload() -> dict:
    """A 1x1 fully transparent instance decoded in empty slots (the graph has K fixed slots)."""
    return {"jpg": np.frombuffer(formats.encode_jpeg(np.zeros((8, 8, 3), np.uint8)), np.uint8),
            "mask.png": np.frombuffer(formats.encode_png(np.zeros((8, 8), np.uint8)), np.uint8)}
