"""`xpaste-stream demo` and `xpaste-stream bench loader`."""

from __future__ import annotations

import json
import os
import time

from ..config import device_index, parse_device
from .config import PasteConfig


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 or less is refused before any work)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="build procedural data, stream composited batches, write a preview grid",
        description="Builds a small procedural data set (backgrounds + instance bank) in WORKDIR, "
                    "streams composited batches through the DALI loader and writes a PNG grid "
                    "of samples with mask outlines and labels, plus a stats JSON.")
    demo.add_argument("--workdir", default="./runs/demo")
    demo.add_argument("--batches", type=positive_int, default=20, help="batches to stream")
    demo.add_argument("--batch-size", type=positive_int, default=8, help="images per batch")
    demo.add_argument("--size", type=positive_int, default=512, help="output side after LSJ (paper: 1024)")
    demo.add_argument("--device", default="cpu", help="where the loader runs")
    demo.add_argument("--threads", type=positive_int, default=os.cpu_count() or 2, help="DALI threads")
    demo.add_argument("--blending", choices=["hard", "alpha", "gaussian"], default="hard")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=2,
                      help="worker processes running the sample function (0: none)")
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
    loader.add_argument("--size", type=positive_int, default=640, help="output side after LSJ")
    loader.add_argument("--batches", type=positive_int, default=20, help="batches measured")
    loader.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    loader.add_argument("--device", default="cpu", help="where the loader runs")
    loader.add_argument("--threads", type=positive_int, default=os.cpu_count() or 2, help="DALI threads")
    loader.add_argument("--workers", type=int, default=2,
                        help="worker processes running the sample function")
    loader.add_argument("--feed-only", action="store_true",
                        help="measure only the host feed (everything but the compositing graph)")
    loader.add_argument("--out", default="benchmarks/results",
                        help="a folder (file name from the device) or a .json file")
    loader.set_defaults(func=run_bench)


def demo_data(workdir: str, seed: int = 0, progress: bool = True) -> dict:
    """The procedural data set of `make_demo_data`, built once per workdir."""
    from ..pipeline import make_demo_data

    return make_demo_data(workdir, seed=seed, progress=progress)


def run_demo(args) -> int:
    from tqdm import tqdm

    from .loader import CopyPasteLoader
    from .preview import save_grid

    device_id = device_index(args.device)
    data = demo_data(args.workdir, args.seed, progress=not args.quiet)
    paste = PasteConfig(output_size=args.size, blending=args.blending)
    loader = CopyPasteLoader(data["backgrounds"], data["bank"], paste, categories=data["categories"],
                             batch_size=args.batch_size, device_id=device_id,
                             num_threads=args.threads, workers=args.workers, seed=args.seed)
    names = {c["id"]: c["name"] for c in loader.categories_doc["categories"]}
    first, images, pasted, batches = None, 0, 0, 0
    started = time.perf_counter()
    with tqdm(total=args.batches, desc="composited batches", unit="batch", disable=args.quiet) as bar:
        while batches < args.batches:
            for batch in loader:
                first = first or batch
                images += len(batch.targets)
                pasted += sum(int(t["source"].sum()) for t in batch.targets)
                batches += 1
                bar.update()
                if batches >= args.batches:
                    break
    seconds = time.perf_counter() - started
    grid = os.path.join(args.workdir, "demo-grid.png")
    save_grid(first, names, grid)
    stats = {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2),
             "pasted_instances_per_s": round(pasted / seconds, 2), "output_size": args.size,
             "workers": args.workers,
             "device": "cpu" if device_id is None else f"cuda:{device_id}",
             "counters": loader.stats(), "grid": grid}
    loader.close()
    with open(os.path.join(args.workdir, "demo-stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"{images} images in {seconds:.1f} s: {stats['images_per_s']} images/s, "
          f"{stats['pasted_instances_per_s']} pasted instances/s (kept after occlusion)")
    print(f"grid: {grid}\nstats: {os.path.join(args.workdir, 'demo-stats.json')}")
    return 0


def run_bench(args) -> int:
    from .bench import device_name, measure_decode_only, measure_feed, measure_loader

    args.device = device_index(parse_device(args.device))  # the benchmarks take a GPU id or None
    if args.backgrounds and args.bank:
        backgrounds, bank = args.backgrounds, args.bank
    else:
        data = demo_data(args.workdir, progress=not args.quiet)
        backgrounds, bank = data["backgrounds"], data["bank"]
    paste = PasteConfig(output_size=args.size)
    device = "cpu" if args.feed_only else device_name(args.device)
    settings = {"output_size": args.size, "pastes": f"U{{0..{paste.max_pastes}}}",
                "batch_size": args.batch_size, "batches": args.batches, "workers": args.workers,
                "threads": args.threads, "blending": paste.blending, "backgrounds": backgrounds}
    result = {"device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": settings}
    if args.feed_only:
        feed = measure_feed(backgrounds, bank, paste, args.batch_size, args.batches, args.workers)
        result.update(feed)
        name, line = "loader-feed", (f"host feed {feed['images_per_s']:.1f} images/s with "
                                     f"{args.workers} workers, {feed['images_per_cpu_s']:.1f} "
                                     "images per CPU-second")
    else:
        loader = measure_loader(backgrounds, bank, paste, args.batch_size, args.batches,
                                args.device, args.threads, workers=args.workers)
        ceiling = measure_decode_only(backgrounds, args.batch_size, args.batches, args.device,
                                      args.threads)
        ratio = loader["images_per_s"] / ceiling["images_per_s"]
        result.update(figures={"loader": loader, "decode_only": ceiling},
                      ratios={"loader_vs_decode_only": ratio})
        name, line = "loader-vs-decode", (f"loader {loader['images_per_s']:.1f} images/s, "
                                          f"decode-only {ceiling['images_per_s']:.1f} images/s, "
                                          f"ratio {ratio:.2f}")
    path = args.out if args.out.endswith(".json") else \
        os.path.join(args.out, f"{name}-{args.size}-{device}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"{line} -> {path}")
    return 0
