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


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds of every object-store request:
    XPASTE_REMOTE_CONNECT_TIMEOUT_S (10), XPASTE_REMOTE_READ_TIMEOUT_S (20)."""
    return (_env_float("XPASTE_REMOTE_CONNECT_TIMEOUT_S", 10.0),
            _env_float("XPASTE_REMOTE_READ_TIMEOUT_S", 20.0))


def fs_options(url: str, own_retries: bool = False) -> dict:
    """Storage options the filesystem of `url` is made with. For S3: connect and read timeouts
    (so a store that accepts the connection and then stays silent ends a request instead of
    holding it forever) and botocore's own retries off (s3fs retries timeouts and dropped
    connections itself, 5 attempts). `own_retries`: for a caller whose loop retries (remote.py),
    a filesystem instance of its own (s3fs then makes one attempt: see `filesystem`). Settings
    the user gave in fsspec's config win."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    import fsspec.config

    connect, read = timeouts()
    config = {"connect_timeout": connect, "read_timeout": read,
              "retries": {"total_max_attempts": 1, "mode": "standard"},
              **fsspec.config.conf.get("s3", {}).get("config_kwargs", {})}
    if own_retries:
        config["user_agent_extra"] = "xpaste-stream-block-cache"
    return {"config_kwargs": config}


def filesystem(url: str, own_retries: bool = False):
    """(fsspec filesystem, path) of a remote `url`, with `fs_options`; with `own_retries`,
    s3fs makes one attempt per request (the caller retries)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **fs_options(url, own_retries))
    if own_retries and hasattr(fs, "retries"):
        fs.retries = 1
    return fs, path


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

                fs, _, paths = fsspec.get_fs_token_paths(url, storage_options=fs_options(url))
                out.extend(fs.unstrip_protocol(p) for p in sorted(paths))
            else:
                out.append(url)
    seen: set[str] = set()
    return [u for u in out if not (u in seen or seen.add(u))]


def open_url(url: str, mode: str = "rb") -> IO:
    if is_remote(url):
        import fsspec

        return fsspec.open(url, mode, **fs_options(url)).open()
    return open(local_path(url), mode)


def exists(url: str) -> bool:
    if is_remote(url):
        fs, path = filesystem(url)
        return fs.exists(path)
    return os.path.exists(local_path(url))


def makedirs(url: str) -> None:
    """Create the folder a file URL will be written into."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    else:
        d = os.path.dirname(local_path(url))
        if d:
            os.makedirs(d, exist_ok=True)


def rename(src: str, dst: str) -> None:
    """Atomic on local filesystems; copy-then-delete on object stores (which have no rename)."""
    if is_remote(src):
        fs, spath = filesystem(src)
        _, dpath = filesystem(dst)
        fs.mv(spath, dpath)
    else:
        os.replace(local_path(src), local_path(dst))


def remove(url: str) -> None:
    if is_remote(url):
        fs, path = filesystem(url)
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


# pseudo filesystems: writable-looking to `os.access`, but never a place for shards
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")


def output_problem(folder: str) -> str | None:
    """Why files cannot be written into local folder `folder` (created as needed), or None:
    a part of its path is a regular file, it lies under /proc, /sys or /dev, or the nearest
    folder that exists is not writable. Object-store locations are checked by
    `remote.check_location`."""
    if is_remote(folder):
        return None
    path = os.path.abspath(local_path(folder) or ".")
    real = os.path.realpath(path)
    for root in _PSEUDO_ROOTS:
        if real == root or real.startswith(root + "/"):
            return f"{folder} lies under {root}, a pseudo filesystem"
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{folder} lies under {probe}, which is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{folder}: {probe} is not writable by this user"
    return None
