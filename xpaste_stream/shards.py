"""Shard writing and reading shared by every stage.

`ShardWriter` cuts a deterministic stream of inputs into plain-tar shards:
- each shard is written under a temporary name and renamed when complete;
- a DALI index (`wds2idx` format v1.2) is written beside it, so DALI's reader can shard by rank;
- a stats JSON is written last: a shard whose stats exist is done. Stats record the range of
  input positions the shard covers, so a rerun resumes at the first input no finished shard
  covers and rewrites the partial shard from scratch (no duplicates, no gaps);
- every input it could not deliver is recorded (source, key, reason) in the stats of the shard
  covering it and in the shard set's rejects list (errors.py), rebuilt whole on every run.

`iter_tar` reads shards back tolerantly: a truncated or corrupt shard yields its whole samples
(the last one before the cut too) and reports the damage, naming the samples it lost when the
shard's DALI index lists them. `resolve_inputs` checks input shards before any work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import errors, formats, urls
from .config import ConfigError
from .errors import Reject, RejectsList, StageOutcome
from .formats import STATS_SCHEMA, check_key

_KIND_NAMES = {formats.IMAGE_SCHEMA: "image", formats.BACKGROUND_SCHEMA: "background",
               **dict.fromkeys(formats.INSTANCE_SCHEMAS, "instance")}


def check_output_pattern(pattern: str) -> None:
    """Raise ValueError unless `pattern` names shards (a shard-number field or a brace range)."""
    ShardNames(pattern)


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


# -- one writer per shard set --------------------------------------------------------------

LOCK_SUFFIX = "writer.lock"
_HELD_LOCKS: dict[str, int] = {}  # lock path -> descriptor holding its flock, this process


def lock_path(pattern: str) -> str:
    """`out/gen-{shard:06d}.tar` -> `out/gen-writer.lock`."""
    return urls.sidecar_path(pattern, LOCK_SUFFIX)


def lock_output(pattern: str, stage: str = "write", check_only: bool = False) -> None:
    """Make this process the one writer of shard set `pattern`, before any work: an exclusive
    `flock` on a lock file beside the shards that records the owner (pid, host, start time,
    command). A second writer is refused (ConfigError: exit 2) naming the running one. The
    kernel drops the lock when its owner dies however it dies, so a lock file left behind by a
    killed run is taken over, with a message. Held until `unlock_output` or the process ends;
    taking it again in the same process is a no-op. Object-store outputs have no lock (no
    atomic create-or-fail there): one writer per output is the user's to ensure.
    `check_only`: refuse when another run holds the lock, but create nothing (checks before
    work leave no trace in the output)."""
    if urls.is_remote(pattern):
        return
    path = lock_path(pattern)
    if path in _HELD_LOCKS:
        return
    import fcntl

    if check_only:
        _refuse_if_locked(path, stage, pattern)
        return
    urls.makedirs(path)
    for _ in range(16):  # the file may be removed by its releasing owner between open and flock
        fd = os.open(urls.local_path(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(fd)
            os.close(fd)
            raise ConfigError(f"{stage}: {pattern} is being written by another run ({owner}; lock "
                              f"{path}); wait for it to end or stop it, or write elsewhere") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(urls.local_path(path)).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise ConfigError(f"{stage}: cannot take the lock {path} (it keeps being replaced)")
    previous = _lock_owner(fd)
    if previous != "unknown owner":
        print(f"{stage}: taking over {path}, left by a run that is no longer running "
              f"({previous})", file=sys.stderr)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    _HELD_LOCKS[path] = fd


def _refuse_if_locked(path: str, stage: str, pattern: str) -> None:
    import fcntl

    try:
        fd = os.open(urls.local_path(path), os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"{stage}: {pattern} is being written by another run ({_lock_owner(fd)}; "
                          f"lock {path}); wait for it to end or stop it, or write elsewhere") from None
    finally:
        os.close(fd)


def unlock_output(pattern: str) -> None:
    """Give up this process's lock of shard set `pattern` (if it holds it): the file goes."""
    path = lock_path(pattern)
    fd = _HELD_LOCKS.pop(path, None)
    if fd is None:
        return
    try:
        os.remove(urls.local_path(path))
    except FileNotFoundError:
        pass
    os.close(fd)  # closing drops the flock


