"""The engine at LVIS v1 scale, built on local disk without downloading anything.

    nice -n 10 python3 benchmarks/bench_scale.py [--sizes 0.01 0.1 1] [--workdir DIR] [--quick]
    # after a change to one stage, rerun its steps on kept data; the other figures stay:
    python3 benchmarks/bench_scale.py --sizes 1 --workdir DIR --keep --steps pack

For each size (a fraction of LVIS v1 train) it builds:
- an LVIS-format annotation file with LVIS v1's sizes: 100,170 images, 1,270,141 polygon
  annotations (~12.7 per image), 1,203 categories split r/c/f as LVIS (337 rare with 1-10
  images, 461 common with 11-100, 405 frequent with more; image counts per category drawn from
  that split), 1 % crowd regions (uncompressed RLE), per-image `neg_category_ids` and
  `not_exhaustive_category_ids`; images as real JPEG files (a few distinct 640x480 / 480x640
  files, hard-linked under every file name);
- a bank of 10M x size instances (benchmarks/synthetic.py: tiny instances, distinct keys).
Then it measures, each with wall time, CPU time (getrusage of the child processes) and peak
memory (largest process's max RSS, and the peak summed RSS of the process tree, sampled):
pack-coco with 1 and 2 workers; index of the bank and an incremental rerun after one more shard;
the loader (repeat-factor sampling, the bank, 640 LSJ, U{0..19} pastes): time to the first
batch, host feed per worker (GPU mode's host work, feed-only) with the RSS / PSS / private
memory of the main process and of each worker sampled over the run; `inspect` of the
backgrounds and the bank; `report` of the bank.
Writes benchmarks/results/scale-cpu.json (updated after every step, so a run cut short keeps
what it measured) and scale-cpu.png (time and memory against size). `--quick`: the whole path
at a tiny size, into a temp folder. The data is deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import synthetic  # noqa: E402  (benchmarks/synthetic.py)

RESULTS = os.path.join(HERE, "results")
LVIS_V1_TRAIN = {"images": 100_170, "annotations": 1_270_141, "rare": 337, "common": 461,
                 "frequent": 405, "categories_per_image": 3.5, "bank_instances": 10_000_000}
TARGETS = {"pack_coco_2_workers_seconds": 30 * 60, "pack_coco_peak_bytes": 8 * 2**30,
           "loader_first_batch_seconds": 60, "index_seconds": 5 * 60,
           "worker_memory": "flat over the run (see memory.rule), read-only data shared (PSS "
                            "well below RSS, small private memory)"}
POLYGON_POINTS = 40  # points per polygon: ~870 bytes per annotation, ~1.1 GB at full size
CROWD_FRACTION = 0.01
# The steps of one size: pack (data + pack-coco), index (bank shards + index + incremental),
# then the loader, inspect and report, which read what the first two made (a rerun of some
# steps, e.g. `--steps pack` after a pack-coco change, keeps the other steps' figures).
STEPS = ("pack", "index", "loader", "inspect", "report")


# -- the data set ------------------------------------------------------------------------------


def category_image_counts(num_images: int, fraction: float, rng) -> tuple[np.ndarray, list[str]]:
    """Images per category for LVIS's r/c/f split at full size, scaled to `fraction`."""
    full = LVIS_V1_TRAIN
    rare = rng.integers(1, 11, full["rare"])
    common = np.exp(rng.uniform(math.log(11), math.log(101), full["common"])).astype(int)
    pairs = full["categories_per_image"] * full["images"] - rare.sum() - common.sum()
    tail = np.exp(rng.uniform(0, math.log(300), full["frequent"]))
    frequent = 101 + (pairs - 101 * full["frequent"]) * tail / tail.sum()
    counts = np.concatenate([rare, common, frequent])
    frequency = ["r"] * full["rare"] + ["c"] * full["common"] + ["f"] * full["frequent"]
    order = rng.permutation(len(counts))  # frequency groups interleaved over the ids, as in LVIS
    counts = np.clip(np.round(counts[order] * fraction), 1, num_images).astype(int)
    return counts, [frequency[i] for i in order]


