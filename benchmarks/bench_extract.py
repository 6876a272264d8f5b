"""Extraction throughput: batched (segment + CLIP score) vs a naive one-image-at-a-time loop.

    python benchmarks/bench_extract.py [--images N] [--batch-size B] [--device cpu|cuda]

Both paths run the same settings on the same decoded samples: procedural 512x512 images, the
segmenters plain-background + grabcut, every candidate mask CLIP-scored, best kept. The scorer
is the real ViT-L/14 architecture with random weights (speed does not depend on the weights;
nothing is downloaded); fp16 on a GPU, float32 on CPU. Batched = `extract_batch` over B images
(one CLIP forward for all their candidates); naive = `extract_one` per image (one forward per
image). Shard reading and writing are left out of both. Writes
benchmarks/results/extract-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import open_clip
import torch

from xpaste_stream.extract import ClipScorer, ExtractConfig, extract_batch, extract_one
from xpaste_stream.extract.stage import make_segmenters
from xpaste_stream.generate import GenerateConfig, run_generate
from xpaste_stream.shards import iter_tar

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_samples(n: int, size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        per_category = 4
        cfg = GenerateConfig(output=os.path.join(tmp, "gen-{shard:04d}.tar"), maxcount=n,
                             num_categories=-(-n // per_category), images_per_category=per_category,
                             image_size=size)
        run_generate(cfg, progress=False)
        return [s for s in iter_tar(os.path.join(tmp, "gen-0000.tar"))][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=None, help="default 16 on CPU, 512 on GPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--model", default="ViT-L-14")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    images = args.images or (512 if gpu else 16)
    batch_size = args.batch_size or (64 if gpu else 16)

    samples = make_samples(images, args.image_size)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    scorer = ClipScorer(model, preprocess, open_clip.get_tokenizer(args.model), device=args.device,
                        fp16=gpu)
    cfg = ExtractConfig(inputs=["in-memory"], segmenters=["plain-background", "grabcut"],
                        scorer="clip", batch_size=batch_size)
    segmenters = make_segmenters(cfg)
    extract_batch(samples[:2], segmenters, scorer, cfg)  # warm-up: kernels, text embeddings

    def timed(fn) -> tuple[float, list]:
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    naive_s, naive = timed(lambda: [extract_one(s, segmenters, scorer, cfg) for s in samples])
    batched_s, batched = timed(lambda: [r for i in range(0, len(samples), batch_size)
                                        for r in extract_batch(samples[i:i + batch_size],
                                                               segmenters, scorer, cfg)])
    identical = sum(a == b for a, b in zip(naive, batched, strict=True))
    score_gap = max((abs(json.loads(a["json"])["clip_score"] - json.loads(b["json"])["clip_score"])
                     for a, b in zip(naive, batched, strict=True) if isinstance(a, dict)), default=0)
    device = torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})"
    result = {
        "benchmark": "extract: batched vs naive one-image-at-a-time",
        "device": device,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"images": len(samples), "image_size": args.image_size,
                     "batch_size": batch_size, "segmenters": cfg.segmenters,
                     "masks_per_image": "one per segmenter, all CLIP-scored",
                     "order": "warm-up, then naive, then batched",
                     "clip_model": f"{args.model} (real architecture, random weights)",
                     "precision": "fp16" if gpu else "fp32", "torch_threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "io": "excluded (samples decoded from memory)"},
        "naive": {"seconds": round(naive_s, 3), "images_per_s": round(len(samples) / naive_s, 3)},
        "batched": {"seconds": round(batched_s, 3), "images_per_s": round(len(samples) / batched_s, 3)},
        "ratio": round(naive_s / batched_s, 3),
        "check": {"identical_results": identical, "of": len(samples),
                  "max_score_difference": round(score_gap, 4)},
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"extract-{'gpu' if gpu else 'cpu'}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