def _lock_owner(fd: int) -> str:
    """The owner a lock file records, in words ("pid 12 on host h, generate since T")."""
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"null")
        return (f"pid {doc['pid']} on host {doc['host']}, {doc.get('stage', '?')} since "
                f"{doc.get('started', '?')}: {doc.get('command', '')}".rstrip(": "))
    except (ValueError, TypeError, KeyError):
        return "unknown owner"


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
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_parts: list[dict] = field(default_factory=list)
    index_lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)


class ShardWriter:
    """Writes samples (dicts of `__key__` and component bytes) into resumable shards.

    Inputs are numbered by the caller in a deterministic order. Call `resume()` first and skip
    inputs below the position it returns; then `add(i, sample)` or `fail(i, reason, ...)` for
    every later input, `reject_input` for what has no position (a damaged input shard), and
    `close()` at the end. A shard is also cut after `maxcount` failures, so stats stay small.
    """

    def __init__(self, pattern: str, *, maxcount: int = 1000, maxsize: int = 1 << 30,
                 dali_index: bool = True, rejects: str | None = None, run: str | None = None):
        if maxcount < 1 or maxsize < 1:
            raise ValueError(f"maxcount ({maxcount}) and maxsize ({maxsize}) must be positive")
        self.names = ShardNames(pattern)
        self.maxcount, self.maxsize, self.dali_index = maxcount, maxsize, dali_index
        self.rejects_path = rejects or errors.rejects_path(pattern)
        self.next_shard = 0
        self.next_input = 0
        self.done: list[dict] = []  # stats of finished shards, without their record lists
        self.input_failures: dict[str, int] = {}  # samples lost with no input position
        self.bad_shards = 0
        self._open: _OpenShard | None = None
        self._rejects: RejectsList | _UnitRecords | None = None
        self.run = run  # the run manifest's fingerprint, written into every shard's stats
        self.unit: str | None = None  # set by start_unit: one shard, named by its work unit
        self.unit_damage: list[dict] = []

    # -- resume ----------------------------------------------------------------------------

    def resume(self) -> int:
        """Skip finished shards; return the first input position still to be written."""
        lock_output(self.names.pattern)
        self._rejects = RejectsList(self.rejects_path)
        while True:
            name = self.names[self.next_shard] if self._has_name(self.next_shard) else None
            stats = read_stats(name) if name else None
            if stats is None:
                break
            self._keep(stats, name)
            self.next_input = stats["input_end"]
            self.next_shard += 1
        if name:  # a partial shard from an interrupted run: rewritten from its first input
            for leftover in (name + ".tmp", name):
                urls.remove(leftover)
        return self.next_input

    # -- work units: one unit, one shard -----------------------------------------------------

    def start_unit(self, shard_index: int, input_start: int, unit: str) -> None:
        """Write exactly shard `shard_index` for work unit `unit` (inputs from `input_start`):
        no cutting by count; a partial shard of an interrupted attempt is removed first."""
        self._rejects = _UnitRecords()
        self.unit, self.next_shard, self.next_input = unit, shard_index, input_start
        name = self.names[shard_index]
        for leftover in (name + ".tmp", name, dali_index_path(name)):
            urls.remove(leftover)

    @contextlib.contextmanager
    def writing_unit(self, shard_index: int, input_start: int, unit: str) -> Iterator[ShardWriter]:
        """`start_unit`, then the block: one that raises (Ctrl-C too) leaves no shard without
        stats (`abort_unit`), so the next run redoes the unit."""
        self.start_unit(shard_index, input_start, unit)
        try:
            yield self
        except BaseException:
            self.abort_unit()
            raise

    def finish_unit(self, input_end: int | None = None) -> dict:
        """Finish the unit's shard (stats even when it holds nothing: the unit is done);
        `input_end`: the end of the unit's input range, when its last inputs gave nothing."""
        if self._open is None:
            self._current(self.next_input)
        if input_end is not None:
            self.next_input = max(self.next_input, input_end)
        self._finish()
        return self.done[-1]

    def abort_unit(self) -> None:
        """An interrupted unit leaves no shard without stats (the next run redoes it)."""
        name = self.names[self.next_shard]
        if read_stats(name) is None:
            for leftover in (name + ".tmp", name, dali_index_path(name)):
                urls.remove(leftover)

    def gather(self, shard_indices: list[int]) -> None:
        """Take the finished shards `shard_indices` (units run elsewhere) into this writer's
        totals and its shard set's rejects list, before `close`."""
        self._rejects = RejectsList(self.rejects_path)
        for index in shard_indices:
            name = self.names[index]
            stats = read_stats(name)
            if stats is None:
                raise RuntimeError(f"{name}: unit finished but its stats are missing")
            self._keep(stats, name)

    def _has_name(self, index: int) -> bool:
        return self.names.fixed is None or index < len(self.names.fixed)

    def _keep(self, stats: dict, name: str) -> None:
        """Count a finished shard and put its records into the rejects list."""
        for what, records in (("sample", stats.get("failed_samples", [])),
                              ("part", stats.get("dropped_parts", []))):
            for r in records:
                self._rejects.add(Reject(what, r.get("source") or "", r.get("key"), r["reason"],
                                         r.get("detail", ""), r.get("input"), name))
        for d in stats.get("damaged_inputs", []):
            reject = Reject(d["what"], d["source"], d.get("key"), d["reason"], d.get("detail", ""))
            self._rejects.add(reject)
            if reject.what == "shard":
                self.bad_shards += 1
            else:
                self.input_failures[reject.reason] = self.input_failures.get(reject.reason, 0) + 1
        self.done.append({k: v for k, v in stats.items()
                          if k not in ("failed_samples", "dropped_parts", "damaged_inputs")})

    # -- writing ---------------------------------------------------------------------------

    def _current(self, position: int) -> _OpenShard:
        if self._rejects is None:
            raise RuntimeError("call ShardWriter.resume() before writing")
        if position < self.next_input:
            raise ValueError(f"input {position} is before the resume point {self.next_input}")
        if self._open is None:
            name = self.names[self.next_shard]
            self._open = _OpenShard(self.next_shard, name, position)
            self._open.tar = tarfile.open(fileobj=self._open.buf, mode="w",
                                          format=tarfile.USTAR_FORMAT)
        return self._open

    def add(self, position: int, sample: dict, *, source: str | None = None,
            dropped: list[tuple[str, str]] = ()) -> None:
        """Write one sample; `dropped` lists (reason, detail) of parts left out of it."""
        key = check_key(sample["__key__"])
        parts = [(k, v) for k, v in sample.items() if not k.startswith("__")]
        size = sum(len(v) + 1024 for _, v in parts)
        if self._open is not None and self._open.count and \
                self._open.buf.tell() + size > self.maxsize:
            if self.unit is not None:
                raise ValueError(f"work unit {self.unit}: shard {self._open.name} would pass maxsize "
                                 f"({self.maxsize} bytes); lower maxcount")
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
        for reason, detail in dropped:
            shard.dropped[reason] = shard.dropped.get(reason, 0) + 1
            shard.dropped_parts.append({"input": position, "source": source, "key": key,
                                        "reason": reason, "detail": detail})
        shard.count += 1
        self.next_input = position + 1
        if shard.count >= self.maxcount and self.unit is None:
            self._finish()

    def fail(self, position: int, reason: str, detail: str = "", *, source: str | None = None,
             key: str | None = None) -> None:
        """Count an input that could not be turned into a sample; the run goes on."""
        shard = self._current(position)
        shard.failures[reason] = shard.failures.get(reason, 0) + 1
        shard.failed_samples.append({"input": position, "source": source, "key": key,
                                     "reason": reason, "detail": detail})
        self.next_input = position + 1
        if len(shard.failed_samples) >= self.maxcount and self.unit is None:
            self._finish()

    def reject_input(self, reject: Reject) -> None:
        """Record what the reader lost without an input position: a bad shard, its lost samples."""
        if self._rejects is None:
            raise RuntimeError("call ShardWriter.resume() before writing")
        if self.unit is not None:  # kept in the unit's stats; the driver lists them
            self.unit_damage.append({"what": reject.what, "source": reject.source, "key": reject.key,
                                     "reason": reject.reason, "detail": reject.detail})
            return
        self._rejects.add(reject)
        if reject.what == "shard":
            self.bad_shards += 1
        else:
            self.input_failures[reject.reason] = self.input_failures.get(reject.reason, 0) + 1

    def reject_damage(self, damage: TarDamage) -> None:
        """A damaged input shard and the samples it lost (named when its index lists them)."""
        self.reject_input(damage.as_reject())
        for key in damage.lost_keys:
            self.reject_input(Reject("sample", damage.shard, key, "truncated",
                                     "lost where the shard is cut short"))
        unnamed = (damage.lost or 0) - len(damage.lost_keys)
        for _ in range(max(0, unnamed)):
            self.reject_input(Reject("sample", damage.shard, None, "truncated",
                                     "lost where the shard is cut short (key unknown: no .idx)"))

    def close(self) -> dict:
        """Finish the last shard; return totals over all shards of this output (resumed too)."""
        if self._open is not None:
            self._finish()
        summary = summarize(self.done)
        for reason, n in self.input_failures.items():
            summary["failures"][reason] = summary["failures"].get(reason, 0) + n
            summary["failed"] += n
        summary["bad_input_shards"] = self.bad_shards
        self.first_rejects = self._rejects.first if self._rejects else []
        summary["rejects"] = self._rejects.close() if self._rejects else None
        self._rejects = None
        unlock_output(self.names.pattern)
        return summary

    def outcome(self, stage: str, summary: dict) -> StageOutcome:
        """The facts of this run for the error policy (call after `close`)."""
        return StageOutcome(stage, summary["samples"], summary["failed"], dict(summary["failures"]),
                            dict(summary.get("dropped", {})), summary["bad_input_shards"],
                            list(self.first_rejects), summary["rejects"])

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
                 "dropped": shard.dropped, "dropped_parts": shard.dropped_parts,
                 "input_start": shard.input_start, "input_end": self.next_input,
                 "seconds": round(time.time() - shard.started, 3),
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.run is not None:
            stats["run"] = self.run
        if self.unit is not None:
            stats["unit"], stats["damaged_inputs"] = self.unit, self.unit_damage
        urls.write_bytes(stats_path(name), json.dumps(stats, indent=1).encode())
        self._keep(stats, name)
        self.next_shard += 1


