"""Loader start-up at LVIS scale: the repeat factor of every background (one small read each,
100k at LVIS v1 train, mostly from a cold page cache) is read with the reads overlapping."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from xpaste_stream.loader import backgrounds
from xpaste_stream.loader.backgrounds import BackgroundIndex, ShardFiles
from xpaste_stream.shards import write_samples

READ_S = 0.02  # a cold disk read, exaggerated


def write_shards(folder, shards: int, per_shard: int) -> tuple[list[str], list[float]]:
    factors = [1.0 + (i % 7) / 2 for i in range(shards * per_shard)]
    samples = [{"__key__": f"s{i:04d}", "jpg": bytes([i % 256]) * 700,
                "json": json.dumps({"repeat_factor": r}).encode()} for i, r in enumerate(factors)]
    urls = write_samples(str(folder / "bg-{shard:06d}.tar"), samples, maxcount=per_shard)
    return urls, factors


def test_repeat_factor_reads_overlap(tmp_path, monkeypatch):
    urls, factors = write_shards(tmp_path, shards=8, per_shard=10)
    index = BackgroundIndex.build(urls)
    real_pread = os.pread

    def slow_pread(fd, size, offset):
        time.sleep(READ_S)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(backgrounds.os, "pread", slow_pread)
    started = time.perf_counter()
    read = index.repeat_factors(ShardFiles())
    seconds = time.perf_counter() - started
    np.testing.assert_array_equal(read, factors)
    serial = len(factors) * READ_S  # 1.6 s one read after the other
    assert seconds < serial / 2, f"{seconds:.2f} s for {len(factors)} reads ({serial:.1f} s serial)"


def test_unreadable_members_keep_factor_one(tmp_path):
    urls, factors = write_shards(tmp_path, shards=2, per_shard=3)
    index = BackgroundIndex.build(urls)
    index.size["json"][1] = -1                 # a sample without json
    index.offset["json"][4] = int(index.offset["image"][4])  # points at image bytes: not json
    read = index.repeat_factors(ShardFiles())
    expected = list(factors)
    expected[1] = expected[4] = 1.0
    np.testing.assert_array_equal(read, expected)
