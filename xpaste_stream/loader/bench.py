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
from .pipeline import decode_lsj_pipeline, decode_only_pipeline
from .wire import WIRE


def device_name(device_id: int | None) -> str:
    """'cpu' or a slug of the GPU name ('nvidia-h100-80gb-hbm3'), used in result file names."""
    if device_id is None:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device_id).lower()).strip("-")


def measure_loader(background_urls, bank, paste: PasteConfig, batch_size: int, batches: int,
                   device_id: int | None, num_threads: int, warmup: int = 2,
                   workers: int = 2) -> dict:
    """Images/s and pasted instances/s of the loader over `batches` batches after a warm-up;
    also images per CPU-second of the process (all threads): a per-core figure that holds when
    other processes share the cores. The warm-up includes filling the instance pool, if any."""
    loader = CopyPasteLoader(background_urls, bank, paste, batch_size=batch_size,
                             device_id=device_id, num_threads=num_threads, workers=workers)
    images = pasted = 0
    started = None
    for n, batch in enumerate(_forever(loader)):
        if n == warmup:
            _sync(device_id)
            started, cpu_started = time.perf_counter(), process_tree_cpu()
        elif n > warmup:
            images += len(batch.targets)
            pasted += int(batch.plan.active[:len(batch.targets)].sum())
        if n == warmup + batches:
            break
    _sync(device_id)
    seconds, cpu_seconds = time.perf_counter() - started, process_tree_cpu() - cpu_started
    loader.close()
    return {"images_per_s": images / seconds, "instances_per_s": pasted / seconds,
            "images_per_cpu_s": images / cpu_seconds, "images": images, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "stats": loader.stats()}


def measure_feed(background_urls, bank, paste: PasteConfig, batch_size: int, batches: int,
                 workers: int, warmup: int = 2, categories: str | None = None) -> dict:
    """The host feed alone: everything the loader does on the CPU per image when compositing
    runs on the GPU (read, check, parse, plan, fetch instance bytes, decode alphas, unpack real
    masks), through the same DALI parallel external source and worker processes, with the
    background decode and the compositor left out. `cpu_seconds` counts the worker processes
    too."""
    from nvidia.dali import fn, pipeline_def

    loader = CopyPasteLoader(background_urls, bank, paste, batch_size=batch_size,
                             workers=workers, categories=categories)
    source = loader.source            # the same host work in GPU and CPU mode
    total = batch_size * (warmup + batches)
    source.set_run(0, 0, batch_size, 0, 1, total)
    # (a run longer than the epoch reads on: positions past its end wrap to its start)

    @pipeline_def
    def feed():
        parallel = {"parallel": True, "prefetch_queue_depth": loader.config.worker_prefetch} \
            if workers else {}
        outs = fn.external_source(source=source, num_outputs=len(WIRE), batch=False,
                                  **parallel)
        return tuple(outs)

    pipe = feed(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=2,
                py_num_workers=max(1, workers), py_start_method="fork")
    if workers:
        pipe.start_py_workers()
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    started, cpu0 = time.perf_counter(), process_tree_cpu()
    for _ in range(batches):
        pipe.run()
    seconds, cpu_seconds = time.perf_counter() - started, process_tree_cpu() - cpu0
    del pipe                          # stops its worker processes
    loader.close()
    images = batch_size * batches
    return {"images_per_s": images / seconds, "images_per_cpu_s": images / cpu_seconds,
            "images": images, "seconds": seconds, "cpu_seconds": cpu_seconds, "workers": workers}


def process_tree_cpu() -> float:
    """CPU seconds (user + system) of this process and its live descendants.

    This process by `time.process_time()` (all threads, nanosecond clock), so a short quick-mode
    run never measures zero; descendants (DALI's worker processes) from Linux /proc, in clock
    ticks. A descendant that exits or hides its /proc entry adds nothing rather than failing."""
    return time.process_time() + sum(_own_ticks(pid) for pid in _descendants(os.getpid())) \
        / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _own_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


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


def measure_decode_lsj(background_urls, size: int, batch_size: int, batches: int,
                       device_id: int | None, num_threads: int, warmup: int = 2) -> dict:
    """The loader's ceiling: DALI reads, decodes and LSJs (scale 0.1-2.0, S x S crop, flip)
    the same shards on the same device, and nothing else; per wall and CPU second."""
    paths = urlmod.expand(background_urls)
    pipe = decode_lsj_pipeline(paths=paths, index_paths=[dali_index_path(p) for p in paths],
                               gpu=device_id is not None, size=size, batch_size=batch_size,
                               num_threads=num_threads, device_id=device_id)
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    _sync(device_id)
    started, cpu0 = time.perf_counter(), process_tree_cpu()
    for _ in range(batches):
        pipe.run()
    _sync(device_id)
    seconds, cpu_seconds = time.perf_counter() - started, process_tree_cpu() - cpu0
    images = batch_size * batches
    return {"images_per_s": images / seconds, "images_per_cpu_s": images / cpu_seconds,
            "images": images, "seconds": seconds, "cpu_seconds": cpu_seconds}


def cores_in_use(num_threads: int) -> int:
    return max(1, min(num_threads, os.cpu_count() or 1))


def _forever(loader):
    while True:
        yield from loader


def _sync(device_id: int | None) -> None:
    if device_id is not None:
        torch.cuda.synchronize(device_id)
