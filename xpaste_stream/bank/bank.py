"""InstanceBank: a built bank, memory-mapped, with random access to instance payloads.

Reads:
- local and NFS shards: `os.pread` on file descriptors kept in a bounded LRU cache;
- fsspec URLs (s3://, gs://, ...): ranged reads `fs.cat_file(path, start, end)`.
A shard is checked against the manifest (size, mtime or ETag) each time it is opened, so a shard
that vanished or changed since indexing raises BankError naming it before any bytes are used.

The object pickles as its path and reopens lazily: worker processes (torch DataLoader, DALI
parallel external source) each open their own descriptors. A forked child notices the pid change
and closes its copies of the inherited descriptors before opening its own.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from .layout import CATEGORY_FILES, COLUMNS, BankError, column_path, read_manifest
from .sources import check_shards_present, locate_shards, open_shard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# When the mask starts at most this far after the jpg ends, both are fetched in one read.
_JOINT_READ_GAP = 64 * 1024


class InstanceBank:
    """Instances by category. Ids `0..num_instances-1` are the drawable instances, sorted by
    category; ids from `num_instances` up to `num_indexed` are dropped near-duplicates (readable,
    never drawn)."""

    def __init__(self, path: str, max_open_files: int = 64, shard_root: str | None = None):
        self.path = os.path.abspath(path)
        self.max_open_files = max_open_files
        self.shard_root = shard_root
        self.manifest = read_manifest(self.path)
        self.shards: list[dict] = locate_shards(self.path, self.manifest, shard_root)
        self.num_instances: int = self.manifest["num_instances"]
        self.num_indexed: int = self.manifest["num_indexed"]
        self._columns = {name: self._load(name) for name in COLUMNS}
        self.category_ids: np.ndarray = self._load(CATEGORY_FILES[0])
        self.category_starts: np.ndarray = self._load(CATEGORY_FILES[1])
        self._pid = os.getpid()
        self._files: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str, max_open_files: int = 64, shard_root: str | None = None) -> InstanceBank:
        """`shard_root`: where the shards are now, when they moved (local folder or URL): each
        shard is looked up at the same place relative to it as it was to the shards' common
        folder at indexing time. Without it, shards are found where they were indexed or, when
        bank and shards were moved or copied together, at the same place relative to the bank."""
        return cls(path, max_open_files, shard_root)

    def _load(self, name: str) -> np.ndarray:
        try:
            array = np.load(column_path(self.path, name), mmap_mode="r")
        except FileNotFoundError:
            raise BankError(f"{self.path}: column file {name}.npy missing; rebuild the bank") from None
        if name in COLUMNS and len(array) != self.num_indexed:
            raise BankError(f"{self.path}: column {name} has {len(array)} rows, the manifest "
                            f"{self.num_indexed} (interrupted build?); rebuild the bank")
        return array

    # -- metadata ------------------------------------------------------------------------------

    def category_counts(self) -> np.ndarray:
        """Drawable instances per category, aligned with `category_ids`."""
        return np.diff(self.category_starts)

    def instances_of(self, category_id: int) -> np.ndarray:
        """Ids of the drawable instances of a category (empty if it has none)."""
        i = np.searchsorted(self.category_ids, category_id)
        if i == len(self.category_ids) or self.category_ids[i] != category_id:
            return np.zeros(0, np.int64)
        return np.arange(self.category_starts[i], self.category_starts[i + 1], dtype=np.int64)

    def categories_of(self, ids) -> np.ndarray:
        return np.asarray(self._columns["category"][self._check_ids(ids)], dtype=np.int32)

    def sizes_of(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(width, height) arrays in pixels."""
        ids = self._check_ids(ids)
        return (np.asarray(self._columns["width"][ids], dtype=np.int32),
                np.asarray(self._columns["height"][ids], dtype=np.int32))

    def clip_scores_of(self, ids) -> np.ndarray:
        """CLIP scores as float32, NaN where the instance has none."""
        return np.asarray(self._columns["clip_score"][self._check_ids(ids)], dtype=np.float32)

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_indexed):
            raise BankError(f"instance id out of range [0, {self.num_indexed}) for bank {self.path}")
        return ids

    # -- payloads ------------------------------------------------------------------------------

    def read(self, iid: int) -> dict:
        """{"jpg": bytes, "mask.lz4" (or "mask.png" for schema /1 shards): bytes,
        "category_id": int} of one instance (the mask's kind is told by the PNG signature)."""
        iid = int(self._check_ids(iid))
        c = self._columns
        shard = int(c["shard"][iid])
        jpg_at, jpg_size = int(c["jpg_block"][iid]) * 512, int(c["jpg_size"][iid])
        mask_at, mask_size = int(c["mask_block"][iid]) * 512, int(c["mask_size"][iid])
        self._adopt_after_fork()
        with self._lock:
            file = self._file(shard)
            if 0 <= mask_at - (jpg_at + jpg_size) <= _JOINT_READ_GAP:
                span = file.read(jpg_at, mask_at + mask_size - jpg_at)
                jpg, mask = span[:jpg_size], span[mask_at - jpg_at:]
            else:
                jpg, mask = file.read(jpg_at, jpg_size), file.read(mask_at, mask_size)
        if len(jpg) != jpg_size or len(mask) != mask_size:
            raise BankError(f"shard {self.shards[shard]['path']}: short read for instance {iid}")
        component = "mask.png" if mask[:8] == PNG_SIGNATURE else "mask.lz4"
        return {"jpg": jpg, component: mask, "category_id": int(c["category"][iid])}

    def where(self, iid: int) -> tuple[str, str]:
        """(shard path, sample key) of instance `iid`, for naming a damaged one: the key is read
        from the tar header just before its JPEG member (the index keeps no keys: 30 B each);
        "instance N" when that header cannot be read."""
        iid = int(self._check_ids(iid))
        c = self._columns
        shard = int(c["shard"][iid])
        path = str(self.shards[shard]["path"])
        try:
            self._adopt_after_fork()
            with self._lock:
                header = self._file(shard).read(int(c["jpg_block"][iid]) * 512 - 512, 512)
            name = header[:100].rstrip(b"\0").decode()
            return path, name.split("/")[-1].split(".", 1)[0] or f"instance {iid}"
        except (OSError, UnicodeDecodeError, ValueError, BankError):
            return path, f"instance {iid}"

    def read_many(self, ids) -> list[dict]:
        """`read` of each id, in the order given; reads are issued in file order."""
        ids = self._check_ids(ids)
        c = self._columns
        order = np.lexsort((c["jpg_block"][ids], c["shard"][ids]))
        out: list[dict | None] = [None] * len(ids)
        for i in order:
            out[i] = self.read(ids[i])
        return out

    def _file(self, shard: int):
        """The open shard, from the LRU cache of this process (call with the lock held)."""
        file = self._files.get(shard)
        if file is not None:
            self._files.move_to_end(shard)
            return file
        file = open_shard(self.shards[shard])
        self._files[shard] = file
        while len(self._files) > self.max_open_files:
            _, oldest = self._files.popitem(last=False)
            oldest.close()
        return file

    def _adopt_after_fork(self) -> None:
        """In a forked child: close the child's copies of the parent's descriptors (the parent's
        stay open) and take a fresh lock (the parent's may have been held at fork time)."""
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            for file in self._files.values():
                file.close()
            self._files = OrderedDict()
            self._pid = os.getpid()

    def check_shards(self) -> None:
        """BankError naming every shard that is missing or changed (stats each one)."""
        check_shards_present(self.shards, self.path)

    def close(self) -> None:
        self._adopt_after_fork()
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files = OrderedDict()

    def __enter__(self) -> InstanceBank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pickling: a path, reopened in the receiving process --------------------------------

    def __getstate__(self) -> dict:
        return {"path": self.path, "max_open_files": self.max_open_files,
                "shard_root": self.shard_root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["max_open_files"], state.get("shard_root"))

    def __repr__(self) -> str:
        return (f"InstanceBank({self.path!r}: {self.num_instances} instances, "
                f"{len(self.category_ids)} categories, {len(self.shards)} shards)")
