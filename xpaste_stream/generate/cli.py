"""`xpaste-stream generate`: stage 1 from the command line."""

from __future__ import annotations

import json

from .. import executors
from ..config import from_dict
from .stage import GenerateConfig, run_generate


def register(sub) -> None:
    p = sub.add_parser("generate", help="stage 1: generate object images into image shards")
    p.add_argument("-o", "--output", required=True, help="shard pattern, e.g. out/gen-{shard:06d}.tar")
    p.add_argument("--generator", choices=("procedural", "diffusers", "folder"), default="procedural")
    p.add_argument("--categories", help="categories.json (pack-coco) or COCO/LVIS json")
    p.add_argument("--num-categories", type=int, default=20)
    p.add_argument("--images-per-category", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maxcount", type=int, default=1000)
    d = p.add_argument_group("diffusers (--generator diffusers; defaults: the X-Paste recipe)")
    d.add_argument("--model", help="hub id in the local cache, or a local folder (default SD 1.5)")
    d.add_argument("--steps", type=int)
    d.add_argument("--guidance", type=float)
    d.add_argument("--batch-size", type=int)
    d.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--folder", help="--generator folder: ROOT/<category name>/*.{jpg,jpeg,png,webp}")
    executors.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    diffusers = {k: v for k, v in {"model": args.model, "steps": args.steps, "guidance": args.guidance,
                                   "batch_size": args.batch_size, "device": args.device}.items()
                 if v is not None}
    cfg = from_dict(GenerateConfig, {
        "output": args.output, "generator": args.generator, "categories": args.categories,
        "num_categories": args.num_categories, "images_per_category": args.images_per_category,
        "image_size": args.image_size, "seed": args.seed, "maxcount": args.maxcount,
        "diffusers": diffusers, "folder": {"root": args.folder or ""}}, "generate")
    summary = run_generate(cfg, progress=not args.quiet, executor=executors.from_arguments(args),
                           overwrite=args.overwrite)
    print(json.dumps(summary, indent=1))
    return 0
