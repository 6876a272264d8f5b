"""A readable description of a bank: totals, frequency groups, instances-per-category histogram."""

from __future__ import annotations

import os

import numpy as np

from ..formats import read_categories
from .bank import InstanceBank
from .layout import bank_bytes

HISTOGRAM_PNG = "instances_per_category.png"
_BAR_WIDTH = 40


def describe_bank(path: str, category_meta: str | dict | None = None, plot: bool = False) -> str:
    """Text summary of the bank at `path`.

    With `category_meta` (pack-coco categories JSON, path or dict) it adds per LVIS frequency
    group the categories covered and the instances; with `plot` it writes the histogram as
    PNG into the bank folder and names it in the text.
    """
    bank = InstanceBank.open(path)
    m = bank.manifest
    counts = bank.category_counts()
    size = bank_bytes(bank.path)
    lines = [f"instance bank {bank.path}",
             f"  instances      {bank.num_instances:,} drawable, {m['num_indexed']:,} indexed, "
             f"{m['num_duplicates']:,} near-duplicates dropped",
             f"  categories     {len(bank.category_ids):,} with instances",
             f"  shards         {len(bank.shards):,} ({len(m['truncated'])} truncated)",
             f"  index size     {size:,} bytes ({size / max(1, m['num_indexed']):.1f} bytes/instance)"]
    for shard in m["truncated"][:10]:
        lines.append(f"    truncated: {shard}")
    if category_meta is not None:
        lines += _frequency_groups(bank, category_meta)
    lines += ["", "instances per category (categories per bucket):"]
    lines += _text_histogram(counts)
    if plot and len(counts):
        out = plot_histogram(counts, os.path.join(bank.path, HISTOGRAM_PNG))
        lines += ["", f"histogram written to {out}"]
    return "\n".join(lines)


def _frequency_groups(bank: InstanceBank, category_meta: str | dict) -> list[str]:
    doc = read_categories(category_meta) if isinstance(category_meta, str) else category_meta
    in_bank = dict(zip(bank.category_ids.tolist(), bank.category_counts().tolist(), strict=True))
    groups: dict[str, list[int]] = {}
    for c in doc["categories"]:
        groups.setdefault(c.get("frequency") or "?", []).append(int(c["id"]))
    lines = ["", "by frequency group (categories with instances / in the JSON, instances):"]
    for group in sorted(groups):
        ids = groups[group]
        covered = sum(1 for i in ids if i in in_bank)
        lines.append(f"  {group:>3}  {covered:>6} / {len(ids):<6} {sum(in_bank.get(i, 0) for i in ids):>12,}")
    known = {int(c["id"]) for c in doc["categories"]}
    unknown = [c for c in in_bank if c not in known]
    if unknown:
        lines.append(f"  {len(unknown)} categories of the bank are not in the JSON")
    return lines


def _text_histogram(counts: np.ndarray) -> list[str]:
    """Log2 buckets [2^k, 2^(k+1)) of instances per category, one bar each."""
    if not len(counts):
        return ["  (empty)"]
    bucket = np.floor(np.log2(counts)).astype(int)
    tally = np.bincount(bucket)
    top = tally.max()
    lines = []
    for k in range(bucket.min(), len(tally)):
        low, high, n = 2 ** k, 2 ** (k + 1) - 1, tally[k]
        label = f"{low}" if low == high else f"{low}-{high}"
        bar = "#" * max(1 if n else 0, round(_BAR_WIDTH * n / top))
        lines.append(f"  {label:>17}  {n:>7}  {bar}".rstrip())
    return lines


def plot_histogram(counts: np.ndarray, out: str) -> str:
    """The instances-per-category histogram (log2 buckets) as a PNG at `out`."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves global state alone

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    edges = 2.0 ** np.arange(0, np.floor(np.log2(counts.max())) + 2)
    ax.hist(counts, bins=edges)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("instances per category")
    ax.set_ylabel("categories")
    ax.set_title(f"{len(counts)} categories, {int(counts.sum()):,} instances")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out
