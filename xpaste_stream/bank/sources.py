"""Shard files as the bank sees them: an identity (size, mtime) and ranged reads.

Local and NFS paths are read with `os.pread` (no seek state, safe to share between threads).
fsspec URLs (s3://, gs://, memory://, ...) are read with `fs.cat_file(path, start, end)`, one
ranged request per read; their identity is the size plus the ETag when the store reports one.
"""

from __future__ import annotations

import os

from .. import remote, urls
from .layout import BankError


def normalise(url: str) -> str:
    """Local paths become absolute, so a bank works from any working directory."""
    return url if urls.is_remote(url) else os.path.abspath(urls.local_path(url))


def identity(url: str) -> dict:
    """What must stay equal for the bank's offsets into a shard to remain valid."""
    if urls.is_remote(url):
        info = _remote_info(url)
        return {"path": url, "size": int(info["size"]), "mtime_ns": None, "etag": _etag(info)}
    try:
        st = os.stat(url)
    except FileNotFoundError:
        raise BankError(f"shard {url} not found") from None
    return {"path": url, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "etag": None}


def same_identity(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("path", "size", "mtime_ns", "etag"))


def check_unchanged(entry: dict, found: dict) -> None:
    """Raise naming the shard when it no longer is the file the bank indexed. A relocated shard
    (moved or copied: a copy has a new mtime and, across stores, a new ETag) is checked by size."""
    if entry.get("relocated_from"):
        if entry["size"] == found["size"]:
            return
        raise BankError(f"shard {entry['path']} (indexed as {entry['relocated_from']}) has "
                        f"{found['size']} bytes, the bank indexed {entry['size']}: not the same "
                        "shard; rebuild the bank with `xpaste-stream index`")
    if same_identity(entry, found):
        return
    changes = ", ".join(f"{k} {entry.get(k)} -> {found.get(k)}" for k in ("size", "mtime_ns", "etag")
                        if entry.get(k) != found.get(k))
    raise BankError(f"shard {entry['path']} changed since the bank was indexed ({changes}); "
                    "rebuild the bank with `xpaste-stream index`")


def common_folder(paths: list[str]) -> str:
    """The deepest folder (or URL prefix) holding every path."""
    parts = [p.split("/")[:-1] for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if any(x != level[0] for x in level):
            break
        common.append(level[0])
    return "/".join(common)


def locate_shards(bank_dir: str, manifest: dict, shard_root: str | None) -> list[dict]:
    """The manifest's shard entries with `path` where each shard is now (see
    `InstanceBank.open`); a moved entry keeps its indexed path in `relocated_from`."""
    entries = manifest["shards"]
    if not entries:
        return entries
    root = manifest.get("shard_root") or common_folder([e["path"] for e in entries])
    located = []
    for e in entries:
        rel = e["path"][len(root):].lstrip("/") if e["path"].startswith(root) else os.path.basename(e["path"])
        if shard_root is not None:
            where = shard_root.rstrip("/") + "/" + rel
        elif urls.is_remote(e["path"]) or os.path.exists(e["path"]) or "bank_relpath" not in e:
            where = e["path"]
        else:  # bank and shards moved together
            where = os.path.normpath(os.path.join(bank_dir, e["bank_relpath"]))
        if not urls.is_remote(where):
            where = os.path.abspath(urls.local_path(where))
        located.append(e if where == e["path"] else {**e, "path": where, "relocated_from": e["path"]})
    return located


def _remote_info(url: str) -> dict:
    fs, path = urls.filesystem(url)
    try:
        return fs.info(path)
    except FileNotFoundError:
        raise BankError(f"shard {url} not found") from None


def _etag(info: dict) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "md5"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


class LocalFile:
    """A shard opened for `pread`; checked against its manifest entry when opened."""

    def __init__(self, entry: dict):
        try:
            self.fd = os.open(entry["path"], os.O_RDONLY)
        except FileNotFoundError:
            raise BankError(f"shard {entry['path']} vanished since the bank was indexed; "
                            "rebuild the bank with `xpaste-stream index`") from None
        st = os.fstat(self.fd)
        found = {"path": entry["path"], "size": st.st_size, "mtime_ns": st.st_mtime_ns, "etag": None}
        try:
            check_unchanged(entry, found)
        except BankError:
            self.close()
            raise

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RemoteFile:
    """A shard on an fsspec filesystem, read by ranged requests through a bounded cache."""

    def __init__(self, entry: dict):
        self.url = entry["path"]
        self.fs, self.path = urls.filesystem(entry["path"])
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise BankError(f"shard {entry['path']} vanished since the bank was indexed; "
                            "rebuild the bank with `xpaste-stream index`") from None
        found = {"path": entry["path"], "size": int(info["size"]), "mtime_ns": None, "etag": _etag(info)}
        check_unchanged(entry, found)

    def read(self, offset: int, size: int) -> bytes:
        """Through the process's bounded block cache, with retries (remote.py)."""
        return remote.read_range(self.url, offset, size)

    def close(self) -> None:
        pass


def open_shard(entry: dict) -> LocalFile | RemoteFile:
    return RemoteFile(entry) if urls.is_remote(entry["path"]) else LocalFile(entry)


def check_shards_present(entries: list[dict], bank: str = "bank", shown: int = 5) -> None:
    """Stat every shard a bank reads (before the first batch, not at the first draw that
    needs one): BankError naming the missing or changed ones, with how many there are."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(entry: dict) -> str | None:
        try:
            check_unchanged(entry, identity(entry["path"]))
        except BankError as e:
            return str(e).split(";")[0]
        except OSError as e:
            return f"shard {entry['path']}: {type(e).__name__}: {e}"
        return None

    with ThreadPoolExecutor(8) as pool:  # remote stats overlap their latency
        problems = [p for p in pool.map(problem, entries) if p]
    if problems:
        more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
        raise BankError(f"instance bank {bank}: {len(problems)} of its {len(entries)} shards cannot "
                        f"be read as indexed: {'; '.join(problems[:shown])}{more}; restore them, or "
                        "rebuild the bank with `xpaste-stream index`")
