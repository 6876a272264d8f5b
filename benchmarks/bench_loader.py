"""The loader side by side with the previous loader (v2, commit 94e2bdc) and its ceiling; one command:

    python3 benchmarks/bench_loader.py [--quick] [--sizes 640 1024] [--rounds 3]

Data: procedural backgrounds of LVIS density (640x480, U{0..24} objects, ~12 per image, polygon
and RLE masks, packed by pack-coco) and the demo bank; both loaders read the same shards. The
previous loader runs from a `git worktree` of `PREVIOUS_COMMIT` in a subprocess with its own
code. Per size (LSJ 0.1-2.0 to S x S, U{0..19} pastes, hard blending, 2 worker processes):
- `loader` / `previous`: images/s, images per CPU-second (this process, its threads and its
  worker processes), pasted instances per image; runs interleaved (previous, new, previous,
  ...) `--rounds` times, medians kept;
- `ceiling`: DALI read + decode + LSJ only, on the same shards and device;
- `compositor`: the batched paste alone (composite.paste_batch, timed inside the loader on its
  real batches): nanoseconds per pasted pixel (a pixel of a resized instance), CPU time of
  the one thread that runs it (wall time between synchronisations on a GPU).
On a GPU (CUDA available) the same rows run there (`--device 0`) too.
X-Paste's own CopyPasteMapper was measured from outside on this kind of machine (issue 15:
3.21 images per CPU-second at 640, 0.85 at 1024, same density): the ratios to it are given.
Writes benchmarks/results/loader-<device>.json (with --quick: a temporary file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PREVIOUS_COMMIT = "94e2bdc"          # loader v2: the per-slot DALI compositing graph
XPASTE_IMAGES_PER_CPU_S = {640: 3.21, 1024: 0.85}  # X-Paste's CopyPasteMapper, issue 15

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_feed import DATA, QUICK_DEMO, run_here  # noqa: E402  (the same data, one script)

# run with either version's code on PYTHONPATH: its own CopyPasteLoader and measure_loader
MEASURE = textwrap.dedent("""
    import json, os, sys
    from xpaste_stream.loader import PasteConfig
    from xpaste_stream.loader.bench import measure_loader
    urls, bank, size, batch, batches, workers = sys.argv[1:7]
    device = None if sys.argv[7] == "cpu" else int(sys.argv[7])
    f = measure_loader(urls, bank, PasteConfig(output_size=int(size)), int(batch), int(batches),
                       device, os.cpu_count(), workers=int(workers))
    f.pop("stats")
    print(json.dumps(f))
""")

# the new loader with its compositor timed on the loader's own batches
COMPOSITOR = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from xpaste_stream.loader import PasteConfig, loader as loader_module
    from xpaste_stream.loader.bench import measure_loader
    from xpaste_stream.loader.composite import C_H, C_W
    urls, bank, size, batch, batches, workers = sys.argv[1:7]
    device = None if sys.argv[7] == "cpu" else int(sys.argv[7])
    timed = {"seconds": 0.0, "pixels": 0, "calls": 0}
    paste_batch = loader_module.paste_batch

    def timed_paste(canvas, table, *args, **kw):
        # CPU: this thread's CPU time (the kernels are single-threaded; other jobs sharing the
        # cores do not count); GPU: wall time between synchronisations
        clock = time.perf_counter if canvas.is_cuda else time.thread_time
        if canvas.is_cuda:
            torch.cuda.synchronize()
        started = clock()
        out = paste_batch(canvas, table, *args, **kw)
        if canvas.is_cuda:
            torch.cuda.synchronize()
        timed["seconds"] += clock() - started
        timed["pixels"] += int((table[:, C_H] * table[:, C_W]).sum())
        timed["calls"] += 1
        return out

    loader_module.paste_batch = timed_paste
    measure_loader(urls, bank, PasteConfig(output_size=int(size)), int(batch), 1, device, 1,
                   warmup=1, workers=int(workers))          # compiles, warms up
    for k in timed:
        timed[k] = 0
    f = measure_loader(urls, bank, PasteConfig(output_size=int(size)), int(batch), int(batches),
                       device, 1, warmup=0, workers=int(workers))
    print(json.dumps({"ns_per_pasted_pixel": 1e9 * timed["seconds"] / max(timed["pixels"], 1),
                      "pasted_pixels_per_image": timed["pixels"] / max(f["images"], 1),
                      "ms_per_image": 1e3 * timed["seconds"] / max(f["images"], 1),
                      "batches": timed["calls"]}))
""")


def run(code: str, *args, pythonpath: str = ROOT) -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, text=True,
                          capture_output=True, cwd=pythonpath)
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def run_new(code: str, *args, quick: bool) -> str:
    """A step with this checkout's code: in a process of its own, or with --quick in this one."""
    if not quick:
        return run(code, *args)
    from xpaste_stream.loader import loader as loader_module

    paste_batch = loader_module.paste_batch  # COMPOSITOR replaces it with a timed one
    try:
        return run_here(code, *args)
    finally:
        loader_module.paste_batch = paste_batch


def previous_checkout(path: str) -> str:
    """A git worktree of PREVIOUS_COMMIT (made once, reused)."""
    if not os.path.exists(os.path.join(path, "xpaste_stream")):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--force", "--detach", path,
                        PREVIOUS_COMMIT], check=True, capture_output=True)
    return path


