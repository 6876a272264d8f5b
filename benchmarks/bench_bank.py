"""Benchmark the instance bank: index build, bytes per instance, draws/s, random reads/s.

    python benchmarks/bench_bank.py [--instances 1000000] [--workers 2] [--quick]

Writes synthetic instance shards (benchmarks/synthetic.py: a few tiny 8x8 instances built by
`formats.instance_sample` and repeated with distinct keys; category counts Zipf-like over 1203
LVIS-sized categories), indexes them, times the samplers and random reads, and writes
benchmarks/results/bank-cpu.json (`--quick`: 20k instances, a temp file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # noqa: E402  (benchmarks/synthetic.py)

from xpaste_stream.bank import InstanceBank, build_index, make_sampler  # noqa: E402

TARGETS = {"bytes_per_instance": 32, "build_seconds_1m": 60, "draws_per_second": 1_000_000}
RESULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bank-cpu.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=1_000_000)
    p.add_argument("--per-shard", type=int, default=1000, help="instances per shard")
    p.add_argument("--categories", type=int, default=1203)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reads", type=int, default=20_000, help="random read() calls to time")
    p.add_argument("--draw-batch", type=int, default=4096)
    p.add_argument("--draw-seconds", type=float, default=1.0, help="time spent per sampler kind")
    p.add_argument("--workdir", default=None, help="where shards and bank go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the shards and bank")
    p.add_argument("--out", default=None, help=f"result file (default {RESULT}; with --quick a temp file)")
    p.add_argument("--quick", action="store_true",
                   help="the whole path on 20k instances in seconds; never writes the recorded figures")
    args = p.parse_args()
    if args.quick:
        from quickmode import one_thread

        one_thread()
        args.instances, args.reads, args.draw_seconds = 20_000, 2_000, 0.05
    args.out = args.out or (quick_result_path("bank-cpu") if args.quick else RESULT)
    return args


def quick_result_path(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"{name}-quick.json")


# -- synthetic shards ---------------------------------------------------------------------------


def write_shards(workdir: str, n: int, per_shard: int, num_categories: int, workers: int) -> list[str]:
    return synthetic.write_instance_shards(workdir, synthetic.longtail_categories(n, num_categories),
                                           per_shard, workers)


# -- measurements --------------------------------------------------------------------------------


def draws_per_second(bank: InstanceBank, batch: int, seconds: float, num_categories: int) -> dict:
    meta = {"categories": [{"id": c, "repeat_factor": 1.0 + (c % 30) / 3}
                           for c in range(1, num_categories + 1)]}
    weights = {int(c): float(c % 7 + 1) for c in bank.category_ids}
    kinds = {"cas": {}, "instance": {}, "repeat_factor": {"category_meta": meta},
             "weights": {"weights": weights}}
    out = {}
    for kind, extra in kinds.items():
        sampler = make_sampler(bank, kind, seed=0, **extra)
        sampler.draw(batch)  # warm-up
        draws, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            sampler.draw(batch)
            draws += batch
        out[kind] = round(draws / (time.perf_counter() - started))
    return out


def reads_per_second(bank: InstanceBank, reads: int) -> float:
    ids = np.random.default_rng(2).integers(0, bank.num_instances, reads)
    bank.read(int(ids[0]))
    started = time.perf_counter()
    for iid in ids.tolist():
        bank.read(iid)
    return round(reads / (time.perf_counter() - started))


def main() -> None:
    args = parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-bank-")
    os.makedirs(workdir, exist_ok=True)
    try:
        started = time.perf_counter()
        paths = write_shards(workdir, args.instances, args.per_shard, args.categories, args.workers)
        write_s = time.perf_counter() - started
        shard_bytes = sum(os.path.getsize(p) for p in paths)
        print(f"wrote {args.instances:,} instances in {len(paths)} shards ({shard_bytes / 2**30:.2f} GiB) "
              f"in {write_s:.1f} s")

        bank_dir = os.path.join(workdir, "bank")
        started = time.perf_counter()
        summary = build_index(paths, bank_dir, workers=args.workers, progress=False)
        build_s = time.perf_counter() - started
        assert summary["instances"] == args.instances, summary
        started = time.perf_counter()
        rebuild = build_index(paths, bank_dir, workers=args.workers, progress=False)
        rebuild_s = time.perf_counter() - started
        assert not rebuild["shards_read"]
        print(f"index: {build_s:.1f} s, {summary['bytes_per_instance']} bytes/instance; "
              f"unchanged rebuild {rebuild_s:.1f} s")

        bank = InstanceBank.open(bank_dir)
        draws = draws_per_second(bank, args.draw_batch, args.draw_seconds, args.categories)
        reads = reads_per_second(bank, args.reads)
        print(f"draws/s {draws}; random reads/s {reads:,}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    scale = 1_000_000 / args.instances
    figures = {"build_seconds": round(build_s, 2), "build_seconds_per_1m": round(build_s * scale, 2),
               "instances_per_second_indexed": round(args.instances / build_s),
               "rebuild_unchanged_seconds": round(rebuild_s, 2),
               "bytes_per_instance": summary["bytes_per_instance"],
               "draws_per_second": draws, "random_reads_per_second": reads,
               "shard_write_seconds": round(write_s, 2), "shard_bytes": shard_bytes}
    ratios = {"bytes_per_instance": round(figures["bytes_per_instance"] / TARGETS["bytes_per_instance"], 3),
              "build_seconds_1m": round(figures["build_seconds_per_1m"] / TARGETS["build_seconds_1m"], 3)}
    ratios.update({f"draws_per_second.{k}": round(v / TARGETS["draws_per_second"], 2)
                   for k, v in draws.items()})
    result = {"benchmark": "bank", "device": f"cpu: {synthetic.cpu_model()}, {os.cpu_count()} cores",
              "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "keep", "out")}
              | {"page_cache": "warm (shards just written)", "payload": "8x8 jpg q50 + mask.lz4"},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "figures": figures, "targets": TARGETS, "ratios": ratios,
              "notes": "ratios are figure/target: <= 1 is good for bytes and seconds, >= 1 for draws/s"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
