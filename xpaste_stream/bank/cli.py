"""`xpaste-stream index SHARDS... -o BANK`: build or update an instance bank."""

from __future__ import annotations

import argparse
import os

from .. import executors, urls
from .build import build_index
from .layout import STATS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index", help="index instance shards into a bank (category -> shard, offset, size)",
        description="Build or update an instance bank. Rerunning with more shards reads only the "
                    "new or changed ones; a truncated shard is indexed up to its last whole sample.")
    p.add_argument("shards", nargs="+", metavar="SHARDS",
                   help="instance shards: paths, brace patterns ({000000..000099}) or globs")
    p.add_argument("-o", "--output", required=True, metavar="BANK", help="bank folder")
    p.add_argument("--dedup", action="store_true",
                   help="drop near-duplicate images per category (decodes each jpg once to hash it)")
    p.add_argument("--min-clip", type=float, default=None, metavar="SCORE",
                   help="X-Paste CLIP filter: keep an instance if its score >= min(SCORE, best "
                        "score of its category - 1); 21 in the published recipe (default: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    executors.add_arguments(p, workers=2, overwrite=False)
    p.set_defaults(func=run_index)


def run_index(args: argparse.Namespace) -> int:
    shards = urls.expand(args.shards)
    summary = build_index(shards, args.output, dedup=args.dedup, progress=not args.quiet,
                          min_clip=args.min_clip, executor=executors.from_arguments(args))
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"bank {summary['bank']}: {summary['instances']:,} instances in "
             f"{summary['categories']:,} categories from {summary['shards']:,} shards "
             f"({len(summary['shards_read'])} read, {summary['shards_reused']} reused) "
             f"in {summary['seconds']:.1f} s, {summary['bytes_per_instance']} bytes/instance"]
    if summary["duplicates_dropped"]:
        lines.append(f"  near-duplicates dropped: {summary['duplicates_dropped']:,}")
    clip = summary["clip_filter"]
    if clip["min_clip"] is not None:
        lines.append(f"  CLIP filter (min {clip['min_clip']:g}, relaxed per category): "
                     f"{clip['dropped']:,} dropped, {clip['unscored_kept']:,} unscored kept")
    for t in summary["truncated"]:
        lines.append(f"  truncated: {t['shard']} ({t['samples']} whole samples kept; {t['error']})")
    lines.append(f"  stats: {os.path.join(summary['bank'], STATS)}")
    return "\n".join(lines)
