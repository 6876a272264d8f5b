"""Data-wait fraction of the training step: Mask R-CNN trained through CopyPasteLoader, pasting on.

    python benchmarks/bench_train.py            # GPU: R50-FPN, batch 16, 1024 LSJ, AMP fp16
                                                # CPU: the tiny Mask R-CNN, batch 4, 256 (a CPU figure)
    python benchmarks/bench_train.py --quick    # 2 steps of batch 2 at 128 on small demo data, temp file

Each step is timed in two parts (xpaste_stream/train/loop.py): waiting for the loader's batch
(`next()`: compositing and targets included) and the model step (forward, backward, optimizer,
synchronised). Reported after `--warmup` steps: the data-wait fraction of step time (goal on a
GPU: < 2 %), images/s, and the loader alone on the same settings for reference.
Writes benchmarks/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xpaste_stream.loader import PasteConfig  # noqa: E402
from xpaste_stream.loader.bench import device_name, measure_loader  # noqa: E402
from xpaste_stream.pipeline import make_demo_data  # noqa: E402
from xpaste_stream.train import ModelConfig, TrainConfig, Trainer  # noqa: E402


def measure_training(cfg: TrainConfig, warmup: int) -> dict:
    """Per-step wait and step times after `warmup` steps."""
    records = []
    trainer = Trainer(cfg)
    try:
        trainer.run(on_step=records.append)
    finally:
        trainer.close()
    timed = records[warmup:]
    wait, step = sum(r.wait_s for r in timed), sum(r.step_s for r in timed)
    return {"steps": len(timed), "images": sum(r.images for r in timed),
            "data_wait_fraction": wait / step, "images_per_s": sum(r.images for r in timed) / step,
            "step_s_median": statistics.median(r.step_s for r in timed),
            "wait_s_median": statistics.median(r.wait_s for r in timed),
            "loss_first": records[0].loss, "loss_last": records[-1].loss}


def model_label(backbone: str) -> str:
    if backbone == "tiny":
        return "torchvision Mask R-CNN with the tiny 3-convolution backbone (a CPU stand-in, not R50-FPN)"
    return f"torchvision Mask R-CNN {backbone}-FPN"


def main() -> int:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None,
                        help="demo data, built if missing (default ./runs/bench-loader; --quick: temp)")
    parser.add_argument("--backgrounds", help="background shards (default: make_demo_data's)")
    parser.add_argument("--bank")
    parser.add_argument("--backbone", default="resnet50" if gpu else "tiny")
    parser.add_argument("--size", type=int, default=1024 if gpu else 256)
    parser.add_argument("--batch-size", type=int, default=16 if gpu else 4)
    parser.add_argument("--steps", type=int, default=60 if gpu else 20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10 if gpu else 3, help="steps before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="loader threads")
    parser.add_argument("--workers", type=int, default=2, help="loader processes for host work")
    parser.add_argument("--out", default=None, help="result folder (default benchmarks/results; "
                                                   "--quick: a temp folder)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 steps of batch 2 at 128 px on small demo data: checks the path")
    args = parser.parse_args()
    if args.quick:
        from quickmode import one_thread

        one_thread()
        args.backbone, args.size, args.batch_size, args.steps, args.warmup = "tiny", 128, 2, 2, 1
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            args.workdir, args.out = tmp, args.out or os.path.join(tempfile.gettempdir(), "train-quick")
            return measure(args, {"num_categories": 4, "instances_per_category": 5,
                                  "num_backgrounds": 8, "image_size": 128}, loader_batches=2)
    args.workdir = args.workdir or "./runs/bench-loader"
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return measure(args)


def measure(args, demo: dict | None = None, loader_batches: int = 10) -> int:
    gpu = torch.cuda.is_available()
    data = make_demo_data(args.workdir, progress=False, **(demo or {}))
    backgrounds, bank = args.backgrounds or data["backgrounds"], args.bank or data["bank"]
    categories = None if args.backgrounds else data["categories"]
    paste = PasteConfig(output_size=args.size)  # the recipe: U{0..19} pastes
    shard_list = [backgrounds] if isinstance(backgrounds, str) else list(backgrounds)
    cfg = TrainConfig(backgrounds=shard_list, bank=bank, categories=categories, paste=paste,
                      model=ModelConfig(backbone=args.backbone, image_size=args.size),
                      batch_size=args.batch_size, max_steps=args.warmup + args.steps, lr=0.01,
                      warmup_steps=args.warmup, loader_threads=args.threads,
                      loader_workers=args.workers, log_every=10_000)
    training = measure_training(cfg, args.warmup)
    loader_only = measure_loader(cfg.backgrounds, bank, paste, args.batch_size, batches=loader_batches,
                                 device_id=0 if gpu else None, num_threads=args.threads,
                                 workers=args.workers)
    device = device_name(0 if gpu else None)
    result = {
        "device": device, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"model": model_label(args.backbone),
                     "batch_size": args.batch_size, "output_size": args.size, "pastes": "U{0..19}",
                     "amp": "fp16" if gpu else "off", "timed_steps": args.steps,
                     "warmup_steps": args.warmup,
                     "loader_threads": args.threads, "loader_workers": args.workers,
                     "cpu_cores": os.cpu_count(), "data": args.backgrounds or "make_demo_data procedural set",
                     "timing": "wait = next(loader) incl. targets; step = wait + forward/backward/optimizer, "
                               "CUDA synchronised; the loader composites on the same device"},
        "figures": {"training": training, "loader_only_images_per_s": loader_only["images_per_s"]},
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train-{device}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(json.dumps(result["figures"], indent=1, default=float))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
