"""The on-disk layout of an instance bank: column names and dtypes, the manifest, BankError.

A bank is a folder:
- `manifest.json`: schema "xpaste.bank/1", counts, the shard table (path, size, mtime_ns,
  instances, truncation) and the column dtypes;
- one `.npy` file per column, one row per instance, memory-mapped when the bank is opened;
- `categories.npy` + `category_starts.npy`: the sampling ranges (instances are sorted by
  category, so the ids of category `categories[i]` are `category_starts[i]:category_starts[i+1]`);
- `stats.json`: a human-readable summary of the last build.

Tar data always starts on a 512-byte block, so offsets are stored as block numbers in uint32
(shards up to 2 TiB); that keeps a row at 30 bytes (38 with the dedup hash column).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..formats import FormatError

BANK_SCHEMA = "xpaste.bank/1"
MANIFEST = "manifest.json"
STATS = "stats.json"
BLOCK = 512

# One row per instance, in bank order (see build.py for the order).
COLUMNS = {
    "shard": np.uint32,       # index into the manifest's shard table
    "jpg_block": np.uint32,   # data offset of the jpg member / 512
    "jpg_size": np.uint32,    # bytes
    "mask_block": np.uint32,  # data offset of the mask.lz4 (or /1: mask.png) member / 512
    "mask_size": np.uint32,
    "category": np.int32,
    "width": np.uint16,
    "height": np.uint16,
    "clip_score": np.float16,  # NaN when the instance has no score
}
HASH_COLUMN = "dhash"  # uint64 perceptual hash of the jpg, present only in banks built with dedup
CATEGORY_FILES = ("categories", "category_starts")


class BankError(FormatError):
    """A bank is missing, malformed or out of date with its shards, or a request cannot be met.

    It subclasses FormatError so the command line reports it as a plain error message.
    """


def column_path(bank: str, name: str) -> str:
    return os.path.join(bank, name + ".npy")


def read_manifest(bank: str) -> dict:
    path = os.path.join(bank, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise BankError(f"{bank}: not an instance bank (no {MANIFEST}); build one with "
                        "`xpaste-stream index SHARDS -o BANK`") from None
    except json.JSONDecodeError as e:
        raise BankError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("schema") != BANK_SCHEMA:
        raise BankError(f"{path}: schema {manifest.get('schema')!r}, expected {BANK_SCHEMA!r}")
    return manifest


def write_json(path: str, obj: dict) -> None:
    """Write JSON under a temporary name and rename, so readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_array(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)


def bank_bytes(bank: str) -> int:
    """Bytes of the bank's index (columns, category ranges, manifest, stats): files a user put
    in the folder (a plot, notes) are not the bank's size."""
    names = {MANIFEST, STATS, *(n + ".npy" for n in (*COLUMNS, HASH_COLUMN, *CATEGORY_FILES))}
    return sum(os.path.getsize(os.path.join(bank, n)) for n in names
               if os.path.isfile(os.path.join(bank, n)))
