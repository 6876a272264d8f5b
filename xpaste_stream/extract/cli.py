"""`xpaste-stream extract`: stage 2 from the command line."""

from __future__ import annotations

import json

from ..config import from_dict
from .stage import ExtractConfig, run_extract


def register(sub) -> None:
    p = sub.add_parser("extract", help="stage 2: segment image shards into instance shards")
    p.add_argument("inputs", nargs="+", help="image shards (brace patterns and globs allowed)")
    p.add_argument("-o", "--output", required=True, help="shard pattern, e.g. out/inst-{shard:06d}.tar")
    p.add_argument("--maxcount", type=int, default=1000)
    p.add_argument("--segmenters", nargs="+", default=["plain-background"],
                   help="candidate segmenters (plain-background, grabcut); several need --scorer clip")
    p.add_argument("--scorer", choices=["none", "clip"], default="none",
                   help="clip: score every candidate mask, keep the best (weights must be local)")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name")
    p.add_argument("--clip-pretrained", default="openai",
                   help="open_clip tag already in the local cache, or a checkpoint path")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = from_dict(ExtractConfig, {
        "inputs": args.inputs, "output": args.output, "maxcount": args.maxcount,
        "segmenters": args.segmenters, "scorer": args.scorer, "batch_size": args.batch_size,
        "clip": {"model": args.clip_model, "pretrained": args.clip_pretrained}}, "extract")
    print(json.dumps(run_extract(cfg), indent=1))
    return 0
