"""Loader throughput side by side with copy-paste baselines; one command:

    python benchmarks/bench_loader.py            # CPU; adds GPU rows when CUDA is available

On CPU, images/s at 640 LSJ with U{0..19} pastes, and per core (wall images/s / cores, and
images per CPU-second of the process and its workers, which holds when other jobs share the
cores), of: the loader (--workers sample-function processes) | (a) per-image original-style
copy-paste | (b) batch torch copy-paste | (c) decode-only DALI pipeline (the ceiling); and the
loader with U{0..K} pastes for K = 1, 5, 19 (how the cost grows with the pastes). Loader runs
are repeated (--repeats) and the fastest is kept.
On a GPU also the loader and decode-only at 640 and 1024, with the ratios.
Writes benchmarks/results/loader-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loader_baselines import BatchTorchCopyPaste, PerImageCopyPaste, planned_work  # noqa: E402

from xpaste_stream.loader import CopyPasteLoader, PasteConfig  # noqa: E402
from xpaste_stream.loader.bench import (  # noqa: E402
    device_name,
    measure_decode_only,
    measure_loader,
)
from xpaste_stream.loader.cli import demo_data  # noqa: E402


def baselines(backgrounds, bank, paste: PasteConfig, batch_size: int, batches: int) -> dict:
    """(a) per-image and (b) batch-torch copy-paste, single-threaded, on the loader's plans."""
    torch.set_num_threads(1)
    planner = CopyPasteLoader(backgrounds, bank, paste, batch_size=batch_size, num_threads=1,
                              workers=0)
    work = planned_work(planner, batches)
    per_image, batch_torch = PerImageCopyPaste(paste), BatchTorchCopyPaste(paste)
    images = sum(len(bgs) for bgs, _, _ in work)

    started, cpu = time.perf_counter(), time.process_time()
    for bgs, plan, payloads in work:
        for i, bg in enumerate(bgs):
            per_image(bg, plan, i, payloads[i])
    per_image_s, per_image_cpu = time.perf_counter() - started, time.process_time() - cpu

    started, cpu = time.perf_counter(), time.process_time()
    for bgs, plan, payloads in work:
        batch_torch(bgs, plan, payloads)
    batch_s, batch_cpu = time.perf_counter() - started, time.process_time() - cpu
    # both exclude reading and planning (done above), which the loader's figure includes
    return {"per_image_original": {"images_per_s": images / per_image_s,
                                   "images_per_cpu_s": images / per_image_cpu, "images": images,
                                   "cores": 1},
            "batch_torch": {"images_per_s": images / batch_s, "images_per_cpu_s": images / batch_cpu,
                            "images": images, "cores": 1}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="./runs/bench-loader")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per CPU measurement")
    parser.add_argument("--gpu-batches", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--repeats", type=int, default=2, help="loader runs per setting (fastest kept)")
    parser.add_argument("--backgrounds", help="background shards (default: make_demo_data's)")
    parser.add_argument("--bank", help="instance bank folder (with --backgrounds)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    if args.backgrounds and args.bank:
        backgrounds, bank, source = args.backgrounds, args.bank, args.backgrounds
    else:
        data = demo_data(args.workdir)
        backgrounds, bank, source = data["backgrounds"], data["bank"], "make_demo_data procedural set"
    cores = os.cpu_count() or 1
    paste = PasteConfig(output_size=640)
    figures: dict = {}
    print(f"CPU, {cores} cores, 640 LSJ, U{{0..19}} pastes, batch {args.batch_size}")

    def loaders(p: PasteConfig, batch_size: int, batches: int, device_id=None) -> dict:
        """The loader, its fastest of `repeats` runs (other jobs only ever slow a run down)."""
        runs = [measure_loader(backgrounds, bank, p, batch_size, batches, device_id, cores,
                               workers=args.workers) for _ in range(args.repeats)]
        return {"loader": max(runs, key=lambda f: f["images_per_s"])}

    figures["cpu_640"] = {
        **{name: {**f, "cores": cores} for name, f in loaders(paste, args.batch_size, args.batches).items()},
        "decode_only": {**measure_decode_only(backgrounds, args.batch_size, args.batches, None, cores),
                        "cores": cores},
        **baselines(backgrounds, bank, paste, args.batch_size, max(2, args.batches // 2)),
    }
    for f in figures["cpu_640"].values():
        f["images_per_s_per_core"] = f["images_per_s"] / f["cores"]
    figures["cpu_640_max_pastes"] = {}
    for k in (1, 5, 19):
        for name, f in loaders(PasteConfig(output_size=640, max_pastes=k), args.batch_size,
                               args.batches).items():
            figures["cpu_640_max_pastes"][f"U{{0..{k}}} {name}"] = f
    cpu = figures["cpu_640"]
    ratios = {}
    for name in ("loader",):
        for base in ("per_image_original", "batch_torch"):
            ratios[f"cpu_{name}_vs_{base}_per_core"] = (cpu[name]["images_per_s_per_core"]
                                                         / cpu[base]["images_per_s_per_core"])
            ratios[f"cpu_{name}_vs_{base}_per_cpu_s"] = (cpu[name]["images_per_cpu_s"]
                                                          / cpu[base]["images_per_cpu_s"])
        ratios[f"cpu_{name}_vs_decode_only"] = cpu[name]["images_per_s"] / cpu["decode_only"]["images_per_s"]
    device = "cpu"
    if torch.cuda.is_available():
        device = device_name(0)
        for size in (640, 1024):
            gpu_paste = PasteConfig(output_size=size)
            both = loaders(gpu_paste, 32, args.gpu_batches, 0)
            ceiling = measure_decode_only(backgrounds, 32, args.gpu_batches, 0, cores)
            figures[f"gpu_{size}"] = {**both, "decode_only": ceiling}
            for name, f in both.items():
                ratios[f"gpu_{size}_{name}_vs_decode_only"] = f["images_per_s"] / ceiling["images_per_s"]
    result = {"device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {"output_size_cpu": 640, "pastes": "U{0..19}", "blending": "hard",
                           "batch_size_cpu": args.batch_size, "timed_batches_cpu": args.batches,
                           "cpu_cores": cores, "loader_threads": cores, "data": source,
                           "workers": args.workers, "loader_repeats": args.repeats,
                           "loader": "box-local paste slot by slot, empty slots skipped by DALI "
                                     "conditionals, id map + placed rows/columns to torch "
                                     "(xpaste_stream/loader/pipeline.py); instances resized "
                                     "bilinearly without antialiasing, as cv2.resize; host work "
                                     "(sample.py) in `workers` processes; targets with 1 torch "
                                     "thread",
                           "baselines": "single-threaded, exclude reading/planning (given the "
                                        "loader's plans); the loader's figure includes them",
                           "per_core": "images_per_s_per_core = wall images/s / cores; "
                                       "images_per_cpu_s = images / process CPU seconds"},
              "figures": figures, "ratios": ratios}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"loader-{device}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    for name, f in figures.items():
        for what, v in f.items():
            per_cpu = f"{v['images_per_cpu_s']:8.1f} images/cpu-s" if "images_per_cpu_s" in v else ""
            print(f"{name:18s} {what:26s} {v['images_per_s']:8.1f} images/s {per_cpu}")
    for name, v in ratios.items():
        print(f"{name}: {v:.2f}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
