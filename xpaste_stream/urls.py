"""Locations of shards: local paths, brace patterns and fsspec URLs (s3://, gs://, ...).

Reading and writing go through Python file objects (local `open` or fsspec); no shell `pipe:`
command is ever built from a user-supplied string.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from typing import IO

import braceexpand


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand(patterns: str | Iterable[str]) -> list[str]:
    """Brace-expand and (for local paths) glob each pattern, keeping order, dropping repeats.

    A pattern that names nothing that exists is kept as is, so the caller reports it missing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if not is_remote(url) and glob.has_magic(url):
                out.extend(sorted(glob.glob(local_path(url))))
            elif is_remote(url) and glob.has_magic(url):
                import fsspec

                fs, _, paths = fsspec.get_fs_token_paths(url)
                out.extend(fs.unstrip_protocol(p) for p in sorted(paths))
            else:
                out.append(url)
    seen: set[str] = set()
    return [u for u in out if not (u in seen or seen.add(u))]


def open_url(url: str, mode: str = "rb") -> IO:
    if is_remote(url):
        import fsspec

        return fsspec.open(url, mode).open()
    return open(local_path(url), mode)


def exists(url: str) -> bool:
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    return os.path.exists(local_path(url))


def makedirs(url: str) -> None:
    """Create the folder a file URL will be written into."""
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    else:
        d = os.path.dirname(local_path(url))
        if d:
            os.makedirs(d, exist_ok=True)


def rename(src: str, dst: str) -> None:
    """Atomic on local filesystems; copy-then-delete on object stores (which have no rename)."""
    if is_remote(src):
        import fsspec

        fs, spath = fsspec.core.url_to_fs(src)
        _, dpath = fsspec.core.url_to_fs(dst)
        fs.mv(spath, dpath)
    else:
        os.replace(local_path(src), local_path(dst))


def remove(url: str) -> None:
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path)
    elif os.path.exists(local_path(url)):
        os.remove(local_path(url))


def write_bytes(url: str, data: bytes) -> None:
    """Write a small file atomically (temporary name, then rename)."""
    makedirs(url)
    tmp = url + ".tmp"
    with open_url(tmp, "wb") as f:
        f.write(data)
    rename(tmp, url)


def sidecar_path(pattern: str, suffix: str) -> str:
    """The file one shard set keeps beside its shards: `out/gen-{shard:06d}.tar` with suffix
    `manifest.json` -> `out/gen-manifest.json` (the pattern's stem before its shard field)."""
    folder, _, base = pattern.rpartition("/")
    cut = min([i for i in (base.find("{"), base.find("%")) if i >= 0], default=len(base))
    stem = base[:cut].rstrip("-_.")
    if stem.endswith(".tar"):
        stem = stem[:-4]
    name = f"{stem}-{suffix}" if stem else suffix
    return f"{folder}/{name}" if folder else name
