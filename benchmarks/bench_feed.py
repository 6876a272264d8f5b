"""Host feed and whole loader, loader v2 side by side with the previous version (v1), one run.

    python3 benchmarks/bench_feed.py [--images 256] [--batches 20] [--size 640] [--quick]

Data: procedural backgrounds of LVIS density (640x480, U{0..24} objects, ~12 per image, polygon
and RLE masks) packed by each version's own pack-coco, and each version's own demo bank (20
categories). v1 is the commit before loader v2 (`V1_COMMIT`), checked out with `git worktree`
and run in a subprocess with its own code. Figures:
- feed: everything the loader does on the host per image in GPU mode. v2: the sample function
  in 1 and 2 DALI worker processes (bench.measure_feed); v1: its single producer thread
  (`planned_batches`: DALI reader, full-resolution RLE decode, plan, instance bytes);
- loader: the whole loader on the CPU (compositing included), images/s and per CPU-second.
Writes benchmarks/results/loader-feed-cpu.json. `--quick`: v2's whole path on 8 images,
2 batches of 4 (feed) and 2 (loader) at 128 px in a temp folder, v1 left out (its checkout and data
take minutes), a temp result file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without installing
V1_COMMIT = "a48d8b8"  # the last commit with the single-producer loader
# --quick: the demo data (bank and its shards) at its smallest; bench_loader.py --quick too
QUICK_DEMO = {"num_categories": 4, "instances_per_category": 5, "num_backgrounds": 8, "image_size": 128}

DATA = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from xpaste_stream import cli
    from xpaste_stream.generate.procedural import SceneSpec, category_names, write_scene_dataset
    from xpaste_stream.pipeline import make_demo_data
    work = sys.argv[1]
    demo = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # smaller demo data (--quick)
    bank = make_demo_data(os.path.join(work, "demo"), progress=False, **demo)
    ann = write_scene_dataset(os.path.join(work, "scenes"), category_names(20),
                              SceneSpec(num_images=int(sys.argv[2]), image_size=(480, 640),
                                        max_objects=24, seed=7))
    out = os.path.join(work, "bg", "bg-{shard:06d}.tar")
    if not os.path.exists(os.path.join(work, "bg")):  # the command, without a process of its own
        said = io.StringIO()
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            code = cli.main(["pack-coco", ann, os.path.join(work, "scenes", "images"), "-o", out,
                             "--maxcount", "64"])
        if code:
            raise SystemExit(f"pack-coco failed ({code}):\\n{said.getvalue()[-3000:]}")
    print(bank["bank"])
""")

V1_MEASURE = textwrap.dedent("""
    import glob, json, os, sys, time
    from xpaste_stream.loader import CopyPasteLoader, PasteConfig
    from xpaste_stream.loader.bench import measure_loader
    work, size, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    urls = sorted(glob.glob(os.path.join(work, "bg", "bg-*.tar")))
    bank = os.path.join(work, "demo", "bank")
    loader = CopyPasteLoader(urls, bank, PasteConfig(output_size=size), batch_size=16)
    loader.planned_batches(2)
    started, cpu = time.perf_counter(), time.process_time()
    done = loader.planned_batches(batches)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    images = sum(len(b[0]) for b in done)
    feed = {"images_per_s": images / seconds, "images_per_cpu_s": images / cpu_s,
            "images": images, "seconds": seconds, "cpu_seconds": cpu_s, "workers": "1 thread"}
    whole = measure_loader(urls, bank, PasteConfig(output_size=size), 8, batches // 2, None, 2)
    whole.pop("stats")
    print(json.dumps({"feed": feed, "loader": whole}))
""")


def run(code: str, *args, pythonpath: str | None = None) -> str:
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, text=True,
                          capture_output=True, cwd=pythonpath or ROOT)
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def run_here(code: str, *args, cwd: str = ROOT) -> str:
    """`run` in this process (--quick, this checkout's code): the same script and arguments, its
    last printed line returned, without a Python and torch start-up per step."""
    out, argv, where = io.StringIO(), sys.argv, os.getcwd()
    sys.argv = ["-c", *map(str, args)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<benchmark step>", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
        os.chdir(where)
    return out.getvalue().strip().splitlines()[-1]


def v1_checkout(path: str) -> str:
    if not os.path.exists(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, V1_COMMIT],
                       check=True, capture_output=True)
    return path


