"""Ranged reads of shards on object storage: a bounded block cache and retries with backoff.

The loader (backgrounds) and the bank (instances) read small members of remote shards by
(offset, size). Each read goes through `read_range`: the file is read in aligned blocks of
`block_size` bytes (one request brings the neighbours of a member too: read-ahead), kept in
a per-process LRU cache bounded by `cache_bytes` (least recently used blocks evicted first),
and a request that fails with a transient error (connection reset, timeout, a 5xx turned into
OSError by the fsspec backend, botocore's and aiohttp's connection errors: `transient_errors`)
is retried `retries` times with exponential backoff. Every request has connect and read
timeouts (urls.fs_options), so a store that stops answering with the connection open ends in an
OSError naming the URL within (retries + 1) x (connect + read timeout) + backoff; reads from
that bucket then fail at once for `down_s`. Missing files and refused credentials are not
transient: they raise at once.

`check_location` turns a missing bucket or missing credentials into a ConfigError before work.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from . import urls
from .config import ConfigError

NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Every error class a request to an object store raises when the network or the store
    fails for a while: OSError and timeouts, botocore's connection and timeout errors (most
    are not OSError: EndpointConnectionError, ConnectionClosedError), aiohttp's client errors,
    fsspec's timeout."""
    import asyncio

    found: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError, asyncio.TimeoutError]
    try:
        from botocore import exceptions as boto

        found += [boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ReadTimeoutError,
                  boto.ConnectionClosedError, boto.HTTPClientError, boto.ConnectionError]
    except ImportError:
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientError]
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        found += [FSTimeoutError]
    except ImportError:
        pass
    return tuple(found)


def _env_int(name: str, default: int):
    """Read when a config is made (not at import), so worker processes see the setting."""
    return field(default_factory=lambda: int(os.environ.get(name, default)))


@dataclass
class RemoteConfig:
    cache_bytes: int = _env_int("XPASTE_REMOTE_CACHE_BYTES", 512 << 20)
    block_size: int = _env_int("XPASTE_REMOTE_BLOCK_BYTES", 1 << 20)
    retries: int = _env_int("XPASTE_REMOTE_RETRIES", 4)
    backoff_s: float = 0.1  # first wait; doubles per retry
    # after a read failed on every attempt, reads from that bucket fail at once for this long
    # (the loader's substitutes for a background would otherwise each wait out the timeouts)
    down_s: float = field(default_factory=lambda: float(os.environ.get("XPASTE_REMOTE_DOWN_S", 30)))

    def validate(self) -> None:
        if self.block_size < 1 or self.cache_bytes < self.block_size:
            raise ValueError(f"need block_size >= 1 and cache_bytes >= block_size, got "
                             f"{self.block_size} and {self.cache_bytes}")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")


class BlockCache:
    """Blocks of remote files in an LRU bounded by bytes; thread-safe, one per process."""

    def __init__(self, cfg: RemoteConfig | None = None, fs_of=None):
        self.cfg = cfg or RemoteConfig()
        self.cfg.validate()
        self._fs_of = fs_of or _filesystem
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.retried = self.evicted = 0
        self._down: dict[str, tuple[float, str]] = {}  # bucket -> (when it failed, why)
        self._transient = transient_errors()

    def read(self, url: str, offset: int, size: int) -> bytes:
        bs = self.cfg.block_size
        first, last = offset // bs, (offset + max(size, 1) - 1) // bs
        data = b"".join(self._block(url, b) for b in range(first, last + 1))
        start = offset - first * bs
        return data[start:start + size]

    def _block(self, url: str, block: int) -> bytes:
        key = (url, block)
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
                self.hits += 1
                return data
            self.misses += 1
        data = self._fetch(url, block)
        with self._lock:
            if key not in self._blocks:
                self._blocks[key] = data
                self.bytes += len(data)
            while self.bytes > self.cfg.cache_bytes and len(self._blocks) > 1:
                _, old = self._blocks.popitem(last=False)
                self.bytes -= len(old)
                self.evicted += 1
        return data

    def _fetch(self, url: str, block: int) -> bytes:
        """One block, with `retries` retries and backoff on transient errors; each attempt is
        bounded by the connect and read timeouts (urls.fs_options), so a silent store ends in
        an OSError naming the URL after at most (retries + 1) x (connect + read timeout) plus
        the backoff."""
        store = _bucket(url)
        self._fail_if_down(url, store)
        fs, path = self._fs_of(url)
        bs = self.cfg.block_size
        for attempt in range(self.cfg.retries + 1):
            try:
                data = fs.cat_file(path, start=block * bs, end=(block + 1) * bs)
                self._down.pop(store, None)
                return data
            except NOT_TRANSIENT:
                raise
            except self._transient as e:
                if attempt == self.cfg.retries:
                    why = f"{type(e).__name__}: {e}"
                    self._down[store] = (time.monotonic(), why)
                    raise OSError(f"{url}: read of bytes {block * bs}.. failed after "
                                  f"{attempt + 1} attempts ({why})") from e
                self.retried += 1
                time.sleep(self.cfg.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _fail_if_down(self, url: str, store: str) -> None:
        down = self._down.get(store)
        if down is None:
            return
        ago = time.monotonic() - down[0]
        if ago < self.cfg.down_s:
            raise OSError(f"{url}: not read: its store ({store}) stopped answering {ago:.1f} s ago "
                          f"({down[1]}); retried after {self.cfg.down_s:g} s")
        del self._down[store]


def _bucket(url: str) -> str:
    """`s3://bucket/key` -> `s3://bucket`: what a stalled store takes down together."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _filesystem(url: str):
    return urls.filesystem(url, own_retries=True)  # timeouts on; this module's loop retries


_CACHE: dict[int, BlockCache] = {}


def shared_cache() -> BlockCache:
    """This process's cache (a forked or spawned worker builds its own)."""
    pid = os.getpid()
    if pid not in _CACHE:
        _CACHE.clear()
        _CACHE[pid] = BlockCache()
    return _CACHE[pid]


def read_range(url: str, offset: int, size: int) -> bytes:
    """`size` bytes of remote file `url` from `offset`, through the process's block cache."""
    return shared_cache().read(url, offset, size)


def check_location(url: str, what: str = "output") -> None:
    """A remote shard location whose bucket is missing, or that the credentials cannot reach,
    raises ConfigError naming it (before any work)."""
    if not urls.is_remote(url):
        return
    try:
        fs, path = _filesystem(url)
        bucket = path.split("/", 1)[0]
        found = fs.exists(bucket)
    except (PermissionError, ValueError, OSError) as e:
        raise ConfigError(f"{what} {url}: cannot reach its storage ({type(e).__name__}: {e}); "
                          "check the credentials and the endpoint") from None
    except Exception as e:  # noqa: BLE001 - backends raise their own credential errors
        if "credential" in type(e).__name__.lower() or "credential" in str(e).lower():
            raise ConfigError(f"{what} {url}: no credentials for its storage ({e})") from None
        raise
    if not found:
        raise ConfigError(f"{what} {url}: bucket {bucket!r} does not exist (or these credentials "
                          "cannot see it)")
