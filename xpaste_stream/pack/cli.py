"""`xpaste-stream pack-coco`: COCO/LVIS json + image folder -> background shards."""

from __future__ import annotations

import json

from .. import executors
from ..config import from_dict
from .coco import PackCocoConfig, run_pack_coco


def register(sub) -> None:
    p = sub.add_parser("pack-coco", help="pack a COCO/LVIS dataset into background shards")
    p.add_argument("annotations", help="COCO or LVIS annotation json")
    p.add_argument("images", help="folder holding the images named in the json")
    p.add_argument("-o", "--output", required=True, help="shard pattern, e.g. out/bg-{shard:06d}.tar")
    p.add_argument("--categories-out", help="where to write categories.json (default: beside shards)")
    p.add_argument("--maxcount", type=int, default=1000)
    p.add_argument("--maxsize", type=int, default=1 << 30, help="bytes per shard at most")
    p.add_argument("--no-verify", action="store_true", help="do not decode images to check them")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="read file_names that are absolute or leave the image folder with '..'")
    executors.add_arguments(p, workers=2)
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = from_dict(PackCocoConfig, {
        "annotations": args.annotations, "images": args.images, "output": args.output,
        "categories_out": args.categories_out, "maxcount": args.maxcount,
        "maxsize": args.maxsize, "verify_images": not args.no_verify,
        "allow_outside_images": args.allow_outside_images}, "pack-coco")
    summary = run_pack_coco(cfg, progress=not args.quiet, overwrite=args.overwrite,
                            executor=executors.from_arguments(args))
    print(json.dumps(summary, indent=1))
    return 0
