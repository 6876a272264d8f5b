"""Shard writing and reading shared by every stage.

`ShardWriter` cuts a deterministic stream of inputs into plain-tar shards:
- each shard is written under a temporary name and renamed when complete;
- a DALI index (`wds2idx` format v1.2) is written beside it, so DALI's reader can shard by rank;
- a stats JSON is written last: a shard whose stats exist is done. Stats record the range of
  input positions the shard covers, so a rerun resumes at the first input no finished shard
  covers and rewrites the partial shard from scratch (no duplicates, no gaps).

`iter_tar` reads shards back tolerantly: a truncated or corrupt shard yields its whole samples
and reports the damage instead of raising mid-epoch.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import urls
from .formats import STATS_SCHEMA, check_key

_MAX_LISTED_FAILURES = 100


def shard_name(pattern: str, index: int) -> str:
    """Name of shard `index` under a pattern with `{shard:06d}`-style or `%06d` placeholder."""
    if "{shard" in pattern:
        return pattern.format(shard=index)
    if re.search(r"%0?\d*d", pattern):
        return pattern % index
    raise ValueError(f"output pattern {pattern!r} needs a shard-number placeholder such as "
                     "'{shard:06d}' or '%06d', or a brace range such as '{000000..000099}'")


class ShardNames:
    """Shard names from a printf/format pattern (unbounded) or a brace range (a fixed list)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.fixed: list[str] | None = None
        if re.search(r"\{\d+\.\.\d+\}", pattern):
            self.fixed = urls.expand(pattern)
        else:
            shard_name(pattern, 0)  # validate early

    def __getitem__(self, index: int) -> str:
        if self.fixed is None:
            return shard_name(self.pattern, index)
        if index >= len(self.fixed):
            raise ValueError(f"output pattern {self.pattern!r} names only {len(self.fixed)} "
                             "shards; widen the brace range or raise maxcount")
        return self.fixed[index]


def stats_path(shard: str) -> str:
    return _stem(shard) + ".stats.json"


def dali_index_path(shard: str) -> str:
    return _stem(shard) + ".idx"


def _stem(shard: str) -> str:
    return shard[:-4] if shard.endswith(".tar") else shard


def read_stats(shard: str) -> dict | None:
    path = stats_path(shard)
    if not urls.exists(path):
        return None
    with urls.open_url(path, "rb") as f:
        return json.loads(f.read())


@dataclass
class _OpenShard:
    index: int
    name: str
    input_start: int
    buf: io.BytesIO = field(default_factory=io.BytesIO)
    tar: tarfile.TarFile | None = None
    count: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failed_samples: list[dict] = field(default_factory=list)
    index_lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)


