"""Index one instance shard from its tar headers and JSON components, without decoding images.

The walk reads each 512-byte header, reads the data of `json` members only and jumps over the
jpg and mask.png payloads, recording where they are. A shard cut short is indexed up to its last
whole sample: a sample is kept when its jpg, mask.png and json members lie whole in the file.
With `hash_images`, the jpg of every instance is also read and hashed for near-duplicate removal
(see phash.py) - the one place the bank decodes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import urls
from ..formats import INSTANCE_SCHEMA
from .layout import BLOCK, BankError
from .phash import dhash64

REQUIRED = ("jpg", "mask.png", "json")
ZERO_BLOCK = bytes(BLOCK)
_REGULAR_FILE = (b"0", b"\0", b"7")

# What a worker returns per instance; `dhash` stays 0 unless images are hashed.
ROW_DTYPE = np.dtype([("jpg_block", np.uint32), ("jpg_size", np.uint32), ("mask_block", np.uint32),
                      ("mask_size", np.uint32), ("category", np.int32), ("width", np.uint16),
                      ("height", np.uint16), ("clip_score", np.float16), ("dhash", np.uint64)])


@dataclass
class ShardScan:
    """The rows of one shard in file order, and what cut it short (None for a whole shard)."""

    url: str
    rows: np.ndarray
    truncated: str | None


class _Truncated(Exception):
    """The file ends before the tar archive does."""


def scan_shard(url: str, hash_images: bool = False) -> ShardScan:
    reader = _open_reader(url)
    try:
        rows, truncated = _scan(reader, url, hash_images)
    finally:
        reader.close()
    return ShardScan(url, np.array(rows, dtype=ROW_DTYPE), truncated)


def _scan(reader, url: str, hash_images: bool) -> tuple[list[tuple], str | None]:
    rows: list[tuple] = []
    key, parts = None, {}
    truncated = None
    try:
        for name, offset, size in _members(reader):
            base = name.rsplit("/", 1)[-1]
            member_key, _, ext = base.partition(".")
            if member_key != key:
                if key is not None:
                    rows.append(_row(reader, url, key, parts, hash_images))
                key, parts = member_key, {}
            parts[ext] = (offset, size)
    except _Truncated as e:
        truncated = str(e)
    if key is not None and (truncated is None or all(c in parts for c in REQUIRED)):
        rows.append(_row(reader, url, key, parts, hash_images))
    return rows, truncated


def _row(reader, url: str, key: str, parts: dict, hash_images: bool) -> tuple:
    missing = [c for c in REQUIRED if c not in parts]
    if missing:
        raise BankError(f"{url}: sample {key} has no {', '.join(missing)} component: "
                        f"not an instance shard (components {sorted(parts)})")
    meta = json.loads(reader.read(*parts["json"]))
    if meta.get("schema") != INSTANCE_SCHEMA:
        raise BankError(f"{url}: sample {key} has schema {meta.get('schema')!r}, "
                        f"expected {INSTANCE_SCHEMA!r}: not an instance shard")
    (jpg_offset, jpg_size), (mask_offset, mask_size) = parts["jpg"], parts["mask.png"]
    score = meta.get("clip_score")
    dhash = dhash64(reader.read(jpg_offset, jpg_size)) if hash_images else 0
    return (jpg_offset // BLOCK, jpg_size, mask_offset // BLOCK, mask_size, meta["category_id"],
            meta["width"], meta["height"], math.nan if score is None else score, dhash)


def _members(reader) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, data size) of every regular file whose data lies whole in the file.

    Handles ustar prefixes, GNU long names and pax `path`/`size` records. Raises _Truncated when
    the file ends (or turns to garbage) before the end-of-archive marker.
    """
    offset, end = 0, reader.size
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = reader.read(offset, BLOCK)
        if len(header) < BLOCK:
            raise _Truncated(f"file ends at byte {end} before the end-of-archive marker"
                             if not header else f"header at byte {offset} cut short")
        if header == ZERO_BLOCK:
            return
        name, size, kind = _parse_header(header, offset)
        data = offset + BLOCK
        size = int(pax.get("size", size))
        if data + size > end:
            raise _Truncated(f"member {name} at byte {offset} needs {size} bytes, "
                             f"the file ends after {end - data}")
        if kind == b"L":
            long_name = reader.read(data, size).rstrip(b"\0").decode()
        elif kind == b"x":
            pax = _parse_pax(reader.read(data, size))
        elif kind in _REGULAR_FILE:
            yield pax.get("path") or long_name or name, data, size
        if kind not in (b"L", b"x", b"g"):
            long_name, pax = None, {}
        offset = data + (size + BLOCK - 1) // BLOCK * BLOCK


def _parse_header(header: bytes, offset: int) -> tuple[str, int, bytes]:
    stored = header[148:156].rstrip(b"\0 ")
    computed = sum(header[:148]) + 256 + sum(header[156:])
    if not stored or int(stored, 8) != computed:
        raise _Truncated(f"bad tar header checksum at byte {offset}")
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace"), _parse_size(header[124:136]), header[156:157]


def _parse_size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b"\0 ") or b"0", 8)


def _parse_pax(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "replace")
        pos += length
    return records


class _LocalReader:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class _RemoteReader:
    """A buffered fsspec file: header walks over object stores read ahead instead of one
    request per header."""

    def __init__(self, url: str):
        self.file = urls.open_url(url, "rb")
        self.size = self.file.size

    def read(self, offset: int, size: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(size)

    def close(self) -> None:
        self.file.close()


def _open_reader(url: str):
    try:
        return _RemoteReader(url) if urls.is_remote(url) else _LocalReader(urls.local_path(url))
    except FileNotFoundError:
        raise BankError(f"shard {url} not found") from None
