"""The one error policy of every stage: skip what is damaged, name it, and exit honestly.

- A damaged input sample is skipped and recorded as a `Reject` (input shard or file, sample key,
  reason, detail): counted by reason in the stats of the output shard that covers it and written
  to the run's rejects list (`RejectsList`, JSON lines). A damaged part of a delivered sample
  (pack-coco: one annotation) is dropped and recorded the same way, as `what = "part"`.
- A damaged input shard (unreadable, cut short, of the wrong stage, gone) is a `Reject` with
  `what = "shard"`; the samples it loses are named when its DALI index tells their keys.
- Each stage run ends in a `StageOutcome` (facts: delivered, skipped, bad shards, where the list
  is). `ErrorPolicy.judge` turns the facts into the reasons the run failed, if any: the command
  exits non-zero and says why. `format_outcome` is the console summary naming the first skips.
- Before work: `check_device`; after it: exit codes, Ctrl-C / SIGTERM (`stop_on_signals`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

from . import urls

EXIT_OK = 0
EXIT_FAILED = 1        # the work ran, and the policy says the run failed (or inspect found damage)
EXIT_USAGE = 2         # refused before any work: arguments, config, inputs, models, devices
EXIT_INTERNAL = 3      # an unexpected error (a bug); `--debug` shows the traceback
EXIT_SIGNAL_BASE = 128  # stopped by a signal: 130 for Ctrl-C (SIGINT), 143 for SIGTERM

REJECTS_SUFFIX = "rejects.jsonl"


class ModelLoadError(RuntimeError):
    """The diffusers model could not be loaded (most often: not downloaded, and we are offline).

    Raised by generate/text2image.py (which re-exports it); defined here so that the command
    line can catch it without importing the generator."""


@dataclass(frozen=True)
class Reject:
    """Something a stage did not deliver: a sample, a part of one, or a whole input shard."""

    what: Literal["sample", "part", "shard"]
    source: str            # the input shard, or the input file (an image for pack-coco / folder)
    key: str | None        # sample key; None for a whole shard
    reason: str            # counter key, e.g. "unreadable_image", "missing_component"
    detail: str = ""
    input: int | None = None   # input position (ShardWriter numbering), when it has one
    output: str | None = None  # the output shard whose stats count it

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ErrorPolicy:
    """When a run that went to its end still counts as failed."""

    max_failed_fraction: float = 0.5  # skipped / (delivered + skipped) above this fails the run
    max_bad_shards: int = 0           # damaged, unreadable or missing input shards tolerated
    show: int = 10                    # skipped samples named on the console

    def validate(self) -> None:
        if not 0 <= self.max_failed_fraction <= 1:
            raise ValueError(f"max_failed_fraction {self.max_failed_fraction} must be in [0, 1]")
        if self.max_bad_shards < 0 or self.show < 0:
            raise ValueError("max_bad_shards and show must be >= 0")

    def judge(self, outcome: StageOutcome) -> list[str]:
        """Why the run failed (empty: it did not)."""
        why = []
        total = outcome.delivered + outcome.skipped
        if outcome.bad_shards > self.max_bad_shards:
            why.append(f"{outcome.bad_shards} bad input shard(s), at most {self.max_bad_shards} "
                       "allowed (--max-bad-shards)")
        if total and outcome.skipped / total > self.max_failed_fraction:
            why.append(f"{outcome.skipped} of {total} inputs skipped "
                       f"({100 * outcome.skipped / total:.0f} %), at most "
                       f"{100 * self.max_failed_fraction:g} % allowed (--max-failed-fraction)")
        if outcome.delivered == 0 and not why:
            why.append("nothing delivered")
        return why


@dataclass
class StageOutcome:
    """What one stage run delivered and skipped: the facts the policy judges."""

    stage: str
    delivered: int
    skipped: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # reason -> skipped samples
    dropped: dict[str, int] = field(default_factory=dict)   # reason -> dropped parts
    bad_shards: int = 0
    first: list[Reject] = field(default_factory=list)       # the first rejects, for the console
    rejects_path: str | None = None

    def as_dict(self) -> dict:
        return {"stage": self.stage, "delivered": self.delivered, "skipped": self.skipped,
                "failures": self.failures, "dropped": self.dropped, "bad_shards": self.bad_shards,
                "rejects": self.rejects_path}


def format_outcome(outcome: StageOutcome, why: list[str], show: int = 10) -> str:
    """Console summary: counts, up to `show` rejects named, where the full list is, the verdict."""
    lines = []
    if outcome.skipped or outcome.dropped or outcome.bad_shards:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(outcome.failures.items()))
        head = (f"{outcome.stage}: {outcome.delivered:,} delivered, {outcome.skipped:,} skipped"
                + (f" ({reasons})" if reasons else ""))
        if outcome.dropped:
            head += "; dropped parts: " + ", ".join(f"{r} {n}" for r, n in sorted(outcome.dropped.items()))
        if outcome.bad_shards:
            head += f"; {outcome.bad_shards} bad input shard(s)"
        lines.append(head)
        named = outcome.first[:show]
        for r in named:
            where = r.source if r.key is None else f"{r.source} {r.key}"
            lines.append(f"  {r.what} {where}: {r.reason}" + (f" ({r.detail})" if r.detail else ""))
        total = outcome.skipped + sum(outcome.dropped.values()) + outcome.bad_shards
        hidden = max(0, total - len(named))
        tail = f"full list: {outcome.rejects_path}" if outcome.rejects_path else "no list written"
        lines.append(f"  ... {hidden:,} more; {tail}" if hidden else f"  {tail}")
    if why:
        lines.append(f"{outcome.stage}: FAILED: " + "; ".join(why))
    return "\n".join(lines)


# -- the rejects list ------------------------------------------------------------------------


def rejects_path(pattern: str) -> str:
    """`out/gen-{shard:06d}.tar` -> `out/gen-rejects.jsonl`: one list per shard set."""
    return urls.sidecar_path(pattern, REJECTS_SUFFIX)


class RejectsList:
    """JSON lines, one `Reject` each, written as they come and renamed into place at `close`.

    Keeps the first `keep` rejects and the counts for the console summary.
    """

    def __init__(self, path: str, keep: int = 100):
        self.path, self.keep = path, keep
        self.first: list[Reject] = []
        self.count = 0
        self._lines: list[str] = []
        self._file = None

    def add(self, reject: Reject) -> None:
        line = json.dumps(reject.as_dict(), sort_keys=True)
        if self._file is None and not urls.is_remote(self.path) and not self._lines:
            urls.makedirs(self.path)  # local: stream to disk; object stores: one write at close
            self._file = open(urls.local_path(self.path) + ".tmp", "w")
        if self._file is not None:
            self._file.write(line + "\n")
        else:
            self._lines.append(line)
        if len(self.first) < self.keep:
            self.first.append(reject)
        self.count += 1

    def close(self) -> str | None:
        """Put the list in place; with nothing in it, remove any stale list. Returns its path."""
        if self._file is not None:
            self._file.close()
            urls.rename(urls.local_path(self.path) + ".tmp", self.path)
        elif self.count:
            urls.write_bytes(self.path, "".join(line + "\n" for line in self._lines).encode())
        if not self.count:
            urls.remove(self.path)
            return None
        return self.path


def read_rejects(path: str) -> list[dict]:
    """Every record of a rejects list (empty when there is none)."""
    if not urls.exists(path):
        return []
    with urls.open_url(path, "rb") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


# -- collecting outcomes for the command line -----------------------------------------------

_collector: contextvars.ContextVar[list[StageOutcome] | None] = contextvars.ContextVar(
    "xpaste_outcomes", default=None)


@contextlib.contextmanager
def collecting() -> Iterator[list[StageOutcome]]:
    """Outcomes `record`ed by stages run inside the block (the command line judges them)."""
    outcomes: list[StageOutcome] = []
    token = _collector.set(outcomes)
    try:
        yield outcomes
    finally:
        _collector.reset(token)


def record(outcome: StageOutcome) -> StageOutcome:
    """Hand a stage's outcome to the active `collecting` block, if any."""
    outcomes = _collector.get()
    if outcomes is not None:
        outcomes.append(outcome)
    return outcome


# -- before work: devices ----------------------------------------------------------------------


def check_device(device: int | str | None, where: str = "--device") -> None:
    """A CUDA device that is named must exist here; raises ValueError saying what there is."""
    if device is None or (isinstance(device, str) and device in ("auto", "cpu", "")):
        return
    if isinstance(device, str):
        if not (device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"{where} {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        index = int(device[5:]) if device[5:].isdigit() else 0
    else:
        index = int(device)
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= index < count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise ValueError(f"{where} {device}: this machine has {have}; leave the device out to run "
                         "on the CPU")


# -- stopping -------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so a run unwinds like Ctrl-C (finished shards stay)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` for the block (the main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_worker() -> None:
    """Pool initializer: Ctrl-C and SIGTERM are the parent's to handle (no worker tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupted_exit_code(e: KeyboardInterrupt) -> int:
    return EXIT_SIGNAL_BASE + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