class ShardWriter:
    """Writes samples (dicts of `__key__` and component bytes) into resumable shards.

    Inputs are numbered by the caller in a deterministic order. Call `resume()` first and skip
    inputs below the position it returns; then `add(i, sample)` or `fail(i, reason, detail)`
    for every later input, and `close()` at the end.
    """

    def __init__(self, pattern: str, *, maxcount: int = 1000, maxsize: int = 1 << 30,
                 dali_index: bool = True):
        if maxcount < 1 or maxsize < 1:
            raise ValueError(f"maxcount ({maxcount}) and maxsize ({maxsize}) must be positive")
        self.names = ShardNames(pattern)
        self.maxcount, self.maxsize, self.dali_index = maxcount, maxsize, dali_index
        self.next_shard = 0
        self.next_input = 0
        self.done: list[dict] = []
        self._open: _OpenShard | None = None
        self._resumed = False

    # -- resume ----------------------------------------------------------------------------

    def resume(self) -> int:
        """Skip finished shards; return the first input position still to be written."""
        while True:
            name = self.names[self.next_shard] if self._has_name(self.next_shard) else None
            stats = read_stats(name) if name else None
            if stats is None:
                break
            self.done.append(stats)
            self.next_input = stats["input_end"]
            self.next_shard += 1
        if name:  # a partial shard from an interrupted run: rewritten from its first input
            for leftover in (name + ".tmp", name):
                urls.remove(leftover)
        self._resumed = True
        return self.next_input

    def _has_name(self, index: int) -> bool:
        return self.names.fixed is None or index < len(self.names.fixed)

    # -- writing ---------------------------------------------------------------------------

    def _current(self, position: int) -> _OpenShard:
        if not self._resumed:
            raise RuntimeError("call ShardWriter.resume() before writing")
        if position < self.next_input:
            raise ValueError(f"input {position} is before the resume point {self.next_input}")
        if self._open is None:
            name = self.names[self.next_shard]
            self._open = _OpenShard(self.next_shard, name, position)
            self._open.tar = tarfile.open(fileobj=self._open.buf, mode="w",
                                          format=tarfile.USTAR_FORMAT)
        return self._open

    def add(self, position: int, sample: dict) -> None:
        key = check_key(sample["__key__"])
        parts = [(k, v) for k, v in sample.items() if not k.startswith("__")]
        size = sum(len(v) + 1024 for _, v in parts)
        if self._open is not None and self._open.count and \
                self._open.buf.tell() + size > self.maxsize:
            self._finish()
        shard = self._current(position)
        line = []
        for ext, data in parts:
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"{key}.{ext}: component must be bytes, got {type(data).__name__}")
            member = f"{key}.{ext}"
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            shard.tar.addfile(info, io.BytesIO(data))
            data_offset = shard.tar.offset - _padded(len(data))
            line.append(f"{ext} {data_offset} {len(data)} {member}")
        shard.index_lines.append(" ".join(line))
        shard.count += 1
        self.next_input = position + 1
        if shard.count >= self.maxcount:
            self._finish()

    def fail(self, position: int, reason: str, detail: str = "") -> None:
        """Count an input that could not be turned into a sample; the run goes on."""
        shard = self._current(position)
        shard.failures[reason] = shard.failures.get(reason, 0) + 1
        if len(shard.failed_samples) < _MAX_LISTED_FAILURES:
            shard.failed_samples.append({"input": position, "reason": reason, "detail": detail})
        self.next_input = position + 1

    def close(self) -> dict:
        """Finish the last shard; return totals over all shards of this output (resumed too)."""
        if self._open is not None:
            self._finish()
        return summarize(self.done)

    def _finish(self) -> None:
        shard, self._open = self._open, None
        shard.tar.close()
        data = shard.buf.getvalue()
        name = shard.name
        if shard.count:
            urls.write_bytes(name, data)
            if self.dali_index:
                idx = f"v1.2 {shard.count}\n" + "\n".join(shard.index_lines) + "\n"
                urls.write_bytes(dali_index_path(name), idx.encode())
        stats = {"schema": STATS_SCHEMA, "shard": name if shard.count else None,
                 "shard_index": shard.index, "count": shard.count, "bytes": len(data) if shard.count else 0,
                 "failures": shard.failures, "failed_samples": shard.failed_samples,
                 "input_start": shard.input_start, "input_end": self.next_input,
                 "seconds": round(time.time() - shard.started, 3),
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        urls.write_bytes(stats_path(name), json.dumps(stats, indent=1).encode())
        self.done.append(stats)
        self.next_shard += 1


def write_samples(pattern: str, samples, maxcount: int = 1000) -> list[str]:
    """Write an in-memory sequence of samples as a shard set; returns the shards written."""
    writer = ShardWriter(pattern, maxcount=maxcount)
    start = writer.resume()
    for position, sample in enumerate(samples):
        if position >= start:
            writer.add(position, sample)
    writer.close()
    return [s["shard"] for s in writer.done if s["shard"]]


def _padded(n: int) -> int:
    return (n + 511) // 512 * 512


def summarize(stats: list[dict]) -> dict:
    failures: dict[str, int] = {}
    for s in stats:
        for reason, n in s["failures"].items():
            failures[reason] = failures.get(reason, 0) + n
    return {"shards": sum(1 for s in stats if s["count"]), "samples": sum(s["count"] for s in stats),
            "failed": sum(failures.values()), "failures": failures,
            "bytes": sum(s["bytes"] for s in stats), "seconds": round(sum(s["seconds"] for s in stats), 3)}


# -- reading -----------------------------------------------------------------------------


@dataclass
class TarDamage:
    """What went wrong reading one shard; `samples` whole samples were read before it."""

    shard: str
    error: str
    samples: int


def iter_tar(url: str, damage: list[TarDamage] | None = None) -> Iterator[dict]:
    """Samples of one shard as dicts (`__key__`, `__url__`, component bytes).

    Members are grouped by key (text before the first dot of the base name). A truncated or
    unreadable shard ends early: the damage is appended to `damage` (or raised if None) and the
    incomplete last sample is dropped.
    """
    count = 0
    current: dict | None = None
    end = 0  # where the last member's data (padded) ends: the end-of-archive block must follow
    try:
        with urls.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                end = member.offset_data + _padded(member.size)
                if current is None or current["__key__"] != key:
                    if current is not None:
                        count += 1
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
        if current is not None and not _ends_archive(url, end):
            raise tarfile.ReadError(f"no end-of-archive block after byte {end} (file cut short)")
    except (tarfile.TarError, OSError, EOFError) as e:
        current = None
        err = TarDamage(url, f"{type(e).__name__}: {e}", count)
        if damage is None:
            raise ValueError(f"{url}: damaged shard after {count} samples ({err.error})") from e
        damage.append(err)
    if current is not None:
        yield current


def _ends_archive(url: str, offset: int) -> bool:
    """A whole tar has a zero block where its members end; a cut one has nothing there."""
    with urls.open_url(url, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not any(block)
