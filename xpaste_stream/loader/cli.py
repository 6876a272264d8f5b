"""`xpaste-stream demo` and `xpaste-stream bench loader`."""

from __future__ import annotations

import json
import os
import time

from .config import PasteConfig


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="build procedural data, stream composited batches, write a preview grid",
        description="Builds a small procedural data set (backgrounds + instance bank) in WORKDIR, "
                    "streams composited batches through the DALI loader and writes a PNG grid "
                    "of samples with mask outlines and labels, plus a stats JSON.")
    demo.add_argument("--workdir", default="./runs/demo")
    demo.add_argument("--batches", type=int, default=20)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--size", type=int, default=512, help="output side after LSJ (paper: 1024)")
    demo.add_argument("--device", type=int, default=None, help="GPU id; CPU when omitted")
    demo.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    demo.add_argument("--blending", choices=["hard", "alpha", "gaussian"], default="hard")
    demo.add_argument("--seed", type=int, default=0)
    # A short demo pastes about as many instances as a pool would decode to fill itself:
    # measured on 2 cores at 512, 39-42 images/s on demand vs 35-37 with a 1024 pool.
    demo.add_argument("--pool", type=int, default=0,
                      help="decoded instances kept in a pool (pays off on long runs; "
                           "see loader/pool.py); 0: decode on demand")
    demo.add_argument("--pool-refresh", type=float, default=0.25,
                      help="fraction of a batch's pastes replaced by fresh draws in the pool")
    demo.set_defaults(func=run_demo)

    bench = subparsers.add_parser("bench", help="throughput benchmarks")
    what = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    loader = what.add_parser("loader", help="loader images/s vs a decode-only DALI pipeline",
                             description="Measures the loader and a decode-only DALI pipeline on "
                                         "the same shards and device; writes "
                                         "benchmarks/results/loader-vs-decode-DEVICE.json "
                                         "(benchmarks/bench_loader.py adds the CPU baselines).")
    loader.add_argument("--workdir", default="./runs/demo", help="demo data (built if missing)")
    loader.add_argument("--backgrounds", default=None, help="background shard URLs (brace pattern)")
    loader.add_argument("--bank", default=None)
    loader.add_argument("--size", type=int, default=640)
    loader.add_argument("--batches", type=int, default=20)
    loader.add_argument("--batch-size", type=int, default=16)
    loader.add_argument("--device", type=int, default=None, help="GPU id; CPU when omitted")
    loader.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    loader.add_argument("--out", default="benchmarks/results")
    loader.set_defaults(func=run_bench)


def demo_data(workdir: str, seed: int = 0) -> dict:
    """The procedural data set of `make_demo_data`, built once per workdir."""
    from ..pipeline import make_demo_data

    return make_demo_data(workdir, seed=seed)


def run_demo(args) -> int:
    from tqdm import tqdm

    from .loader import CopyPasteLoader
    from .preview import save_grid

    data = demo_data(args.workdir, args.seed)
    paste = PasteConfig(output_size=args.size, blending=args.blending, instance_pool=args.pool,
                        instance_pool_refresh=args.pool_refresh)
    loader = CopyPasteLoader(data["backgrounds"], data["bank"], paste, categories=data["categories"],
                             batch_size=args.batch_size, device_id=args.device,
                             num_threads=args.threads, seed=args.seed)
    names = {c["id"]: c["name"] for c in loader.categories_doc["categories"]}
    first, images, pasted = None, 0, 0
    started = time.perf_counter()
    with tqdm(total=args.batches, desc="composited batches", unit="batch") as bar:
        while bar.n < args.batches:
            for batch in loader:
                first = first or batch
                images += len(batch.targets)
                pasted += sum(int(t["source"].sum()) for t in batch.targets)
                bar.update()
                if bar.n >= args.batches:
                    break
    seconds = time.perf_counter() - started
    grid = os.path.join(args.workdir, "demo-grid.png")
    save_grid(first, names, grid)
    stats = {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2),
             "pasted_instances_per_s": round(pasted / seconds, 2), "output_size": args.size,
             "instance_pool": args.pool, "instance_pool_refresh": args.pool_refresh,
             "device": "cpu" if args.device is None else f"cuda:{args.device}",
             "counters": loader.stats(), "grid": grid}
    with open(os.path.join(args.workdir, "demo-stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"{images} images in {seconds:.1f} s: {stats['images_per_s']} images/s, "
          f"{stats['pasted_instances_per_s']} pasted instances/s (kept after occlusion)")
    print(f"grid: {grid}\nstats: {os.path.join(args.workdir, 'demo-stats.json')}")
    return 0


def run_bench(args) -> int:
    from .bench import device_name, measure_decode_only, measure_loader

    if args.backgrounds and args.bank:
        backgrounds, bank = args.backgrounds, args.bank
    else:
        data = demo_data(args.workdir)
        backgrounds, bank = data["backgrounds"], data["bank"]
    paste = PasteConfig(output_size=args.size)
    loader = measure_loader(backgrounds, bank, paste, args.batch_size, args.batches, args.device,
                            args.threads)
    ceiling = measure_decode_only(backgrounds, args.batch_size, args.batches, args.device, args.threads)
    device = device_name(args.device)
    result = {"device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {"output_size": args.size, "pastes": f"U{{0..{paste.max_pastes}}}",
                           "batch_size": args.batch_size, "batches": args.batches,
                           "threads": args.threads, "blending": paste.blending},
              "figures": {"loader": loader, "decode_only": ceiling},
              "ratios": {"loader_vs_decode_only": loader["images_per_s"] / ceiling["images_per_s"]}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"loader-vs-decode-{device}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"loader {loader['images_per_s']:.1f} images/s, decode-only {ceiling['images_per_s']:.1f} "
          f"images/s, ratio {result['ratios']['loader_vs_decode_only']:.2f} -> {path}")
    return 0