def image_category_pairs(num_images: int, counts: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """(image index, category id) of every image x category present; every image gets one."""
    images = [rng.choice(num_images, int(k), replace=False) for k in counts]
    img = np.concatenate(images)
    cat = np.repeat(np.arange(1, len(counts) + 1), counts)
    empty = np.setdiff1d(np.arange(num_images), img)
    common = np.argsort(counts)[-50:] + 1
    img = np.concatenate([img, empty])
    cat = np.concatenate([cat, rng.choice(common, len(empty))])
    return img, cat


def polygon_templates(count: int, rng) -> np.ndarray:
    """(count, POLYGON_POINTS, 2) star-shaped polygons spanning the unit square."""
    angle = np.sort(rng.uniform(0, 2 * np.pi, (count, POLYGON_POINTS)), axis=1)
    radius = rng.uniform(0.6, 1.0, (count, POLYGON_POINTS))
    pts = np.stack([np.cos(angle) * radius, np.sin(angle) * radius], -1)
    lo, hi = pts.min(1, keepdims=True), pts.max(1, keepdims=True)
    return (pts - lo) / (hi - lo)


def polygon_area(pts: np.ndarray) -> np.ndarray:
    x, y = pts[..., 0], pts[..., 1]
    return 0.5 * np.abs((x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y).sum(-1))


IMAGE_SIZES = ((640, 480), (480, 640))  # (width, height): COCO's landscape and portrait


def write_images(folder: str, num_images: int, rng) -> list[tuple[int, int]]:
    """num_images JPEG files (a few distinct ones, hard-linked); their (width, height)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    distinct = []
    for v in range(8):
        w, h = IMAGE_SIZES[v % 2]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (v + 1)) % 256, (yy * 2 + v * 30) % 256, (xx + yy) % 256], -1)
        noise = rng.normal(0, 18, (h, w, 3))
        rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"distinct-{v}.jpg")
        Image.fromarray(rgb).save(path, quality=85)
        distinct.append((path, (w, h)))
    sizes = []
    for i in range(num_images):
        src, size = distinct[i % len(distinct)]
        os.link(src, os.path.join(folder, image_file_name(i)))
        sizes.append(size)
    return sizes


def image_file_name(i: int) -> str:
    return f"{i + 1:012d}.jpg"


def write_annotations(path: str, fraction: float, image_sizes: list[tuple[int, int]], seed: int) -> dict:
    """An LVIS v1-format annotation file, streamed (bounded memory); returns its counts."""
    rng = np.random.default_rng(seed)
    n = len(image_sizes)
    counts, frequency = category_image_counts(n, fraction, rng)
    img, cat = image_category_pairs(n, counts, rng)
    target = LVIS_V1_TRAIN["annotations"] * n / LVIS_V1_TRAIN["images"]
    per_pair = 1 + rng.poisson(max(0.0, target / len(img) - 1), len(img))
    ann_img, ann_cat = np.repeat(img, per_pair), np.repeat(cat, per_pair)
    order = np.argsort(ann_img, kind="stable")
    ann_img, ann_cat = ann_img[order], ann_cat[order]
    instance_counts = np.bincount(ann_cat, minlength=len(counts) + 1)[1:]
    templates = polygon_templates(64, rng)
    template_area = polygon_area(templates)
    cats_of = {}
    for i, c in zip(img.tolist(), cat.tolist(), strict=True):
        cats_of.setdefault(i, []).append(c)
    with open(path, "w") as f:
        f.write('{"info": {"description": "synthetic LVIS v1-sized set (benchmarks/bench_scale.py)"}, '
                '"licenses": [], "categories": ')
        json.dump([{"id": c + 1, "name": f"category_{c + 1}", "synonyms": [f"category_{c + 1}"],
                    "def": "synthetic", "synset": f"category_{c + 1}.n.01", "frequency": frequency[c],
                    "image_count": int(counts[c]), "instance_count": int(instance_counts[c])}
                   for c in range(len(counts))], f)
        f.write(', "images": ')
        json.dump([image_entry(i, image_sizes[i], cats_of.get(i, []), len(counts), rng)
                   for i in range(n)], f)
        f.write(', "annotations": [')
        chunk = 20_000
        for start in range(0, len(ann_img), chunk):
            items = annotation_entries(start, ann_img[start:start + chunk], ann_cat[start:start + chunk],
                                       image_sizes, templates, template_area, rng)
            f.write(("," if start else "") + json.dumps(items)[1:-1])
        f.write("]}")
    return {"images": n, "annotations": int(len(ann_img)), "categories": len(counts),
            "annotations_per_image": round(len(ann_img) / n, 2),
            "frequency_groups": {g: frequency.count(g) for g in "rcf"},
            "crowd_fraction": CROWD_FRACTION, "annotation_file_bytes": os.path.getsize(path)}


def image_entry(i: int, size: tuple[int, int], present: list[int], num_categories: int, rng) -> dict:
    neg = rng.choice(num_categories, int(rng.integers(0, 12)), replace=False) + 1
    neg = sorted(set(neg.tolist()) - set(present))
    not_exhaustive = sorted(set(rng.choice(present, min(len(present), int(rng.integers(0, 3)))).tolist())) \
        if present else []
    return {"id": i + 1, "file_name": image_file_name(i), "width": size[0], "height": size[1],
            "coco_url": f"http://images.cocodataset.org/train2017/{image_file_name(i)}",
            "date_captured": "2013-11-14 16:28:13", "license": 1, "flickr_url": "",
            "neg_category_ids": neg, "not_exhaustive_category_ids": not_exhaustive}


def annotation_entries(first: int, images: np.ndarray, cats: np.ndarray, sizes, templates,
                       template_area, rng) -> list[dict]:
    wh = np.array([sizes[i] for i in images.tolist()], float)
    side = np.clip(rng.lognormal(-2.2, 0.8, (len(images), 2)), 0.01, 0.9) * wh
    corner = rng.uniform(0, 1, (len(images), 2)) * (wh - side)
    which = rng.integers(0, len(templates), len(images))
    polys = np.round(templates[which] * side[:, None] + corner[:, None], 2)
    crowd = rng.random(len(images)) < CROWD_FRACTION
    out = []
    for k in range(len(images)):
        (w, h), (x, y) = side[k], corner[k]
        entry = {"id": first + k + 1, "image_id": int(images[k]) + 1, "category_id": int(cats[k]),
                 "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                 "area": round(float(template_area[which[k]] * w * h), 2), "iscrowd": int(crowd[k])}
        if crowd[k]:
            entry["segmentation"] = crowd_rle(int(wh[k][1]), int(wh[k][0]), x, y, w, h)
        else:
            entry["segmentation"] = [polys[k].reshape(-1).tolist()]
        out.append(entry)
    return out


def crowd_rle(height: int, width: int, x: float, y: float, w: float, h: float) -> dict:
    """An uncompressed (list) RLE of the box, column-major as COCO's crowd regions."""
    x0, x1 = int(x), max(int(x) + 1, min(width, int(x + w)))
    y0, y1 = int(y), max(int(y) + 1, min(height, int(y + h)))
    n = x1 - x0
    counts = [x0 * height + y0]
    for j in range(n):
        counts += [y1 - y0, height - y1 + (y0 if j < n - 1 else (width - x1) * height)]
    return {"size": [height, width], "counts": counts}


# -- measuring ---------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(k) for k in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def memory_of(pid: int) -> dict:
    """rss, pss, private (clean + dirty) and swap of one process, bytes (smaps_rollup)."""
    fields = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    fields[name] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def measured(name: str, cmd: list[str], log_dir: str, timeout: float) -> dict:
    """Run cmd as a child; wall, CPU (user + system of it and its children) and peak memory."""
    log = os.path.join(log_dir, f"{name}.log")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        peak_tree, timed_out = 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_rss(proc.pid))
            if time.perf_counter() - started > timeout:
                os.killpg(proc.pid, 9)
                timed_out = True
            # every 0.25 s; sooner at first, so that a short step is not rounded up to 0.25 s
            time.sleep(min(0.25, 0.01 + (time.perf_counter() - started) / 8))
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
              "max_rss_largest_process_bytes": usage.ru_maxrss * 1024,
              "peak_tree_rss_bytes": peak_tree, "exit_status": proc.returncode}
    if timed_out:
        result["timed_out_after_s"] = timeout
    elif proc.returncode:
        with open(log, errors="replace") as f:
            raise SystemExit(f"{name} failed ({proc.returncode}); {' '.join(cmd)}\n{f.read()[-3000:]}")
    print(f"  {name}: {result['wall_s']} s wall, {result['cpu_s']} s CPU, peak "
          f"{max(result['max_rss_largest_process_bytes'], peak_tree) / 2**20:.0f} MiB", flush=True)
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "xpaste_stream.cli", *args]


