"""An object store that stops answering with the connection open (a moto server on 127.0.0.1
under SIGSTOP): reads end in an error naming the URL within a bound, never hang."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import fsspec
import numpy as np
import pytest

from xpaste_stream.remote import BlockCache, RemoteConfig
from xpaste_stream.shards import TarDamage, iter_tar, write_samples

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture
def stoppable_s3(monkeypatch):
    """A moto server in its own process (so it can be stopped) and fsspec pointed at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setitem(fsspec.config.conf, "s3", {
        "key": "testing", "secret": "testing", "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
    for name, value in (("XPASTE_REMOTE_CONNECT_TIMEOUT_S", "1"), ("XPASTE_REMOTE_READ_TIMEOUT_S", "1"),
                        ("XPASTE_REMOTE_RETRIES", "1")):
        monkeypatch.setenv(name, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="shards")
    fs = fsspec.filesystem("s3")
    try:
        yield fs, server
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait(10)


def bounded(fn, limit: float):
    """(result or exception, seconds) of fn() in a thread; ('hung', limit) when it did not end."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["value"] = e

    started = time.time()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    return out.get("value", "hung"), time.time() - started


def test_block_read_from_a_silent_store_ends_naming_the_url(stoppable_s3):
    fs, server = stoppable_s3
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    fs.pipe("shards/blob.bin", data)
    cache = BlockCache(RemoteConfig(block_size=1 << 20, cache_bytes=4 << 20, backoff_s=0.1))
    assert cache.read("s3://shards/blob.bin", 0, 10) == data[:10]
    os.kill(server.pid, signal.SIGSTOP)
    # 2 attempts x (1 s connect + 1 s read) + 0.1 s backoff, with slack for a loaded machine
    value, took = bounded(lambda: cache.read("s3://shards/blob.bin", 2 << 20, 10), 30)
    assert isinstance(value, OSError), value
    assert "s3://shards/blob.bin" in str(value) and took < 15
    value, took = bounded(lambda: cache.read("s3://shards/blob.bin", 1 << 20, 10), 30)
    assert isinstance(value, OSError) and "stopped answering" in str(value) and took < 1


def test_shard_stream_from_a_silent_store_is_a_named_damaged_input(stoppable_s3, tmp_path):
    fs, server = stoppable_s3
    rng = np.random.default_rng(1)
    local = write_samples(str(tmp_path / "s-{shard:06d}.tar"),
                          [{"__key__": f"k{i:04d}", "bin": rng.bytes(200_000)} for i in range(40)],
                          maxcount=100)
    fs.put(local[0], "shards/s-000000.tar")
    url = "s3://shards/s-000000.tar"
    damage: list[TarDamage] = []
    samples = iter_tar(url, damage)
    next(samples)
    os.kill(server.pid, signal.SIGSTOP)
    # s3fs's 5 attempts x (1 s + 1 s) and its backoff, with slack
    value, took = bounded(lambda: sum(1 for _ in samples), 60)
    assert value != "hung" and took < 40, (value, took)
    assert damage and damage[0].shard == url


@pytest.mark.parametrize("batch_timeout", [60.0, None], ids=["batch_timeout60", "defaults"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_mid_epoch_on_a_silent_store_ends_within_the_bound(stoppable_s3, tmp_path, workers,
                                                                  monkeypatch, batch_timeout):
    """Backgrounds on the store, which stops answering after the first batch: the loader ends
    (a clear error naming the store's shards) within the bound instead of waiting forever.
    `defaults`: no batch_timeout given (the loader's own), so the bound comes from the store
    access alone (and the same test runs against versions without the watchdog)."""
    from test_loader_fixtures import default_backgrounds, write_backgrounds, write_bank, write_categories

    from xpaste_stream.loader import CopyPasteLoader, PasteConfig

    fs, server = stoppable_s3
    bg = tmp_path / "bg"
    bg.mkdir()
    local = write_backgrounds(str(bg), default_backgrounds(24), per_shard=6)
    write_categories(str(bg), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    for path in sorted(bg.iterdir()):
        fs.put(str(path), f"shards/bg/{path.name}")
    bank = write_bank(str(tmp_path))
    urls = [f"s3://shards/bg/{os.path.basename(u)}" for u in local]
    monkeypatch.setenv("XPASTE_REMOTE_BLOCK_BYTES", "4096")     # every sample is read from the
    monkeypatch.setenv("XPASTE_REMOTE_CACHE_BYTES", "16384")    # store, not from the cache
    from xpaste_stream import remote

    monkeypatch.setattr(remote, "_CACHE", {})                   # a fresh cache with those sizes
    loader = CopyPasteLoader(urls, bank, PasteConfig(output_size=64, max_pastes=2), batch_size=2,
                             workers=workers, prefetch=1, worker_prefetch=1,
                             **({} if batch_timeout is None else {"batch_timeout": batch_timeout}))
    it = iter(loader)
    next(it)
    os.kill(server.pid, signal.SIGSTOP)

    def rest():
        return sum(len(b.targets) for b in it)

    value, took = bounded(rest, 150)
    stats = loader.stats()
    loader.close()
    assert value != "hung" and took < 120, (value, took)
    # either the run ended in an error naming the store's shards, or it finished with the
    # unreadable backgrounds skipped, counted and named
    if isinstance(value, Exception):
        assert "s3://shards/bg/" in str(value) or "damaged" in str(value), value
    else:
        assert stats.get("backgrounds_corrupt", 0) > 0, stats
        assert all(s[0].startswith("s3://shards/bg/") for s in stats["skipped"])


def test_extract_mid_run_on_a_silent_store_ends_within_the_bound(stoppable_s3, tmp_path):
    """Image shards on the store, which stops answering once the first output shard is done:
    extract ends within the bound, the unreadable inputs named as damaged (nothing hangs)."""
    import glob

    from xpaste_stream.extract.stage import ExtractConfig, run_extract
    from xpaste_stream.generate.stage import GenerateConfig, run_generate

    fs, server = stoppable_s3
    run_generate(GenerateConfig(output=str(tmp_path / "gen" / "gen-{shard:04d}.tar"), num_categories=3,
                                images_per_category=4, image_size=64, maxcount=4), progress=False)
    for path in sorted(glob.glob(str(tmp_path / "gen" / "gen-*"))):
        fs.put(path, f"shards/gen/{os.path.basename(path)}")
    out = tmp_path / "inst"
    cfg = ExtractConfig(inputs=["s3://shards/gen/gen-*.tar"], output=str(out / "inst-{shard:04d}.tar"),
                        maxcount=4)

    def stop_after_first_shard():
        deadline = time.time() + 60
        while time.time() < deadline and not glob.glob(str(out / "inst-*.stats.json")):
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGSTOP)

    threading.Thread(target=stop_after_first_shard, daemon=True).start()
    value, took = bounded(lambda: run_extract(cfg, progress=False), 240)
    assert value != "hung" and took < 120, (value, took)
    done = glob.glob(str(out / "inst-*.stats.json"))
    assert 1 <= len(done) < 3, value                # it stopped mid-run, not before or after
    text = str(value)
    assert "s3://shards/gen/" in text, text         # the unreadable inputs are named
