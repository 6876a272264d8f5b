"""`xpaste-stream inspect SHARDS... | BANK`: what a shard set or bank holds, and what is broken.

For shards: samples per kind and schema version, categories, component sizes, broken samples
(missing components, unreadable JSON, wrong schema) and damaged shards (truncated tar), plus
whether each shard has its DALI index and stats file. For a bank folder: its description.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from . import formats, urls
from .shards import TarDamage, dali_index_path, iter_tar, stats_path

_REQUIRED = {
    formats.IMAGE_SCHEMA: set(formats.IMAGE_COMPONENTS),
    formats.INSTANCE_SCHEMA: set(formats.INSTANCE_COMPONENTS),
    formats.BACKGROUND_SCHEMA: {"json", "ann.zst"},
}


@dataclass
class ShardReport:
    shards: int = 0
    samples: int = 0
    schemas: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    component_bytes: Counter = field(default_factory=Counter)
    broken: list[dict] = field(default_factory=list)
    damaged: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    without_dali_index: list[str] = field(default_factory=list)
    without_stats: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"shards": self.shards, "samples": self.samples, "schemas": dict(self.schemas),
                "categories": len(self.categories),
                "instances_per_category": {str(k): v for k, v in sorted(self.categories.items())},
                "component_bytes": dict(self.component_bytes), "broken": self.broken,
                "damaged": self.damaged, "missing": self.missing,
                "without_dali_index": self.without_dali_index, "without_stats": self.without_stats}


def _check_sample(sample: dict, report: ShardReport) -> None:
    where = f"{sample['__url__']}:{sample['__key__']}"
    try:
        meta = json.loads(sample["json"])
    except KeyError:
        report.broken.append({"sample": where, "problem": "no json component"})
        return
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.broken.append({"sample": where, "problem": f"unreadable json ({e})"})
        return
    schema = meta.get("schema", "?")
    report.schemas[schema] += 1
    required = _REQUIRED.get(schema)
    if required is None:
        report.broken.append({"sample": where, "problem": f"unknown schema {schema!r}"})
        return
    missing = required - set(sample)
    if schema == formats.BACKGROUND_SCHEMA and not set(formats.BACKGROUND_IMAGE_EXTS) & set(sample):
        missing.add("jpg|png")
    if missing:
        report.broken.append({"sample": where, "problem": f"missing {sorted(missing)}"})
        return
    if schema == formats.BACKGROUND_SCHEMA:
        try:
            _, anns = formats.read_background(sample)
        except (formats.FormatError, ValueError) as e:
            report.broken.append({"sample": where, "problem": f"unreadable annotations ({e})"})
            return
        report.categories.update(a["category_id"] for a in anns)
    else:
        report.categories[meta.get("category_id")] += 1


def inspect_shards(shard_urls: list[str]) -> ShardReport:
    report = ShardReport()
    for url in shard_urls:
        if not urls.exists(url):
            report.missing.append(url)
            continue
        report.shards += 1
        damage: list[TarDamage] = []
        for sample in iter_tar(url, damage):
            report.samples += 1
            for k, v in sample.items():
                if not k.startswith("__"):
                    report.component_bytes[k] += len(v)
            _check_sample(sample, report)
        report.damaged.extend(vars(d) for d in damage)
        if not urls.exists(dali_index_path(url)):
            report.without_dali_index.append(url)
        if not urls.exists(stats_path(url)):
            report.without_stats.append(url)
    return report


def format_report(report: ShardReport) -> str:
    lines = [f"{report.shards} shards, {report.samples:,} samples"]
    for schema, n in report.schemas.most_common():
        lines.append(f"  schema {schema}: {n:,} samples")
    if report.categories:
        counts = sorted(report.categories.values())
        lines.append(f"  categories: {len(counts)} (objects per category: min {counts[0]}, "
                     f"median {counts[len(counts) // 2]}, max {counts[-1]})")
    for comp, n in sorted(report.component_bytes.items()):
        lines.append(f"  .{comp}: {n / max(report.samples, 1) / 1024:.1f} KiB per sample on average")
    problems = [("missing shards", report.missing), ("damaged shards", report.damaged),
                ("broken samples", report.broken), ("shards without a DALI index", report.without_dali_index),
                ("shards without stats (unfinished or foreign)", report.without_stats)]
    for title, items in problems:
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines.extend(f"    {item}" for item in items[:10])
            if len(items) > 10:
                lines.append(f"    ... and {len(items) - 10} more")
    if not any(items for _, items in problems[:3]):
        lines.append("  no broken samples")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("inspect", help="describe shards or a bank: counts, categories, problems")
    p.add_argument("paths", nargs="+", help="shards (brace patterns, globs) or one bank folder")
    p.add_argument("--categories", help="categories.json, for a bank's frequency groups")
    p.add_argument("--plot", action="store_true", help="bank: also write a histogram PNG")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if len(args.paths) == 1 and os.path.isdir(args.paths[0]):
        from .bank import describe_bank

        print(describe_bank(args.paths[0], category_meta=args.categories, plot=args.plot))
        return 0
    report = inspect_shards(urls.expand(args.paths))
    print(json.dumps(report.as_dict(), indent=1) if args.json else format_report(report))
    return 1 if (report.broken or report.damaged or report.missing) else 0
