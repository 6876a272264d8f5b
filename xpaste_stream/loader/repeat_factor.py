"""LVIS repeat-factor sampling of the backgrounds, through DALI's own reader.

The original draws destination images with detectron2's RepeatFactorTrainingSampler: per epoch,
image i appears floor(r_i) + Bernoulli(frac(r_i)) times, r_i = max over its categories of
max(1, sqrt(t / f(c))) (pack-coco stores r_i in each background's json). DALI's webdataset
reader yields each indexed sample once per epoch, so each epoch gets its own index files that
list a sample as many times as it is drawn: DALI reads the same offsets again, and its sharding
by rank and its shuffling work unchanged.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import urls
from ..shards import dali_index_path


def read_index(url: str) -> tuple[str, list[str]]:
    """(header, sample lines) of a shard's DALI index."""
    with urls.open_url(dali_index_path(url), "rb") as f:
        lines = f.read().decode().splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise ValueError(f"{dali_index_path(url)}: not a DALI webdataset index")
    return lines[0].split()[0], lines[1:]


def sample_repeat_factors(url: str) -> np.ndarray:
    """Each sample's `repeat_factor`, read from its json member only (offsets from the index)."""
    _, lines = read_index(url)
    factors = np.ones(len(lines))
    with urls.open_url(url, "rb") as f:
        for i, line in enumerate(lines):
            fields = line.split()
            for ext, offset, size in zip(fields[0::4], fields[1::4], fields[2::4], strict=True):
                if ext == "json":
                    f.seek(int(offset))
                    factors[i] = float(json.loads(f.read(int(size))).get("repeat_factor", 1.0))
    return factors


def epoch_repeats(factors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """floor(r) + Bernoulli(frac(r)) per sample, drawn afresh for every epoch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5EF]))
    whole = np.floor(factors)
    return (whole + (rng.random(len(factors)) < factors - whole)).astype(np.int64)


def shard_repeats(factors: list[np.ndarray], seed: int, epoch: int) -> list[np.ndarray]:
    """Per shard, how often each sample appears in `epoch` (each shard its own stream)."""
    return [epoch_repeats(f, seed * 100_003 + n, epoch) for n, f in enumerate(factors)]


def write_epoch_indexes(shard_urls: list[str], factors: list[np.ndarray], seed: int, epoch: int,
                        folder: str) -> tuple[list[str], int]:
    """Index files of one epoch (one per shard, in `folder`) and the epoch's sample count."""
    os.makedirs(folder, exist_ok=True)
    paths, total = [], 0
    for n, (url, repeats) in enumerate(zip(shard_urls, shard_repeats(factors, seed, epoch),
                                           strict=True)):
        header, lines = read_index(url)
        body = [line for line, k in zip(lines, repeats, strict=True) for _ in range(k)]
        path = os.path.join(folder, f"epoch{epoch:05d}-{n:06d}.idx")
        with open(path, "w") as f:
            f.write(f"{header} {len(body)}\n" + "\n".join(body) + "\n")
        paths.append(path)
        total += len(body)
    return paths, total