def gather_units(stage: str, pattern: str, shards: list[int], *, maxcount: int, maxsize: int,
                 run: str) -> tuple[dict, ShardWriter]:
    """Once a unit stage's units ran (wherever): the totals over its finished shards `shards`,
    the shard set's rejects list rebuilt, the lock released, and the outcome recorded for the
    error policy; the writer comes back for its shard names."""
    writer = ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, run=run)
    writer.gather(shards)
    summary = writer.close()
    errors.record(writer.outcome(stage, summary))
    return summary, writer


def unit_finished(pattern: str, unit: str, shard: int, run: str) -> bool:
    """A work unit is done when its shard's stats exist; ConfigError when they name another
    unit or run (the output mixes runs)."""
    name = ShardNames(pattern)[shard]
    stats = read_stats(name)
    if stats is None:
        return False
    if stats.get("unit") != unit or stats.get("run") != run:
        raise ConfigError(f"{stats_path(name)} names unit {stats.get('unit')!r} of run "
                          f"{stats.get('run')!r}, expected unit {unit!r} of run {run!r}: the output "
                          "mixes runs; rerun with --overwrite to start over, or write elsewhere")
    return True


class _UnitRecords:
    """A unit's records live in its shard's stats; `gather` lists them for the shard set."""

    first: list = []

    def add(self, reject: Reject) -> None:
        pass

    def close(self) -> None:
        return None


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
    dropped: dict[str, int] = {}
    for s in stats:
        for reason, n in s["failures"].items():
            failures[reason] = failures.get(reason, 0) + n
        for reason, n in s.get("dropped", {}).items():
            dropped[reason] = dropped.get(reason, 0) + n
    return {"shards": sum(1 for s in stats if s["count"]), "samples": sum(s["count"] for s in stats),
            "failed": sum(failures.values()), "failures": failures, "dropped": dropped,
            "bytes": sum(s["bytes"] for s in stats), "seconds": round(sum(s["seconds"] for s in stats), 3)}


