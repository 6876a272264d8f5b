"""A loader worker process that dies or stops mid-epoch: the loader replaces the pipeline at the
same position within its bound, and the epoch is exactly the uninterrupted one; past its
restart budget it raises one clear error. Real DALI worker processes, real signals."""

from __future__ import annotations

import os
import signal
import time

import pytest
from test_loader_fixtures import fingerprint, make_dataset

from xpaste_stream.loader import CopyPasteLoader, LoaderError, PasteConfig
from xpaste_stream.loader.loader import _alive


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("watchdog")))


def settings(**kw) -> dict:
    return {"batch_size": 2, "seed": 4, "batch_timeout": 20.0, **kw}


def paste() -> PasteConfig:
    return PasteConfig(output_size=64, max_pastes=4)


def kill(pid: int, sig=signal.SIGKILL) -> None:
    """Send `sig` and wait (at most 10 s) until the kernel has carried it out."""
    os.kill(pid, sig)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sig == signal.SIGKILL and not _alive(pid):
            return
        with open(f"/proc/{pid}/stat") as f:
            if sig == signal.SIGSTOP and f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(dataset):
    urls, bank = dataset
    with CopyPasteLoader(urls, bank, paste(), workers=1, **settings()) as loader:
        return fingerprint(list(loader))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("when", ["start", "middle", "end"])
def test_killed_worker_is_replaced_and_the_epoch_is_unchanged(dataset, uninterrupted, workers, when):
    urls, bank = dataset
    with CopyPasteLoader(urls, bank, paste(), workers=workers, **settings()) as loader:
        n = len(loader)
        at = {"start": 0, "middle": n // 2, "end": n - 1}[when]
        batches, started = [], time.monotonic()
        it = iter(loader)
        for i in range(n):
            if i == at:
                if i == 0:
                    loader._pipeline()               # workers start with the first pipeline
                kill(min(loader.worker_pids()))
            batches.append(next(it))
        assert time.monotonic() - started < 60
        assert loader.restarts == 1 and loader.stats()["worker_restarts"] == 1
        assert fingerprint(batches) == uninterrupted


def test_stopped_worker_ends_within_the_bound(dataset, uninterrupted):
    """SIGSTOP: the worker lives but sends nothing; after batch_timeout it is replaced."""
    urls, bank = dataset
    quick = settings(batch_timeout=4.0, worker_prefetch=1, prefetch=1)
    with CopyPasteLoader(urls, bank, paste(), workers=1, **quick) as loader:
        it = iter(loader)
        batches = [next(it)]
        kill(min(loader.worker_pids()), signal.SIGSTOP)
        started = time.monotonic()
        batches += list(it)
        assert time.monotonic() - started < 40
        assert loader.restarts == 1 and fingerprint(batches) == uninterrupted


def test_workers_that_keep_dying_end_in_one_clear_error(dataset):
    urls, bank = dataset
    with CopyPasteLoader(urls, bank, paste(), workers=1, **settings(worker_restarts=1)) as loader:
        it = iter(loader)
        next(it)
        started = time.monotonic()
        with pytest.raises(LoaderError, match=r"worker process \d+ died; the loader gave up after 1 restart"):
            while True:
                for pid in loader.worker_pids():
                    kill(pid)
                next(it)
        assert time.monotonic() - started < 60