def median_of(runs: list[dict]) -> dict:
    keys = ("images_per_s", "images_per_cpu_s", "instances_per_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["pasted_per_image"] = statistics.median(r["instances_per_s"] / r["images_per_s"] for r in runs)
    out["runs"] = runs
    return out


def measure_size(size: int, urls: str, bank: str, previous_root: str | None, args, device: str) -> dict:
    """Every row of one size, loader runs interleaved with the previous loader's."""
    from xpaste_stream.loader.bench import measure_decode_lsj

    batch = args.batch_size if device == "cpu" else 32
    common = (urls, bank, size, batch, args.batches, args.workers, device)
    here = args.quick and device == "cpu"  # --quick: CPU rows in this process, GPU rows as in full
    new, old = [], []
    for _ in range(args.rounds):
        if previous_root:
            old.append(json.loads(run(MEASURE, *common, pythonpath=previous_root)))
        new.append(json.loads(run_new(MEASURE, *common, quick=here)))
    row = {"loader": median_of(new)}
    if old:
        row["previous"] = median_of(old)
    device_id = None if device == "cpu" else int(device)
    row["ceiling"] = measure_decode_lsj(urls, size, batch, args.batches, device_id, os.cpu_count())
    row["compositor"] = json.loads(run_new(COMPOSITOR, *common, quick=here))
    loader = row["loader"]
    ratios = {"vs_ceiling": loader["images_per_s"] / row["ceiling"]["images_per_s"]}
    if old:
        ratios["vs_previous_per_cpu_s"] = loader["images_per_cpu_s"] / row["previous"]["images_per_cpu_s"]
        ratios["vs_previous_images_per_s"] = loader["images_per_s"] / row["previous"]["images_per_s"]
    if size in XPASTE_IMAGES_PER_CPU_S and device == "cpu":
        ratios["vs_xpaste_per_cpu_s"] = loader["images_per_cpu_s"] / XPASTE_IMAGES_PER_CPU_S[size]
    row["ratios"] = ratios
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny data, one round: checks the path")
    ap.add_argument("--sizes", type=int, nargs="+", default=[640, 1024])
    ap.add_argument("--images", type=int, default=192, help="backgrounds in the data set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=12, help="timed batches per loader run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per loader (medians)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-previous", action="store_true", help="skip the previous loader")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench-loader"))
    ap.add_argument("--out", help="result file (default benchmarks/results/loader-DEVICE.json)")
    args = ap.parse_args()
    if args.quick:   # the whole path on tiny data; the previous loader only in full runs
        from quickmode import one_thread

        one_thread()
        args.sizes, args.images, args.batch_size, args.batches, args.rounds = [128], 8, 2, 2, 1
        args.no_previous, args.workdir = True, args.workdir + "-quick"

    import torch

    from xpaste_stream.loader.bench import device_name

    for part in ("demo", "scenes", "bg"):   # each run writes its data afresh (manifests refuse
        shutil.rmtree(os.path.join(args.workdir, part), ignore_errors=True)   # other versions')
    bank = run_new(DATA, args.workdir, args.images, *([json.dumps(QUICK_DEMO)] if args.quick else []),
                   quick=args.quick)
    urls = os.path.join(args.workdir, "bg", "bg-*.tar")
    previous = None if args.no_previous else previous_checkout(os.path.join(args.workdir, "previous-src"))
    figures, names, devices = {}, {"cpu": "cpu"}, ["cpu"]
    for device in devices:   # the GPU joins after the CPU rows (see the end of the loop)
        if device != "cpu":
            names[device] = device_name(int(device))
        for size in args.sizes:
            row = measure_size(size, urls, bank, previous, args, device)
            figures[f"{names[device]}_{size}"] = row
            print(f"{names[device]} {size}: loader {row['loader']['images_per_s']:.1f} images/s "
                  f"{row['loader']['images_per_cpu_s']:.1f}/cpu-s; "
                  + (f"previous {row['previous']['images_per_cpu_s']:.1f}/cpu-s; "
                     if "previous" in row else "")
                  + f"ceiling {row['ceiling']['images_per_s']:.1f} images/s; compositor "
                  f"{row['compositor']['ns_per_pasted_pixel']:.1f} ns/pasted pixel; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items()), flush=True)
        # asked only now: the question starts the CUDA driver, after which a CPU loader in this
        # process (--quick runs the CPU rows here) could no longer fork its workers
        if device == "cpu" and torch.cuda.is_available():
            devices.append("0")
    device = names[devices[-1]]
    result = {
        "device": device, "cpu_cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"sizes": args.sizes, "pastes": "U{0..19}", "blending": "hard",
                     "lsj": "0.1-2.0, S x S window", "backgrounds": args.images,
                     "background_size": "640x480", "objects_per_image": "U{0..24} (~12)",
                     "batch_size_cpu": args.batch_size, "batch_size_gpu": 32,
                     "timed_batches": args.batches, "rounds": args.rounds, "workers": args.workers,
                     "previous_commit": None if args.no_previous else PREVIOUS_COMMIT,
                     "per_cpu_s": "images / CPU seconds of the loader process, its threads and "
                                  "its worker processes", "quick": args.quick,
                     "xpaste_images_per_cpu_s": XPASTE_IMAGES_PER_CPU_S},
        "figures": figures,
        "ratios": {name: row["ratios"] for name, row in figures.items()}}
    out = args.out or (os.path.join(tempfile.gettempdir(), f"loader-{device}-quick.json") if args.quick
                       else os.path.join(ROOT, "benchmarks", "results", f"loader-{device}.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