# -- reading -----------------------------------------------------------------------------


@dataclass
class TarDamage:
    """What went wrong reading one shard; `samples` whole samples were read before it.

    `lost_keys`: the samples known lost (the one cut, and those after it when the shard's DALI
    index lists them); `lost`: how many were lost, when the index or the stats tell (else None).
    """

    shard: str
    error: str
    samples: int
    lost_keys: list[str] = field(default_factory=list)
    lost: int | None = None
    reason: str = "truncated_shard"  # or "unreadable_shard": not one member could be read

    def as_reject(self) -> Reject:
        lost = "unknown" if self.lost is None else self.lost
        return Reject("shard", self.shard, None, self.reason,
                      f"{self.error}; {self.samples} whole samples read, {lost} lost")


def iter_tar(url: str, damage: list[TarDamage] | None = None,
             complete: Callable[[dict], bool] | None = None) -> Iterator[dict]:
    """Samples of one shard as dicts (`__key__`, `__url__`, component bytes).

    Members are grouped by key (text before the first dot of the base name). A truncated or
    unreadable shard ends early: the damage is appended to `damage` (or raised if None). The
    sample read when the shard ends is yielded when it is whole: `complete(sample)` says so, or
    else it has every component its predecessor had.
    """
    count = 0
    current: dict | None = None
    template: set[str] | None = None
    members = 0
    end = 0  # where the last member's data (padded) ends: the end-of-archive block must follow
    try:
        with urls.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                members += 1
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        count += 1
                        template = _components(current)
                        yield current
                    current = {"__key__": key, "__url__": url}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                end = member.offset_data + _padded(member.size)
                current[ext] = data
        if current is not None and not _ends_archive(url, end):
            raise tarfile.ReadError(f"no end-of-archive block after byte {end} (file cut short)")
    except (tarfile.TarError, OSError, EOFError, *_transient()) as e:
        last = current
        current = None
        whole = last is not None and (complete(last) if complete is not None else
                                      template is not None and _components(last) >= template)
        if whole:
            count += 1
        err = TarDamage(url, f"{type(e).__name__}: {e}", count,
                        *lost_samples(url, count, None if whole or last is None else last["__key__"]),
                        reason="truncated_shard" if members else "unreadable_shard")
        if damage is None:
            raise ValueError(f"{url}: damaged shard after {count} samples ({err.error})") from e
        damage.append(err)
        if whole:
            yield last
    if current is not None:
        yield current


