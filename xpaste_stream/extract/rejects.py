"""Rejected images of the extract stage, kept beside the instance shards for the quality report.

Every image that yields no instance is counted by reason in the shard stats (ShardWriter.fail).
The stage also writes one record per reject into `rejects/NAME.tar` next to instance shard
`NAME.tar` (a subfolder, so `inst-*.tar` globs never pick it up): a JSON with the reason, the
source shard and key, the category and what each segmenter's candidate did, plus optionally a
small thumbnail of the best rejected cut-out (`jpg` + `mask.png`, longest side `thumbnail_side`)
so a report can show what was thrown away. Schema `xpaste.reject/1` (docs/FORMATS.md).

A rejects tar is written when its instance shard is finished (after its stats); a crash between
the two loses only the thumbnails of that shard, never an instance.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field

import cv2
import numpy as np

from .. import formats, urls
from ..shards import ShardWriter, iter_tar

REJECT_SCHEMA = "xpaste.reject/1"


@dataclass
class Rejected:
    """Why one image gave no instance, and the cut-out that came closest (for thumbnails)."""

    reason: str
    detail: str
    category_id: int | None = None
    category: str | None = None
    candidates: dict = field(default_factory=dict)  # segmenter -> {reason, area_ratio, ...}
    crop: tuple[np.ndarray, np.ndarray] | None = None  # (rgb, alpha) of the closest cut-out


def rejects_path(shard: str) -> str:
    """`dir/rejects/NAME.tar` for instance shard `dir/NAME.tar`."""
    folder, _, name = shard.rpartition("/")
    return f"{folder}/rejects/{name}" if folder else f"rejects/{name}"


def safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)[:200] or "_"


def thumbnail(rgb: np.ndarray, alpha: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = alpha.shape
    scale = min(1.0, side / max(h, w))
    if scale == 1:
        return rgb, alpha
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return (cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
            cv2.resize(alpha, size, interpolation=cv2.INTER_AREA))


def reject_sample(position: int, source_shard: str, source_key: str, rejected: Rejected,
                  thumbnail_side: int | None) -> dict:
    meta = {"schema": REJECT_SCHEMA, "input": position, "source_shard": source_shard,
            "source_key": source_key, "category_id": rejected.category_id,
            "category": rejected.category, "reason": rejected.reason, "detail": rejected.detail,
            "candidates": rejected.candidates}
    sample = {"__key__": safe_key(source_key), "json": formats.json_bytes(meta)}
    if thumbnail_side and rejected.crop is not None:
        rgb, alpha = thumbnail(*rejected.crop, thumbnail_side)
        sample["jpg"] = formats.encode_jpeg(np.ascontiguousarray(rgb), 90)
        sample["mask.png"] = formats.encode_png(np.ascontiguousarray(alpha))
    return sample


def _tar_bytes(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class RejectsWriter:
    """Buffers the rejects of the instance shard being written; writes them once it is done.

    Right after `ShardWriter.fail(position, ...)`, the reject belongs to the shard that call
    finished (when it cut one) or else to the open shard `writer.next_shard`; every shard below
    `writer.next_shard` is finished.
    """

    def __init__(self, writer: ShardWriter, thumbnail_side: int | None = 96):
        self.writer = writer
        self.thumbnail_side = thumbnail_side
        self._pending: dict[int, list[dict]] = {}
        self._opened: set[int] = set()
        self.written: list[str] = []

    def add(self, position: int, source_shard: str, source_key: str, rejected: Rejected) -> None:
        shard = self._shard_of(position)
        self._opened.add(shard)
        self._pending.setdefault(shard, []).append(
            reject_sample(position, source_shard, source_key, rejected, self.thumbnail_side))

    def _shard_of(self, position: int) -> int:
        done = self.writer.done
        if done and done[-1]["input_start"] <= position < done[-1]["input_end"]:
            return done[-1]["shard_index"]
        return self.writer.next_shard

    def note_progress(self) -> None:
        """Write the rejects of every shard the instance writer has finished."""
        self._opened.add(self.writer.next_shard)
        for shard in sorted(s for s in self._opened if s < self.writer.next_shard):
            self._write(shard)

    def close(self) -> None:
        """After ShardWriter.close(): every shard is finished."""
        self.note_progress()

    def _write(self, shard: int) -> None:
        self._opened.discard(shard)
        samples = self._pending.pop(shard, [])
        path = rejects_path(self.writer.names[shard])
        if samples:
            urls.write_bytes(path, _tar_bytes(samples))
            self.written.append(path)
        elif urls.exists(path):  # left by an earlier run of a shard that now has no rejects
            urls.remove(path)


def read_rejects(shard: str) -> list[dict]:
    """The reject samples written beside instance shard `shard` (empty when none)."""
    path = rejects_path(shard)
    if not urls.exists(path):
        return []
    out = []
    for sample in iter_tar(path, damage=[]):
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError):
            continue
        if meta.get("schema") == REJECT_SCHEMA:
            out.append({**sample, "meta": meta})
    return out