def measure_v1(args, v1_work: str) -> dict:
    v1_root = v1_checkout(os.path.join(args.workdir, "v1-src"))
    run(DATA, v1_work, args.images, pythonpath=v1_root)
    return json.loads(run(V1_MEASURE, v1_work, args.size, args.batches, pythonpath=v1_root))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--workdir", default=None, help="default runs/bench-feed (--quick: a temp folder)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/loader-feed-cpu.json "
                                               "(--quick: a temp file)")
    ap.add_argument("--quick", action="store_true",
                    help="v2 only, 8 images, 2 small batches at 128 px, temp folder: checks the path, "
                         "records nothing")
    args = ap.parse_args()
    if args.quick:
        from quickmode import one_thread

        one_thread()
        args.images, args.batches, args.size = 8, 2, 128
        with tempfile.TemporaryDirectory(prefix="bench-feed-") as tmp:
            args.workdir = tmp
            args.out = args.out or os.path.join(tempfile.gettempdir(), "loader-feed-cpu-quick.json")
            return measure(args)
    args.workdir = args.workdir or os.path.join(ROOT, "runs", "bench-feed")
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", "loader-feed-cpu.json")
    return measure(args)


def measure(args) -> int:
    from xpaste_stream.loader import PasteConfig
    from xpaste_stream.loader.bench import measure_feed, measure_loader

    v1_work, v2_work = os.path.join(args.workdir, "v1"), os.path.join(args.workdir, "v2")
    for work in (v1_work, v2_work):  # each version writes its own data, afresh
        shutil.rmtree(work, ignore_errors=True)
    demo = QUICK_DEMO if args.quick else {}
    bank = (run_here if args.quick else run)(DATA, v2_work, args.images,
                                              *([json.dumps(demo)] if demo else []))
    urls = os.path.join(v2_work, "bg", "bg-*.tar")
    paste = PasteConfig(output_size=args.size)
    v1 = None if args.quick else measure_v1(args, v1_work)
    feed_batch, loader_batch = (4, 2) if args.quick else (16, 8)  # v1's (V1_MEASURE) in full runs
    feed = {f"v2_{w}_workers": measure_feed(urls, bank, paste, feed_batch, args.batches, w)
            for w in (1, 2)}
    whole = measure_loader(urls, bank, paste, loader_batch, args.batches // 2, None, 2, workers=2)
    whole.pop("stats")
    f1, f2 = feed["v2_1_workers"], feed["v2_2_workers"]
    v1 = v1 or {"feed": f1, "loader": whole}  # --quick: no v1; ratios against v2 itself
    result = {
        "device": "cpu", "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"output_size": args.size, "pastes": "U{0..19}", "backgrounds": args.images,
                     "background_size": "640x480", "objects_per_image": "U{0..24}",
                     "feed_batch_size": feed_batch, "loader_batch_size": loader_batch,
                     "batches": args.batches,
                     "v1_commit": V1_COMMIT},
        "feed": {"v1_single_producer": v1["feed"], **feed},
        "loader": {"v1": v1["loader"], "v2_2_workers": whole},
        "ratios": {
            "feed_v2_1_worker_per_core_vs_v1": f1["images_per_cpu_s"] / v1["feed"]["images_per_cpu_s"],
            "feed_scaling_1_to_2_workers": f2["images_per_s"] / f1["images_per_s"],
            "feed_v2_2_workers_vs_v1": f2["images_per_s"] / v1["feed"]["images_per_s"],
            "loader_v2_vs_v1_images_per_s": whole["images_per_s"] / v1["loader"]["images_per_s"],
            "loader_v2_vs_v1_per_cpu_s": whole["images_per_cpu_s"] / v1["loader"]["images_per_cpu_s"],
        }}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"feed_images_per_s": {k: round(v["images_per_s"], 1) for k, v in
                                            result["feed"].items()},
                      "ratios": {k: round(v, 2) for k, v in result["ratios"].items()}}, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