def iter_indexed(url: str, max_bytes: int = 1 << 30) -> Iterator[dict] | None:
    """Samples of one shard read through its DALI index: one read of the file, each member
    sliced at its indexed offset, no tar headers parsed (the report's read of a 20k-instance
    bank: ~0.23 ms CPU per instance through tarfile, the most of it parsing headers). None when
    that is not safe, and the caller reads with `iter_tar` (which names any damage): no index,
    a stale one, a file cut short, or a file over `max_bytes`."""
    text = read_dali_index(url)
    if text is None or not text.startswith("v1.") or stale_index(url, text) is not None:
        return None
    try:
        entries = _index_samples(text)
    except ValueError:
        return None
    with urls.open_url(url, "rb") as f:
        if f.seek(0, io.SEEK_END) > max_bytes:
            return None
        f.seek(0)
        data = f.read()
    ends = [offset + _padded(size) for sample in entries for _, offset, size, _ in sample]
    end = max(ends, default=0)
    if end > len(data) or len(data) < end + 512 or any(data[end:end + 512]):
        return None                    # cut short (no end-of-archive block where members end)

    def samples() -> Iterator[dict]:
        for sample in entries:
            if not sample:
                continue
            out = {"__key__": sample[0][3].rsplit("/", 1)[-1].partition(".")[0], "__url__": url}
            for ext, offset, size, _ in sample:
                out[ext] = data[offset:offset + size]
            yield out

    return samples()