# -- the loader (run in a child process of its own: `--loader-step`) ----------------------------


def loader_step(spec: dict) -> dict:
    """Time to first batch of the whole loader, then a long feed-only run (GPU mode's host
    work) with memory sampled per process; memory figures in bytes."""
    from xpaste_stream.loader import CopyPasteLoader, PasteConfig

    paste = PasteConfig(output_size=spec["size"])
    started = time.perf_counter()
    loader = CopyPasteLoader(spec["backgrounds"], spec["bank"], paste, batch_size=spec["batch_size"],
                             workers=spec["workers"], categories=spec["categories"],
                             background_sampling="repeat_factor")
    constructed = time.perf_counter() - started
    batch = next(iter(loader))
    first_batch = time.perf_counter() - started
    images = len(batch.targets)
    loader.close()
    out = {"construct_s": round(constructed, 2), "first_batch_s": round(first_batch, 2),
           "first_batch_images": images, "backgrounds": len(loader.index),
           "bank_instances": loader.bank.num_instances}
    out["feed"] = feed_run(spec, paste)
    return out


def feed_run(spec: dict, paste) -> dict:
    """Feed-only (bench.measure_feed's pipeline) over many batches, memory sampled."""
    from nvidia.dali import fn, pipeline_def

    from xpaste_stream.loader import CopyPasteLoader
    from xpaste_stream.loader.wire import WIRE

    batch_size, batches, workers = spec["batch_size"], spec["feed_batches"], spec["workers"]
    started = time.perf_counter()
    loader = CopyPasteLoader(spec["backgrounds"], spec["bank"], paste, batch_size=batch_size,
                             workers=workers, categories=spec["categories"],
                             background_sampling="repeat_factor")
    source = loader.source            # the host work of GPU and CPU mode alike
    source.set_run(0, 0, batch_size, 0, 1, batch_size * (batches + 1))

    @pipeline_def
    def feed():
        outs = fn.external_source(source=source, num_outputs=len(WIRE), batch=False,
                                  parallel=True, prefetch_queue_depth=loader.config.worker_prefetch)
        return tuple(outs)

    pipe = feed(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=2,
                py_num_workers=workers, py_start_method="fork")
    gc.collect()                      # as the loader does: what the workers share stays frozen
    gc.freeze()
    pipe.start_py_workers()
    pipe.build()
    pipe.run()
    first = time.perf_counter() - started
    samples, every = [], max(1, batches // 40)
    t0, cpu0 = time.perf_counter(), _tree_cpu()
    for n in range(batches):
        pipe.run()
        if n % every == 0 or n == batches - 1:
            samples.append(memory_sample(n, time.perf_counter() - t0))
    seconds, cpu = time.perf_counter() - t0, _tree_cpu() - cpu0
    pipe._shutdown()
    loader.close()
    images = batch_size * batches
    return {"first_batch_s": round(first, 2), "batches": batches, "images": images,
            "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
            "images_per_s": round(images / seconds, 1),
            "images_per_s_per_worker": round(images / seconds / workers, 1),
            "images_per_cpu_s": round(images / cpu, 1), "workers": workers,
            "memory": memory_summary(samples), "memory_samples": samples}


def _tree_cpu() -> float:
    from xpaste_stream.loader.bench import process_tree_cpu

    return process_tree_cpu()


def memory_sample(batch: int, seconds: float) -> dict:
    main = os.getpid()
    workers = [p for p in tree_pids(main) if p != main]
    return {"batch": batch, "s": round(seconds, 1), "main": memory_of(main),
            "workers": [memory_of(p) for p in workers]}


def memory_summary(samples: list[dict]) -> dict:
    """Every process's memory at the quarter point of the run (warm: buffers and caches
    filled) against the last sample: flat, or growing with the run."""
    base, last = samples[len(samples) // 4], samples[-1]

    def growth(key, a: dict, b: dict) -> dict:
        peak = max(key(s).get("private", 0) for s in samples if key(s))
        return {k: {"at_quarter": a.get(k, 0), "last": b.get(k, 0),
                    "growth": (b.get(k, 0) - a.get(k, 0)) / max(1, a.get(k, 0))}
                for k in ("rss", "pss", "private")} | {"private_peak": peak}

    workers = min(len(s["workers"]) for s in samples)
    out = {"baseline_batch": base["batch"], "last_batch": last["batch"],
           "main": growth(lambda s: s["main"], base["main"], last["main"]),
           "workers": [growth(lambda s, w=w: s["workers"][w], base["workers"][w], last["workers"][w])
                       for w in range(workers)]}
    grown = [w["private"]["last"] - w["private"]["at_quarter"] for w in out["workers"]]
    out["worker_private_growth_bytes_max"] = max(grown, default=0)
    out["main_private_growth_bytes"] = out["main"]["private"]["last"] - out["main"]["private"]["at_quarter"]
    out["flat"] = bool(max(grown, default=0) < 16 * 2**20 and out["main_private_growth_bytes"] < 64 * 2**20)
    out["rule"] = "flat: from the quarter point to the end, each worker's private memory grows < 16 MiB " \
                  "and the main process's < 64 MiB"
    return out


# -- one size ----------------------------------------------------------------------------------


def run_size(fraction: float, args, record) -> None:
    work = os.path.join(args.workdir, f"size-{fraction:g}")
    if set(args.steps) == set(STEPS):
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    n_images = max(20, round(LVIS_V1_TRAIN["images"] * fraction))
    n_instances = max(2 * args.per_shard, round(args.bank_instances * fraction))
    print(f"size {fraction:g}: {n_images:,} images, {n_instances:,} instances ({work})", flush=True)

    steps = args.steps
    bank, bg = os.path.join(work, "bank"), os.path.join(work, "bg")
    needs = {"loader", "inspect", "report"} & set(steps)
    missing = [p for p, made_by in ((os.path.join(bg, "categories.json"), "pack"),
                                    (os.path.join(bank, "manifest.json"), "index"))
               if needs and made_by not in steps and not os.path.exists(p)]
    if missing:
        raise SystemExit(f"--steps {' '.join(sorted(needs))} read {', '.join(missing)}: run pack and "
                         "index into this --workdir first (with --keep)")
    if "pack" in steps:
        pack_steps(fraction, work, n_images, args, record)
    if "index" in steps:
        index_steps(fraction, work, n_instances, args, record)
    if "loader" in steps:
        spec = {"backgrounds": os.path.join(bg, "bg-*.tar"), "bank": bank,
                "categories": os.path.join(bg, "categories.json"), "size": 640, "batch_size": 16,
                "workers": 2, "feed_batches": feed_batches(fraction, args)}
        spec_path = os.path.join(work, "loader-spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        loader = measured("loader", [sys.executable, os.path.abspath(__file__), "--loader-step",
                                     spec_path, "--loader-out", os.path.join(work, "loader.json")],
                          os.path.join(work, "logs"), args.timeout)
        if "timed_out_after_s" not in loader:
            with open(os.path.join(work, "loader.json")) as f:
                loader.update(json.load(f))
        record(fraction, "loader", loader)
    categories = os.path.join(bg, "categories.json")
    if "inspect" in steps:
        record(fraction, "inspect_backgrounds", measured(
            "inspect-bg", cli("inspect", os.path.join(bg, "bg-*.tar"), "--json"),
            os.path.join(work, "logs"), args.check_timeout))
        record(fraction, "inspect_bank", measured(
            "inspect-bank", cli("inspect", bank, "--categories", categories, "--json"),
            os.path.join(work, "logs"), args.check_timeout))
    if "report" in steps:
        record(fraction, "report_bank", measured(
            "report-bank", cli("report", bank, "-o", os.path.join(work, "report"), "--categories",
                               categories), os.path.join(work, "logs"), args.check_timeout))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def pack_steps(fraction: float, work: str, n_images: int, args, record) -> None:
    """The LVIS-sized annotation file and images, then pack-coco with each worker count."""
    started = time.perf_counter()
    images = os.path.join(work, "images")
    sizes = write_images(images, n_images, np.random.default_rng(0))
    ann = os.path.join(work, "lvis_v1_train.json")
    data = write_annotations(ann, fraction, sizes, seed=0)
    data["build_s"] = round(time.perf_counter() - started, 1)
    record(fraction, "data", data)
    print(f"  data: {json.dumps(data)}", flush=True)
    bg = os.path.join(work, "bg")
    for workers in args.pack_workers:
        shutil.rmtree(bg, ignore_errors=True)
        record(fraction, f"pack_coco_{workers}_workers", measured(
            f"pack-coco-{workers}", cli("pack-coco", ann, images, "-o",
                                        os.path.join(bg, "bg-{shard:06d}.tar"), "--workers",
                                        str(workers)), os.path.join(work, "logs"), args.timeout))
    shutil.rmtree(images)  # the shards hold the images now


def index_steps(fraction: float, work: str, n_instances: int, args, record) -> None:
    """The bank's instance shards, index of them all, then an incremental index after one more."""
    inst = os.path.join(work, "inst")
    shutil.rmtree(inst, ignore_errors=True)
    started = time.perf_counter()
    # X-Paste: ~equal per category; --quick: 20 categories (report draws a grid per category)
    categories = np.random.default_rng(3).integers(1, 21 if args.quick else 1204, n_instances)
    shard_paths = synthetic.write_instance_shards(inst, categories, args.per_shard, 2)
    record(fraction, "bank_shards", {"instances": n_instances, "shards": len(shard_paths),
                                     "write_s": round(time.perf_counter() - started, 1),
                                     "bytes": sum(os.path.getsize(p) for p in shard_paths)})
    bank, logs = os.path.join(work, "bank"), os.path.join(work, "logs")
    shutil.rmtree(bank, ignore_errors=True)
    pattern = os.path.join(inst, "inst-*.tar")
    record(fraction, "index", measured("index", cli("index", pattern, "-o", bank, "--quiet"), logs,
                                       args.timeout))
    synthetic.write_instance_shards(inst, categories[:args.per_shard], args.per_shard, 1,
                                    first_shard=len(shard_paths), first_instance=n_instances)
    record(fraction, "index_incremental_one_shard", measured(
        "index-incremental", cli("index", pattern, "-o", bank, "--quiet"), logs, args.timeout))


def feed_batches(fraction: float, args) -> int:
    if args.feed_batches:
        return args.feed_batches
    return max(50, round(20_000 * fraction)) if not args.quick else 4


# -- results -----------------------------------------------------------------------------------


def load_result(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(result: dict, path: str) -> None:
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["targets_met"] = judge(result)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def judge(result: dict) -> dict:
    """Each target at the largest size where its step finished: met or not, and at which size."""
    sizes = sorted(result.get("sizes", {}).items(), key=lambda kv: float(kv[0]), reverse=True)

    def largest(step: str, field: str):
        return next(((float(k), s[step]) for k, s in sizes if field in s.get(step, {})), (None, None))

    out = {}
    at, pack = largest("pack_coco_2_workers", "wall_s")
    if pack and "timed_out_after_s" not in pack:
        peak = max(pack["max_rss_largest_process_bytes"], pack["peak_tree_rss_bytes"])
        out["pack_coco_2_workers_under_30_min"] = {
            "met": pack["wall_s"] < TARGETS["pack_coco_2_workers_seconds"], "at_size": at,
            "wall_s": pack["wall_s"], "cpu_s_over_2_cores": round(pack["cpu_s"] / 2, 1)}
        out["pack_coco_peak_under_8_gb"] = {"met": peak < TARGETS["pack_coco_peak_bytes"], "at_size": at,
                                            "peak_bytes": peak}
    at, index = largest("index", "wall_s")
    if index:
        out["index_under_5_min"] = {"met": index["wall_s"] < TARGETS["index_seconds"], "at_size": at,
                                    "wall_s": index["wall_s"]}
    at, loader = largest("loader", "first_batch_s")
    if loader:
        out["loader_first_batch_under_60_s"] = {
            "met": loader["first_batch_s"] < TARGETS["loader_first_batch_seconds"], "at_size": at,
            "first_batch_s": loader["first_batch_s"]}
        out["worker_memory_flat"] = {"met": loader["feed"]["memory"]["flat"], "at_size": at}
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(result["sizes"], key=float)
    steps = ["pack_coco_1_workers", "pack_coco_2_workers", "index", "index_incremental_one_shard",
             "loader", "inspect_backgrounds", "inspect_bank", "report_bank"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for step in steps:
        pts = [(float(s) * 100, result["sizes"][s][step]) for s in sizes if step in result["sizes"][s]]
        if not pts:
            continue
        x = [p[0] for p in pts]
        # the loader's wall includes a feed run of a size-dependent length: plot its first batch
        seconds = [p[1].get("first_batch_s", p[1]["wall_s"]) if step == "loader" else p[1]["wall_s"]
                   for p in pts]
        ax_t.plot(x, seconds, "o-", label="loader_first_batch" if step == "loader" else step)
        ax_m.plot(x, [max(p[1]["max_rss_largest_process_bytes"], p[1]["peak_tree_rss_bytes"]) / 2**30
                      for p in pts], "o-", label=step)
    for ax, label in ((ax_t, "wall time (s)"), (ax_m, "peak memory (GiB, process tree)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("size (% of LVIS v1 train; bank: % of 10M instances)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.axhline(TARGETS["pack_coco_2_workers_seconds"], color="grey", ls="--", lw=0.8)
    ax_m.axhline(TARGETS["pack_coco_peak_bytes"] / 2**30, color="grey", ls="--", lw=0.8)
    if ax_t.get_legend_handles_labels()[0]:
        ax_t.legend(fontsize=7)
    fig.suptitle(f"bench_scale: {result.get('device', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   help="fractions of LVIS v1 train (and of --bank-instances)")
    p.add_argument("--bank-instances", type=int, default=LVIS_V1_TRAIN["bank_instances"])
    p.add_argument("--per-shard", type=int, default=1000, help="instances per bank shard")
    p.add_argument("--pack-workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                   help="run these steps only (loader, inspect and report need the folders pack and "
                        "index left: --keep --workdir DIR); their figures replace those on record")
    p.add_argument("--feed-batches", type=int, default=None,
                   help="feed-only batches of 16 (default 20,000 x size, at least 50)")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per step at most")
    p.add_argument("--check-timeout", type=float, default=900,
                   help="seconds at most for each of inspect and report (recorded as timed out)")
    p.add_argument("--workdir", default=None, help="where the data goes (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the data")
    p.add_argument("--out", default=None, help="result json (default benchmarks/results/scale-cpu.json; "
                                              "--quick: a temp file); the plot goes beside it")
    p.add_argument("--quick", action="store_true", help="the whole path at a tiny size in seconds")
    p.add_argument("--loader-step", help=argparse.SUPPRESS)
    p.add_argument("--loader-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        from quickmode import one_thread

        one_thread()
        # 20 images; 400 instances (4 shards of 100, then one more)
        args.sizes, args.per_shard, args.pack_workers = [0.0002], 100, [2]
        args.bank_instances = 2_000_000
    args.out = args.out or (os.path.join(tempfile.gettempdir(), "scale-cpu-quick.json") if args.quick
                            else os.path.join(RESULTS, "scale-cpu.json"))
    return args


def main() -> int:
    args = parse_args()
    if args.loader_step:
        with open(args.loader_step) as f:
            out = loader_step(json.load(f))
        with open(args.loader_out, "w") as f:
            json.dump(out, f)
        return 0
    temp = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    result = load_result(args.out)
    result.update({"benchmark": "scale", "device": f"cpu: {synthetic.cpu_model()}, {os.cpu_count()} cores",
                   "settings": {"lvis_v1_train": LVIS_V1_TRAIN, "bank_instances_at_100_percent":
                                args.bank_instances, "per_shard": args.per_shard,
                                "pack_workers": args.pack_workers, "loader": "640 LSJ, U{0..19} pastes, "
                                "batch 16, 2 worker processes, repeat-factor sampling; feed-only = GPU "
                                "mode's host work", "images": "8 distinct JPEGs (640x480 / 480x640, "
                                "quality 85), hard-linked", "nice": os.nice(0)},
                   "targets": TARGETS})
    result.setdefault("sizes", {})
    png = os.path.splitext(args.out)[0] + ".png"

    def record(fraction: float, step: str, figures: dict) -> None:
        figures = {**figures, "load_average": round(os.getloadavg()[0], 2)}
        result["sizes"].setdefault(f"{fraction:g}", {})[step] = figures
        save(result, args.out)
        if not args.quick:  # a run cut short keeps its plot; --quick draws it once, at the end
            plot(result, png)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        for fraction in args.sizes:
            if set(args.steps) == set(STEPS):
                result["sizes"].pop(f"{fraction:g}", None)
            run_size(fraction, args, record)
        plot(result, png)
    finally:
        if temp and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
