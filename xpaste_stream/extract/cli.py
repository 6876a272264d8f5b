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
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = from_dict(ExtractConfig, {"inputs": args.inputs, "output": args.output,
                                    "maxcount": args.maxcount}, "extract")
    print(json.dumps(run_extract(cfg), indent=1))
    return 0
