"""Shards on object storage: a local S3 server (moto) on the loopback interface."""

from __future__ import annotations

import glob
import os

import fsspec
import numpy as np
import pytest

from xpaste_stream import remote, urls
from xpaste_stream.config import ConfigError
from xpaste_stream.extract import ExtractConfig, run_extract
from xpaste_stream.generate import GenerateConfig, run_generate
from xpaste_stream.remote import BlockCache, RemoteConfig

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 and fsspec configured to use it; yields the filesystem."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                                "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                  "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="shards")
    fs = fsspec.filesystem("s3")
    yield fs
    fsspec.config.conf["s3"] = saved
    server.stop()


class FailingFirstReads:
    """A filesystem whose first `n` ranged reads fail as a dropped connection would."""

    def __init__(self, fs, n: int):
        self.fs, self.left, self.calls = fs, n, 0

    def cat_file(self, path, start, end):
        self.calls += 1
        if self.left:
            self.left -= 1
            raise ConnectionResetError("injected: connection reset by peer")
        return self.fs.cat_file(path, start=start, end=end)


def test_block_cache_is_bounded_and_retries_transient_faults(s3):
    data = np.random.default_rng(0).integers(0, 256, 40_000, dtype=np.uint8).tobytes()
    s3.pipe("shards/blob.bin", data)
    flaky = FailingFirstReads(s3, 2)
    cache = BlockCache(RemoteConfig(cache_bytes=8192, block_size=4096, backoff_s=0.0),
                       fs_of=lambda url: (flaky, url[len("s3://"):]))
    rng = np.random.default_rng(1)
    for _ in range(60):
        offset = int(rng.integers(0, len(data) - 3000))
        size = int(rng.integers(1, 3000))
        assert cache.read("s3://shards/blob.bin", offset, size) == data[offset:offset + size]
        assert cache.bytes <= 8192
    assert cache.retried == 2 and cache.evicted > 0 and cache.hits > 0
    # past its retries a read fails naming the file
    dead = BlockCache(RemoteConfig(cache_bytes=8192, block_size=4096, retries=1, backoff_s=0.0),
                      fs_of=lambda url: (FailingFirstReads(s3, 5), url[len("s3://"):]))
    with pytest.raises(OSError, match="s3://shards/blob.bin: read of bytes 0.. failed after 2 attempts"):
        dead.read("s3://shards/blob.bin", 0, 10)
    # a missing file is not transient: no retries
    with pytest.raises(FileNotFoundError):
        BlockCache(RemoteConfig(backoff_s=5.0)).read("s3://shards/absent.bin", 0, 10)


def test_generate_extract_index_through_s3(s3, tmp_path, monkeypatch):
    small = BlockCache(RemoteConfig(cache_bytes=16384, block_size=4096))  # smaller than the shards
    monkeypatch.setattr(remote, "_CACHE", {os.getpid(): small})
    gen = GenerateConfig(output="s3://shards/run/gen/gen-{shard:04d}.tar", num_categories=3,
                         images_per_category=4, image_size=64, maxcount=4)
    assert run_generate(gen, progress=False)["samples"] == 12
    assert run_generate(gen, progress=False)["units_run"] == 0  # resumed from stats on S3
    ext = ExtractConfig(inputs=["s3://shards/run/gen/gen-*.tar"],
                        output="s3://shards/run/inst/inst-{shard:04d}.tar", maxcount=4)
    summary = run_extract(ext, progress=False)
    assert summary["units"] == 3 and summary["samples"] + summary["failed"] == 12
    local = ExtractConfig(inputs=[str(tmp_path / "gen" / "gen-*.tar")],
                          output=str(tmp_path / "inst" / "inst-{shard:04d}.tar"), maxcount=4)
    run_generate(GenerateConfig(output=str(tmp_path / "gen" / "gen-{shard:04d}.tar"), num_categories=3,
                                images_per_category=4, image_size=64, maxcount=4), progress=False)
    run_extract(local, progress=False)
    for path in sorted(glob.glob(str(tmp_path / "inst" / "inst-*.tar"))):  # same bytes as on disk
        name = path.rsplit("/", 1)[1]
        assert s3.cat_file(f"shards/run/inst/{name}") == open(path, "rb").read()

    from xpaste_stream.bank import build_index
    from xpaste_stream.bank.bank import InstanceBank

    bank_dir = str(tmp_path / "bank")
    build_index(urls.expand("s3://shards/run/inst/inst-*.tar"), bank_dir, workers=1, progress=False)
    bank = InstanceBank(bank_dir)
    assert bank.num_instances == summary["samples"]
    cache = remote.shared_cache()
    assert cache is small
    for i in range(bank.num_instances):  # instance bytes by ranged reads through the cache
        got = bank.read(i)
        mask = got.get("mask.lz4", got.get("mask.png"))
        assert got["jpg"][:2] == b"\xff\xd8" and mask
    assert cache.misses > 0 and cache.bytes <= 16384 and cache.evicted > 0

    # ... -> loader: backgrounds of the same categories on the bucket, the bank of the S3
    # instance shards; every read through the same small cache, an injected fault retried
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_loader_fixtures import default_backgrounds, write_backgrounds, write_categories

    from xpaste_stream.loader import CopyPasteLoader, PasteConfig

    local_bg = tmp_path / "bg"
    local_bg.mkdir()
    write_backgrounds(str(local_bg), default_backgrounds(4), per_shard=2)
    write_categories(str(local_bg), {i: (0.2, 0.05) for i in (1, 2, 3)})
    for path in sorted(glob.glob(str(local_bg / "*"))):
        s3.put(path, f"shards/run/bg/{os.path.basename(path)}")
    s3.invalidate_cache()
    one_fault = FailingFirstReads(s3, 1)
    flaky = BlockCache(RemoteConfig(cache_bytes=16384, block_size=4096, backoff_s=0.0),
                       fs_of=lambda url: (one_fault, url[len("s3://"):]))
    monkeypatch.setattr(remote, "_CACHE", {os.getpid(): flaky})
    with CopyPasteLoader("s3://shards/run/bg/bg-*.tar", bank, PasteConfig(output_size=64, max_pastes=3,
                                                                           min_pastes=2),
                         batch_size=2, workers=0) as loader:
        images = [t["image_id"] for b in loader for t in b.targets]
        assert sorted(images) == [0, 1, 2, 3] and loader.stats()["pastes_planned"] >= 8
    assert flaky.retried == 1 and flaky.bytes <= 16384


