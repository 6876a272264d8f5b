"""Throughput measurements shared by `xpaste-stream bench loader` and benchmarks/bench_loader.py."""

from __future__ import annotations

import os
import re
import time

import torch

from .. import urls as urlmod
from ..shards import dali_index_path
from .config import PasteConfig
from .loader import CopyPasteLoader
from .pipeline import decode_only_pipeline


def device_name(device_id: int | None) -> str:
    """'cpu' or a slug of the GPU name ('nvidia-h100-80gb-hbm3'), used in result file names."""
    if device_id is None:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device_id).lower()).strip("-")


def measure_loader(background_urls, bank, paste: PasteConfig, batch_size: int, batches: int,
                   device_id: int | None, num_threads: int, warmup: int = 2) -> dict:
    """Images/s and pasted instances/s of the loader over `batches` batches after a warm-up;
    also images per CPU-second of the process (all threads): a per-core figure that holds when
    other processes share the cores. The warm-up includes filling the instance pool, if any."""
    loader = CopyPasteLoader(background_urls, bank, paste, batch_size=batch_size,
                             device_id=device_id, num_threads=num_threads)
    images = pasted = 0
    started = None
    for n, batch in enumerate(_forever(loader)):
        if n == warmup:
            _sync(device_id)
            started, cpu_started = time.perf_counter(), time.process_time()
        elif n > warmup:
            images += len(batch.targets)
            pasted += int(batch.plan.active[:len(batch.targets)].sum())
        if n == warmup + batches:
            break
    _sync(device_id)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"images_per_s": images / seconds, "instances_per_s": pasted / seconds,
            "images_per_cpu_s": images / cpu_seconds, "images": images, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "stats": loader.stats()}


def measure_decode_only(background_urls, batch_size: int, batches: int, device_id: int | None,
                        num_threads: int, warmup: int = 2) -> dict:
    """The ceiling: DALI reads and decodes the same shards on the same device, nothing else."""
    paths = urlmod.expand(background_urls)
    pipe = decode_only_pipeline(paths=paths, index_paths=[dali_index_path(p) for p in paths],
                                gpu=device_id is not None, batch_size=batch_size,
                                num_threads=num_threads, device_id=device_id)
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    started = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    seconds = time.perf_counter() - started
    return {"images_per_s": batch_size * batches / seconds, "images": batch_size * batches,
            "seconds": seconds}


def cores_in_use(num_threads: int) -> int:
    return max(1, min(num_threads, os.cpu_count() or 1))


def _forever(loader):
    while True:
        yield from loader


def _sync(device_id: int | None) -> None:
    if device_id is not None:
        torch.cuda.synchronize(device_id)
