"""`xpaste-stream extract`: stage 2 from the command line."""

from __future__ import annotations

import json

from .. import executors
from ..config import ConfigError, from_dict
from .stage import ExtractConfig, run_extract


def register(sub) -> None:
    p = sub.add_parser("extract", help="stage 2: segment image shards into instance shards")
    p.add_argument("inputs", nargs="+", help="image shards (brace patterns and globs allowed)")
    p.add_argument("-o", "--output", required=True, help="shard pattern, e.g. out/inst-{shard:06d}.tar")
    p.add_argument("--maxcount", type=int, default=1000)
    p.add_argument("--segmenters", nargs="+", default=["plain-background"],
                   help="candidate segmenters: plain-background (classical default), grabcut, clipseg, "
                        "sam, sam3, semantic-foreground, an entry point, or module:Class")
    p.add_argument("--model", action="append", default=[], metavar="NAME=MODEL",
                   help="hub id (local cache only) or save_pretrained folder for a segmenter, "
                        "e.g. sam=/models/sam-vit-huge (repeatable)")
    p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a segmenter option, VALUE as JSON or text, e.g. sam.prompt=clipseg (repeatable)")
    p.add_argument("--scorer", choices=["none", "clip"], default="none",
                   help="clip: score every candidate mask, keep the best (weights must be local); "
                        "none: keep the candidate its segmenter is most confident in")
    p.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name")
    p.add_argument("--clip-pretrained", default="openai",
                   help="open_clip tag already in the local cache, or a checkpoint path")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (segmenters and CLIP)")
    p.add_argument("--precision", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="auto: float16 on a GPU, float32 on the CPU")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="drop candidates whose segmenter confidence is lower (0: off)")
    p.add_argument("--rejects", choices=["none", "list", "thumbnails"], default="thumbnails",
                   help="what rejects/ beside the output keeps for the report")
    executors.add_arguments(p)
    p.set_defaults(func=_run)


def segmenter_options(models: list[str], options: list[str]) -> dict[str, dict]:
    """--model NAME=MODEL and --option NAME.KEY=VALUE into {name: {key: value}}."""
    out: dict[str, dict] = {}
    for item in models:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise ConfigError(f"--model {item!r}: expected NAME=MODEL, e.g. sam=/models/sam-vit-huge")
        out.setdefault(name, {})["model"] = model
    for item in options:
        target, sep, raw = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot or not name or not key:
            raise ConfigError(f"--option {item!r}: expected NAME.KEY=VALUE, e.g. sam.prompt=clipseg")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[key] = value
    return out


def _run(args) -> int:
    cfg = from_dict(ExtractConfig, {
        "inputs": args.inputs, "output": args.output, "maxcount": args.maxcount,
        "segmenters": args.segmenters, "scorer": args.scorer, "batch_size": args.batch_size,
        "segmenter_options": segmenter_options(args.model, args.option),
        "device": args.device, "precision": args.precision, "min_confidence": args.min_confidence,
        "rejects": args.rejects,
        "clip": {"model": args.clip_model, "pretrained": args.clip_pretrained, "device": args.device,
                 "fp16": args.precision != "float32"}}, "extract")
    summary = run_extract(cfg, progress=not args.quiet, executor=executors.from_arguments(args),
                          overwrite=args.overwrite)
    print(json.dumps(summary, indent=1, default=str))
    return 0
