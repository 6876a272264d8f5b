"""Backgrounds addressed by index: (shard, offset, size) of each component, from the DALI .idx
files every shard set carries, so any worker reads any sample with one ranged read per
component and no reader state (the way the bank reads instances).

The index is small (a few arrays per sample) and picklable: worker processes get a copy and
open their own file handles (`ShardFiles`, an LRU of descriptors or fsspec files).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import formats, remote, urls
from ..shards import dali_index_path, stale_index
from .order import fingerprint

# components a background sample is read by; the image is `jpg` or `png`
COMPONENTS = ("image", "json", "ann.zst", "masks.zst")


class BackgroundIndexError(ValueError):
    """A background shard set cannot be indexed (missing or damaged .idx files)."""


@dataclass
class BackgroundIndex:
    """Every background sample of a shard set: `shard[i]` (index into `urls`), `key[i]`, and
    per component c `offset[c][i]` / `size[c][i]` (size -1 where the sample lacks it)."""

    urls: list[str]
    shard: np.ndarray
    key: list[str]
    offset: dict[str, np.ndarray]
    size: dict[str, np.ndarray]
    fingerprint: str
    dotted: frozenset = frozenset()  # samples whose key has a dot (their members go unread)

    def __len__(self) -> int:
        return len(self.key)

    @classmethod
    def build(cls, shard_urls: list[str]) -> BackgroundIndex:
        shard, keys, digests, dotted = [], [], [], set()
        offset = {c: [] for c in COMPONENTS}
        size = {c: [] for c in COMPONENTS}
        for n, url in enumerate(shard_urls):
            text = _read_index_text(url)
            digests.append((os.path.basename(url), fingerprint(text)))
            for line in text.splitlines()[1:]:
                fields = line.split()
                found = {}
                for ext, off, sz, member in zip(fields[0::4], fields[1::4], fields[2::4],
                                                fields[3::4], strict=True):
                    found["image" if ext in formats.BACKGROUND_IMAGE_EXTS else ext] = (int(off), int(sz))
                    key = member[:-len(ext) - 1]
                    if "." in ext:  # `a.b.jpg`: the index splits at the first dot
                        dotted.add(len(keys))
                        key = _dotted_key(member)
                shard.append(n)
                keys.append(key if fields else "?")
                for c in COMPONENTS:
                    off, sz = found.get(c, (0, -1))
                    offset[c].append(off)
                    size[c].append(sz)
        return cls(list(shard_urls), np.asarray(shard, np.int32), keys,
                   {c: np.asarray(v, np.int64) for c, v in offset.items()},
                   {c: np.asarray(v, np.int64) for c, v in size.items()},
                   fingerprint(digests), frozenset(dotted))

    def where(self, i: int) -> str:
        return f"{self.urls[int(self.shard[i])]} key {self.key[i]}"

    def repeat_factors(self, files: ShardFiles) -> np.ndarray:
        """Each sample's LVIS image repeat factor, from its json member (1 where unreadable:
        such a sample is skipped and counted when it is drawn). One small read per sample
        (100k at LVIS scale, mostly from a cold page cache): shards are read in parallel
        threads, each with its own descriptor, so the reads overlap."""
        factors = np.ones(len(self))
        rows = np.flatnonzero(self.size["json"] >= 0)
        per_shard = np.split(rows, np.flatnonzero(np.diff(self.shard[rows])) + 1) if len(rows) else []
        with ThreadPoolExecutor(REPEAT_FACTOR_READERS) as pool:
            for part in pool.map(lambda r: self._shard_repeat_factors(r, files), per_shard):
                for i, factor in part:
                    factors[i] = factor
        return factors

    def _shard_repeat_factors(self, rows: np.ndarray, files: ShardFiles) -> list[tuple[int, float]]:
        url = self.urls[int(self.shard[rows[0]])]
        fd = None if urls.is_remote(url) else _open_or_none(urls.local_path(url))
        out = []
        try:
            for i in rows.tolist():
                try:
                    if fd is None:
                        data = files.read(self, i, "json")
                    else:
                        data = os.pread(fd, int(self.size["json"][i]), int(self.offset["json"][i]))
                    meta = json.loads(data)
                    out.append((i, max(0.0, float(meta.get("repeat_factor", 1.0)))))
                except (ValueError, OSError, TypeError, AttributeError):
                    pass
        finally:
            if fd is not None:
                os.close(fd)
        return out


REPEAT_FACTOR_READERS = 16


def _open_or_none(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _dotted_key(member: str) -> str:
    """The key a member of a dotted sample was written under (`a.b.masks.zst` -> `a.b`)."""
    known = sorted((*formats.BACKGROUND_COMPONENTS, *formats.BACKGROUND_IMAGE_EXTS), key=len,
                   reverse=True)
    suffix = next((c for c in known if member.endswith("." + c)), member.rpartition(".")[2])
    return member[:-len(suffix) - 1]


def _read_index_text(url: str) -> str:
    path = dali_index_path(url)
    try:
        with urls.open_url(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        raise BackgroundIndexError(f"{path}: DALI index missing for background shard {url}; "
                                   "rewrite the shard set (pack-coco) or create it with "
                                   "DALI's wds2idx") from None
    except UnicodeDecodeError:
        raise BackgroundIndexError(f"{path}: not a DALI webdataset index (binary data)") from None
    if not text.startswith("v1."):
        raise BackgroundIndexError(f"{path}: not a DALI webdataset index (no v1.x header)")
    try:
        problem = stale_index(url, text)
    except FileNotFoundError:
        raise BackgroundIndexError(f"background shard {url} not found (its index {path} is "
                                   "there)") from None
    if problem is not None:
        raise BackgroundIndexError(problem)
    return text


class ShardFiles:
    """Ranged reads of background components: local shards through `os.pread` on an LRU of
    descriptors, object storage through the process's bounded block cache with retries
    (remote.py). Safe to copy into worker processes (opens lazily)."""

    def __init__(self, max_open: int = 32):
        self.max_open = max_open
        self._open: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def read(self, index: BackgroundIndex, i: int, component: str) -> bytes:
        size = int(index.size[component][i])
        if size < 0:
            if i in index.dotted:
                raise formats.FormatError(f"sample key {index.key[i]!r} contains a dot: readers "
                                          "split member names at the first dot, so its members "
                                          "cannot be found; write keys without dots")
            raise formats.FormatError(f"no {component} member")
        url = index.urls[int(index.shard[i])]
        off = int(index.offset[component][i])
        if urls.is_remote(url):
            data = remote.read_range(url, off, size)
        else:
            with self._lock:
                data = os.pread(self._descriptor(url), size, off)
        if len(data) != size:
            raise formats.FormatError(f"{component}: {len(data)} of {size} bytes readable "
                                      "(truncated shard?)")
        return data

    def _descriptor(self, url: str) -> int:
        if self._pid != os.getpid():  # a forked child: the parent's descriptors are not ours
            self._open.clear()
            self._pid = os.getpid()
        fd = self._open.get(url)
        if fd is None:
            fd = self._open[url] = os.open(urls.local_path(url), os.O_RDONLY)
            if len(self._open) > self.max_open:
                os.close(self._open.popitem(last=False)[1])
        self._open.move_to_end(url)
        return fd

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._open.values():
                    os.close(fd)
            self._open.clear()

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])