def _transient() -> tuple[type[BaseException], ...]:
    """An object store's network errors (botocore's are not all OSError): a shard whose read
    fails with one is a damaged input, named, not a crash."""
    from .remote import transient_errors

    return transient_errors()


def _components(sample: dict) -> set[str]:
    return {k for k in sample if not k.startswith("__")}


def lost_samples(url: str, read: int, cut_key: str | None) -> tuple[list[str], int | None]:
    """(keys known lost, how many were lost or None) for a shard cut after `read` whole
    samples: its DALI index names them all; else its stats count them and only the sample
    being read at the cut (`cut_key`) has a name."""
    keys = index_keys(url)
    if keys is not None and len(keys) >= read:
        return keys[read:], len(keys) - read
    try:
        stats = read_stats(url)
    except (OSError, ValueError):
        stats = None
    lost = stats["count"] - read if stats and stats.get("count", 0) >= read else None
    if cut_key is not None and lost == 0:
        lost = None  # the stats are not this shard's
    return ([cut_key] if cut_key else []), lost


def read_dali_index(url: str) -> str | None:
    """The text of the DALI index beside shard `url`; None when there is none or it is not
    readable text."""
    path = dali_index_path(url)
    try:
        if not urls.exists(path):
            return None
        with urls.open_url(path, "rb") as f:
            return f.read().decode()
    except (OSError, UnicodeDecodeError):
        return None


def index_keys(url: str) -> list[str] | None:
    """Sample keys in the order the shard's DALI index lists them; None without an index, or
    with one that is not this shard's (`stale_index`)."""
    text = read_dali_index(url)
    if text is None:
        return None
    lines = text.splitlines()
    if not lines or not lines[0].startswith("v1.") or stale_index(url, text) is not None:
        return None
    return [line.split()[3].partition(".")[0] for line in lines[1:] if len(line.split()) >= 4]


def _index_samples(text: str) -> list[list[tuple[str, int, int, str]]]:
    """Per sample (a line of a DALI index text, in file order): (ext, data offset, size, member
    name) of each of its members; ValueError on an entry that is not numbers."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if fields:
            out.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                        for i in range(0, len(fields) - 3, 4)])
    return out


def _index_members(text: str) -> list[tuple[str, int, int]]:
    """(member, data offset, size) of every entry of a DALI index text, in file order."""
    return [(name, offset, size) for sample in _index_samples(text)
            for _, offset, size, name in sample]


def stale_index(url: str, text: str) -> str | None:
    """Why the DALI index `text` does not describe shard `url` (None when it does): the tar
    header before its first member's data, and before its last one's when that lies in the
    file, must name that member with that size. Two ranged reads per shard; an index whose
    entries run past the end of a shard cut short is not stale (the cut samples are damage)."""
    try:
        members = _index_members(text)
    except ValueError as e:
        return f"{dali_index_path(url)}: unreadable entry ({e})"
    if not members:
        return None
    with urls.open_url(url, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        checks = [members[0]] + ([members[-1]] if members[-1][1] + members[-1][2] <= size else [])
        for member, offset, length in checks:
            if offset < 512 or offset + length > size:
                return (f"{dali_index_path(url)} is stale: it puts {member} at bytes {offset}.."
                        f"{offset + length}, {url} holds {size} bytes")
            f.seek(offset - 512)
            found = _header_member(f.read(512))
            if found != (member, length):
                return (f"{dali_index_path(url)} is stale (another shard's, or written before "
                        f"{url} was): it puts {member} ({length} bytes) at byte {offset}, the tar "
                        f"has {found[0] if found else 'no member'!r} there; remove it and rewrite "
                        "the shard set, or recreate the index with DALI's wds2idx")
    return None


def _header_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a ustar header block; None when it is not one."""
    if len(header) < 512 or not header[:100].strip(b"\0"):
        return None
    try:
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        raw = header[124:136]
        length = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.rstrip(b"\0 ") or b"0", 8)
        return name.decode("utf-8", "replace"), length
    except ValueError:
        return None


