"""Scale-out figures, one command:

    python3 benchmarks/bench_scale_out.py [--images-per-category 150] [--batches 20] [--quick]

1. every stage on every executor: pack-coco (procedural scenes, 400 images 640x480), generate
   (procedural, 256 px, 8 categories), extract (plain-background, no CLIP) and index (those
   instance shards, --dedup) with the local executor, 1 vs 2 worker processes, and Ray with 2
   actors when Ray is installed; same settings (fresh folders; two runs each, alternating, the
   fastest kept; process and actor start-up included, as a user pays it);
2. the loader (CPU, 640 LSJ, U{0..19} pastes, 2 workers) on the same background and instance
   shards from local disk vs from a local S3-compatible server (moto, 127.0.0.1), the bank
   re-rooted onto the bucket, through the block cache (remote.py).
Writes benchmarks/results/scale-out-cpu.json. `--quick`: 4 images per category, one run each
(Ray for pack-coco only),
2 batches of 2 at 128 px of small demo data, in a temp folder; result in a temp file.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(fn) -> tuple[float, dict]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


EXECUTORS = (("1_workers", {"workers": 1}), ("2_workers", {"workers": 2}),
             ("ray_2_workers", {"executor": "ray", "workers": 2}))


def stages(work: str, images_per_category: int, repeats: int = 2, scenes: dict | None = None,
           quick: bool = False) -> dict:
    """Every stage on every executor (Ray only when it is installed), same settings, fresh
    output folders; the fastest of `repeats` alternating runs of each is kept."""
    from xpaste_stream.bank import build_index
    from xpaste_stream.executors import ExecutorConfig
    from xpaste_stream.extract import ExtractConfig, run_extract
    from xpaste_stream.generate import GenerateConfig, run_generate
    from xpaste_stream.generate.procedural import SceneSpec, category_names, write_scene_dataset
    from xpaste_stream.pack import PackCocoConfig, run_pack_coco

    scenes = scenes or {"num_images": 400, "image_size": (480, 640), "maxcount": 50}
    annotations = write_scene_dataset(
        os.path.join(work, "scenes"), category_names(20),
        SceneSpec(num_images=scenes["num_images"], image_size=scenes["image_size"], max_objects=6,
                  seed=0))
    executors = [(name, ExecutorConfig(**kw)) for name, kw in EXECUTORS
                 if kw.get("executor") != "ray" or _ray_started()]
    runs: dict = {}

    def record(stage: str, name: str, fn, count: str) -> dict:
        seconds, summary = timed(fn)
        n = summary[count]
        runs.setdefault(f"{stage}_{name}", []).append(
            {"images_per_s" if stage != "index" else "instances_per_s": n / seconds,
             "images" if stage != "index" else "instances": n, "seconds": seconds})
        return summary

    for _ in range(repeats):  # alternating, fresh folders; the fastest run of each is kept
        for name, ex in executors:
            folder = os.path.join(work, f"stages-{name}")
            shutil.rmtree(folder, ignore_errors=True)
            pack = PackCocoConfig(annotations=annotations, images=os.path.join(work, "scenes", "images"),
                                  output=os.path.join(folder, "bg", "bg-{shard:06d}.tar"),
                                  maxcount=scenes["maxcount"])
            record("pack_coco", name, lambda pack=pack, ex=ex: run_pack_coco(
                pack, progress=False, executor=ex), "samples")
            if quick and ex.executor == "ray":
                continue  # --quick: Ray's path once (the stages' Ray runs are tests/test_scale_out.py's)
            gen = GenerateConfig(output=os.path.join(folder, "gen", "gen-{shard:06d}.tar"),
                                 num_categories=8, images_per_category=images_per_category,
                                 image_size=256, maxcount=100)
            images = record("generate", name, lambda gen=gen, ex=ex: run_generate(
                gen, progress=False, executor=ex), "samples")["samples"]
            ext = ExtractConfig(inputs=[os.path.join(folder, "gen", "gen-*.tar")],
                                output=os.path.join(folder, "inst", "inst-{shard:06d}.tar"),
                                maxcount=100)
            seconds, _ = timed(lambda ext=ext, ex=ex: run_extract(ext, progress=False, executor=ex))
            runs.setdefault(f"extract_{name}", []).append(
                {"images_per_s": images / seconds, "images": images, "seconds": seconds})
            inst = sorted(glob.glob(os.path.join(folder, "inst", "inst-*.tar")))
            record("index", name, lambda inst=inst, folder=folder, ex=ex: build_index(
                inst, os.path.join(folder, "bank"), dedup=True, progress=False, executor=ex),
                "indexed")
    _stop_ray()  # the loader's figures are taken without it
    rate = lambda f: f.get("images_per_s", f.get("instances_per_s"))  # noqa: E731
    return {name: max(r, key=rate) for name, r in runs.items()}


def _ray_started() -> bool:
    """Ray, started here once before any timing (a cluster's start-up is not a run's), 2 CPUs."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.update({k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ})
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    return True


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def loader_local_vs_s3(work: str, batches: int, demo: dict | None = None, size: int = 640,
                       batch_size: int = 8) -> dict:
    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    from xpaste_stream.bank import InstanceBank
    from xpaste_stream.loader import PasteConfig
    from xpaste_stream.loader.bench import measure_loader
    from xpaste_stream.pipeline import make_demo_data

    data = make_demo_data(os.path.join(work, "demo"), progress=False, **(demo or {}))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fsspec.config.conf["s3"] = {"key": "bench", "secret": "bench", "skip_instance_cache": True,
                                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")
    fs = fsspec.filesystem("s3")
    bg_dir = os.path.dirname(data["backgrounds"][0])
    for path in glob.glob(os.path.join(bg_dir, "*")):
        fs.put(path, f"bench/bg/{os.path.basename(path)}")
    bank = InstanceBank.open(data["bank"])
    for entry in bank.shards:
        fs.put(entry["path"], f"bench/inst/{os.path.basename(entry['path'])}")
    remote_bank = InstanceBank.open(data["bank"], shard_root="s3://bench/inst")
    paste = PasteConfig(output_size=size)
    try:
        local = measure_loader(data["backgrounds"], data["bank"], paste, batch_size, batches, None, 2,
                               workers=2)
        s3 = measure_loader("s3://bench/bg/bg-*.tar", remote_bank, paste, batch_size, batches, None, 2,
                            workers=2)
    finally:
        server.stop()
    for f in (local, s3):
        f.pop("stats", None)
    return {"loader_local_disk": local, "loader_s3_moto": s3,
            "shards_bytes": sum(os.path.getsize(p) for p in glob.glob(os.path.join(bg_dir, "*.tar")))
            + sum(e["size"] for e in bank.shards)}


def main() -> int:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-category", type=int, default=150)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workdir", default=None, help="default runs/bench-scale-out (--quick: a temp folder)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/scale-out-cpu.json "
                                               "(--quick: a temp file)")
    ap.add_argument("--quick", action="store_true", help="the whole path on tiny data; records nothing")
    args = ap.parse_args()
    if args.quick:
        from quickmode import one_thread

        one_thread()
        with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
            args.workdir, args.images_per_category, args.batches = tmp, 4, 2
            args.size, args.batch_size = 128, 2
            args.scenes = {"num_images": 12, "image_size": (64, 80), "maxcount": 4}
            args.out = args.out or os.path.join(tempfile.gettempdir(), "scale-out-cpu-quick.json")
            return measure(args, repeats=1, demo={"num_categories": 4, "instances_per_category": 5,
                                                  "num_backgrounds": 8, "image_size": 128})
    args.size, args.batch_size = 640, 8
    args.scenes = {"num_images": 400, "image_size": (480, 640), "maxcount": 50}
    args.workdir = args.workdir or os.path.join(ROOT, "runs", "bench-scale-out")
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", "scale-out-cpu.json")
    return measure(args)