def test_missing_bucket_and_credentials_are_refused_before_work(s3, tmp_path, monkeypatch):
    gen = GenerateConfig(output="s3://no-such-bucket/gen/gen-{shard:04d}.tar", num_categories=1,
                         images_per_category=1, image_size=64)
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        run_generate(gen, progress=False)
    from xpaste_stream.bank import build_index

    with pytest.raises(ConfigError, match="input shard s3://no-such-bucket/inst-0.tar: bucket"):
        build_index(["s3://no-such-bucket/inst-0.tar"], str(tmp_path / "bank"), progress=False)
    conf = dict(fsspec.config.conf["s3"])
    conf.pop("key"), conf.pop("secret")
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="credentials"):
        run_generate(GenerateConfig(output="s3://shards/x/gen-{shard:04d}.tar", num_categories=1,
                                    images_per_category=1, image_size=64), progress=False)
    s3.invalidate_cache()
    assert not s3.exists("shards/x")  # nothing written


def test_loader_streams_backgrounds_and_instances_from_s3(s3, tmp_path, monkeypatch):
    """Backgrounds (+ .idx, categories.json) and instance shards on S3, the bank indexing the
    S3 shards: the loader reads all of it by ranged reads through a cache smaller than the data,
    retries an injected fault, and gives the same samples with and without worker processes."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_loader_fixtures import default_backgrounds, write_backgrounds, write_bank, write_categories

    from xpaste_stream.bank import build_index
    from xpaste_stream.loader import CopyPasteLoader, PasteConfig

    local_bg = tmp_path / "bg"
    local_bg.mkdir()
    write_backgrounds(str(local_bg), default_backgrounds(6), per_shard=3)
    write_categories(str(local_bg), {1: (0.2, 0.05), 2: (0.3, 0.1), 3: None})
    write_bank(str(tmp_path))
    for path in sorted(glob.glob(str(local_bg / "*"))):
        s3.put(path, f"shards/loader/bg/{os.path.basename(path)}")
    for path in sorted(glob.glob(str(tmp_path / "inst" / "*.tar"))):
        s3.put(path, f"shards/loader/inst/{os.path.basename(path)}")
    s3.invalidate_cache()
    bank = str(tmp_path / "s3bank")
    build_index(urls.expand("s3://shards/loader/inst/inst-*.tar"), bank, workers=1, progress=False)
    data_bytes = sum(s3.size(p) for p in s3.find("shards/loader"))

    flaky_fs = FailingFirstReads(s3, 2)
    small = BlockCache(RemoteConfig(cache_bytes=8192, block_size=4096, backoff_s=0.0),
                       fs_of=lambda url: (flaky_fs, url[len("s3://"):]))
    monkeypatch.setattr(remote, "_CACHE", {os.getpid(): small})
    assert small.cfg.cache_bytes < data_bytes
    paste = PasteConfig(output_size=64, max_pastes=3, min_pastes=1)

    def run(workers: int) -> list:
        with CopyPasteLoader("s3://shards/loader/bg/bg-*.tar", bank, paste, batch_size=2,
                             workers=workers, seed=4) as loader:
            out = [(int(b.plan.image_ids[i]), b.plan.ids[i].tolist(), len(t["labels"]))
                   for b in loader for i, t in enumerate(b.targets)]
            assert loader.stats().get("backgrounds_corrupt", 0) == 0
            return out

    in_process = run(0)
    assert len(in_process) == 6 and {i for i, _, _ in in_process} == set(range(6))
    assert small.retried == 2 and small.evicted > 0 and small.bytes <= 8192
    monkeypatch.setenv("XPASTE_REMOTE_CACHE_BYTES", "8192")   # the workers' own caches
    monkeypatch.setenv("XPASTE_REMOTE_BLOCK_BYTES", "4096")
    assert run(2) == in_process

    # a bank indexed on local disk, its shards since uploaded: re-rooted onto the bucket
    from xpaste_stream.bank import InstanceBank

    local, moved = InstanceBank.open(str(tmp_path / "bank")), InstanceBank.open(
        str(tmp_path / "bank"), shard_root="s3://shards/loader/inst")
    assert moved.shards[0]["path"].startswith("s3://shards/loader/inst/")
    assert [moved.read(i) for i in range(moved.num_instances)] == \
        [local.read(i) for i in range(local.num_instances)]