def _ends_archive(url: str, offset: int) -> bool:
    """A whole tar has a zero block where its members end; a cut one has nothing there."""
    with urls.open_url(url, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not any(block)


def check_components(sample: dict, required: tuple[str, ...]) -> tuple[str, str] | None:
    """(reason, detail) when a sample lacks, or has empty, required components; None if fine.

    A key with a dot shows up as components like `0001.jpg` under the text before the dot.
    """
    present = _components(sample)
    dotted = _dotted(sample, required)
    if dotted:
        return "dotted_key", (f"members {', '.join(sample['__key__'] + '.' + c for c in dotted)}: "
                              "sample keys must not contain dots")
    missing = [c for c in required if c not in sample]
    if missing:
        return "missing_component", f"no {', '.join(missing)} (has {', '.join(sorted(present)) or 'nothing'})"
    empty = [c for c in required if not sample[c]]
    if empty:
        return "empty_component", f"{', '.join(empty)} is empty"
    return None


def _dotted(sample: dict, required: tuple[str, ...]) -> list[str]:
    return sorted(c for c in _components(sample)
                  if c not in required and any(c.endswith("." + r) for r in required))


def sample_key(sample: dict, required: tuple[str, ...]) -> str:
    """The key a sample was written under: for a dotted key, the text before the dot is not all."""
    dotted = _dotted(sample, required)
    if not dotted:
        return sample["__key__"]
    suffix = max((r for r in required if dotted[0].endswith("." + r)), key=len)
    return f"{sample['__key__']}.{dotted[0][:-len(suffix) - 1]}"


# -- inputs, checked before work --------------------------------------------------------------


def resolve_inputs(patterns: str | list[str], *, schema: str | tuple[str, ...] | None = None,
                   stage: str = "inputs") -> list[str]:
    """Every shard the patterns name; raises ConfigError naming what matches nothing, is
    missing, is not a tar, or holds samples of another stage (with `schema`: the one, or the
    versions, the stage reads)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ConfigError(f"{stage}: no input shards given")
    found: list[str] = []
    problems: list[str] = []
    for pattern in patterns:
        matched = urls.expand(pattern)
        if not matched:
            problems.append(f"{pattern!r} matches no files")
        problems += [f"{u} not found" for u in matched if not urls.exists(u)]
        found += matched
    if problems:
        raise ConfigError(f"{stage}: " + "; ".join(problems))
    found = list(dict.fromkeys(found))
    if schema is not None:
        with ThreadPoolExecutor(8) as pool:  # one small read per shard; overlaps remote latency
            problems = [p for p in pool.map(lambda u: _kind_problem(u, schema, stage), found) if p]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ConfigError(f"{stage}: " + "; ".join(problems[:5]) + more)
    return found


def _kind_problem(url: str, schema: str | tuple[str, ...], stage: str, peek: int = 4) -> str | None:
    """Why `url` is not a shard of the kind `schema` names (None when it is, or cannot tell)."""
    schemas = (schema,) if isinstance(schema, str) else schema
    damage: list[TarDamage] = []
    samples = iter_tar(url, damage)
    try:
        for _, sample in zip(range(peek), samples, strict=False):
            try:
                found = json.loads(sample["json"]).get("schema")
            except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
                continue
            if found in schemas:
                return None
            kind = _KIND_NAMES.get(found, f"schema {found!r}")
            return (f"{url} holds {kind} samples, {stage} reads {_KIND_NAMES.get(schemas[0], schemas[0])} "
                    "shards")
    finally:
        samples.close()
    if damage and not damage[0].samples:
        return f"{url} is not a readable tar shard ({damage[0].error})"
    if not damage and not urls.exists(url):
        return f"{url} not found"
    return None