def measure(args, repeats: int = 2, demo: dict | None = None) -> int:
    import json

    figures = {**stages(args.workdir, args.images_per_category, repeats, args.scenes,
                        quick=demo is not None),
               **loader_local_vs_s3(args.workdir, args.batches, demo, args.size, args.batch_size)}
    rate = lambda name: figures[name].get("images_per_s", figures[name].get("instances_per_s"))  # noqa: E731
    ratios = {}
    for stage in ("generate", "extract", "pack_coco", "index"):
        ratios[f"{stage}_2_vs_1_workers"] = rate(f"{stage}_2_workers") / rate(f"{stage}_1_workers")
        if f"{stage}_ray_2_workers" in figures:
            ratios[f"{stage}_ray_vs_local_2_workers"] = (rate(f"{stage}_ray_2_workers")
                                                         / rate(f"{stage}_2_workers"))
    ratios["loader_s3_vs_local"] = (figures["loader_s3_moto"]["images_per_s"]
                                    / figures["loader_local_disk"]["images_per_s"])
    result = {"device": "cpu", "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {"generate": "procedural, 8 categories, 256 px, maxcount 100, best of 2",
                           "extract": "plain-background, no CLIP, maxcount 100, best of 2",
                           "pack_coco": f"procedural COCO/LVIS scenes, {args.scenes['num_images']} "
                                        f"images {args.scenes['image_size'][1]}x"
                                        f"{args.scenes['image_size'][0]}, maxcount "
                                        f"{args.scenes['maxcount']}, verify on, best of 2",
                           "index": "the extract run's instance shards, --dedup, best of 2",
                           "executors": "local 1 and 2 processes; ray: 2 actors on a local Ray "
                                        "(num_cpus 2) started once before timing (actor "
                                        "start-up timed, as a run pays it)",
                           "loader": f"CPU, {args.size} LSJ, U{{0..19}} pastes, batch {args.batch_size}, "
                                     "2 workers, "
                                     "demo data; "
                                     "S3: moto ThreadedMotoServer on 127.0.0.1, default block cache "
                                     "(1 MiB blocks, 512 MiB), bank re-rooted onto the bucket",
                           "batches": args.batches},
              "figures": figures, "ratios": ratios}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for name, v in ratios.items():
        print(f"{name}: {v:.2f}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
