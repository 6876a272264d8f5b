"""`xpaste-stream report INSTANCE_SHARDS_OR_BANK -o DIR`: what extraction kept, what it threw away.

Reads instance shards (or the shards a bank indexes), the `rejects/` records the extract stage
writes beside them, and the shard stats; writes into DIR (never into a bank folder):
- `summary.json`: per category kept / rejected counts by reason, the rejected samples named by
  shard and key, categories with zero survivors, CLIP score histograms (overall and per LVIS
  frequency group r/c/f when a categories.json is given or found beside the inputs), mask area
  and size distributions, which segmenter won how often and under which selection rule;
- `clip_scores.png`, `masks.png`, `segmenters.png`: the same as plots, each only when it has data (no
  scorer ran: no `clip_scores.png`);
- `grids/kept/*.png`, `grids/rejected/*.png`: random cut-outs per category, RGBA composited on a
  checkerboard (rejected ones from the thumbnails the extract stage kept).
For a bank, instances the index dropped (CLIP bar or near-duplicate) count as rejected with
reason `index_clip_filter` / `index_duplicate`.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import formats, urls
from .config import ConfigError, from_dict
from .extract.rejects import read_rejects
from .shards import iter_indexed, iter_tar, read_stats, resolve_inputs

BANK_SCHEMA = "xpaste.bank/1"
NAMED_REJECTS = 200  # rejected samples named per category in summary.json


@dataclass
class ReportConfig:
    inputs: list[str]                # instance shards (patterns) or one bank folder
    output: str                      # a folder; refused when inside a bank
    categories: str | None = None    # categories.json; None: looked for beside the inputs
    grid_size: int = 16              # cut-outs per grid
    thumbnail_side: int = 64
    bins: int = 20
    seed: int = 0

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give instance shards or a bank folder")
        if self.grid_size < 0 or self.bins < 1 or self.thumbnail_side < 8:
            raise ValueError("need grid_size >= 0, bins >= 1, thumbnail_side >= 8")


def _is_bank(folder: str) -> bool:
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("schema") == BANK_SCHEMA
    except (OSError, ValueError):
        return False


def refuse_bank_folder(output: str) -> None:
    """Reports go where asked, never into (or below) a bank folder."""
    folder = os.path.abspath(output)
    while True:
        if _is_bank(folder):
            raise ConfigError(f"report output {output!r} is inside the bank {folder}: reports are "
                              "never written into a bank folder; choose another -o")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


@dataclass
class _Sources:
    shards: list[str]
    bank: str | None = None
    dropped: dict[tuple[int, int], str] = field(default_factory=dict)  # (shard, jpg block) -> reason


def _sources(inputs: list[str]) -> _Sources:
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        if not _is_bank(inputs[0]):
            raise ConfigError(f"{inputs[0]}: a folder but not a bank (no manifest.json of schema "
                              f"{BANK_SCHEMA}); pass instance shards or a bank")
        return _bank_sources(inputs[0])
    shards = urls.expand(inputs)
    missing = [s for s in shards if not urls.exists(s)]
    if not shards or missing:
        raise ConfigError(f"instance shards not found: {missing or inputs}")
    # image or background shards would give an empty report: refused, naming their kind
    return _Sources(resolve_inputs(shards, schema=formats.INSTANCE_SCHEMAS, stage="report"))


def _bank_sources(bank: str) -> _Sources:
    with open(os.path.join(bank, "manifest.json")) as f:
        manifest = json.load(f)
    shards = [s["path"] for s in manifest["shards"]]
    kept, indexed = manifest["num_instances"], manifest["num_indexed"]
    shard = np.load(os.path.join(bank, "shard.npy"), mmap_mode="r")[kept:indexed]
    block = np.load(os.path.join(bank, "jpg_block.npy"), mmap_mode="r")[kept:indexed]
    clip = manifest.get("clip_filter", {})
    reason = "index_clip_filter" if clip.get("dropped") else "index_duplicate"
    if clip.get("dropped") and manifest.get("num_duplicates"):
        reason = "index_clip_filter_or_duplicate"
    return _Sources(shards, bank, {(int(s), int(b)): reason for s, b in zip(shard, block, strict=True)})


def find_categories(given: str | None, inputs: list[str]) -> str | None:
    """categories.json: the one given, or one beside / above the inputs."""
    if given:
        return given
    for start in inputs[:1]:
        folder = os.path.abspath(start if os.path.isdir(start) else os.path.dirname(start))
        for _ in range(3):
            candidate = os.path.join(folder, "categories.json")
            if os.path.isfile(candidate):
                return candidate
            folder = os.path.dirname(folder)
    return None


def _jpg_blocks(shard: str) -> dict[str, int]:
    """key -> data offset of its jpg / 512, from the shard's DALI index."""
    from .shards import dali_index_path

    path = dali_index_path(shard)
    if not urls.exists(path):
        return {}
    out = {}
    with urls.open_url(path, "rb") as f:
        for line in f.read().decode().splitlines()[1:]:
            parts = line.split()
            for i in range(0, len(parts) - 3, 4):
                if parts[i] == "jpg":
                    out[parts[i + 3].partition(".")[0]] = int(parts[i + 1]) // 512
    return out


class _Grid:
    """Up to k cut-outs per category, a uniform random choice among all seen (the k smallest
    keyed hashes), so the pick does not depend on shard order."""

    def __init__(self, k: int, seed: int, side: int):
        self.k, self.seed, self.side = k, seed, side
        self.items: dict[int, list[tuple[int, bytes]]] = defaultdict(list)

    def _rank(self, key: str) -> int:
        return zlib.crc32(f"{self.seed}:{key}".encode())

    def offer(self, category: int, key: str, load) -> None:
        if not self.k:
            return
        items, rank = self.items[category], self._rank(key)
        if len(items) >= self.k and rank >= items[-1][0]:
            return
        rgba = load()
        if rgba is None:
            return
        items.append((rank, rgba))
        items.sort(key=lambda t: t[0])
        del items[self.k:]


def _mask_of(sample: dict) -> tuple[str, bytes]:
    """(component, bytes) of a sample's alpha; ("", b"") when it has none."""
    try:
        return formats.instance_mask(sample)
    except formats.FormatError:
        return "", b""


def _rgba(jpg: bytes, mask: tuple[str, bytes], side: int) -> bytes | None:
    """A small RGBA PNG of a cut-out from its jpg and (component, bytes) alpha: `mask.lz4`,
    or a PNG (`mask.png`: schema /1 and reject thumbnails); None when it does not decode."""
    component, data = mask
    try:
        rgb = Image.open(io.BytesIO(jpg)).convert("RGB")
        if component == "mask.lz4":
            alpha = Image.fromarray(formats.decode_alpha(data, component, *rgb.size))
        else:
            alpha = Image.open(io.BytesIO(data)).convert("L")
    except (OSError, ValueError):
        return None
    if alpha.size != rgb.size:
        alpha = alpha.resize(rgb.size)
    image = rgb.copy()
    image.putalpha(alpha)
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def checkerboard(height: int, width: int, cell: int = 8) -> np.ndarray:
    ys, xs = np.indices((height, width)) // cell
    return np.where(((ys + xs) % 2 == 0)[..., None], 200, 255).astype(np.uint8).repeat(3, axis=2)


def grid_image(pngs: list[bytes], side: int, columns: int = 8) -> Image.Image:
    """RGBA cut-outs composited on a checkerboard, in rows of `columns` cells."""
    rows = max(1, -(-len(pngs) // columns))
    cols = min(columns, max(1, len(pngs)))
    canvas = Image.fromarray(checkerboard(rows * side, cols * side))
    for i, png in enumerate(pngs):
        cut = Image.open(io.BytesIO(png)).convert("RGBA")
        x = (i % columns) * side + (side - cut.width) // 2
        y = (i // columns) * side + (side - cut.height) // 2
        canvas.paste(cut, (x, y), cut)
    return canvas


def _histogram(values: list[float], bins: int) -> dict:
    if not values:
        return {"count": 0, "edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, float), bins=bins)
    arr = np.asarray(values, float)
    return {"count": len(values), "min": round(float(arr.min()), 4), "max": round(float(arr.max()), 4),
            "mean": round(float(arr.mean()), 4), "median": round(float(np.median(arr)), 4),
            "edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


@dataclass
class _Tally:
    kept: Counter = field(default_factory=Counter)
    rejected: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))
    named: dict[int, list[dict]] = field(default_factory=lambda: defaultdict(list))
    names: dict[int, str] = field(default_factory=dict)
    clip: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    area_ratio: list[float] = field(default_factory=list)
    area: list[float] = field(default_factory=list)
    width: list[float] = field(default_factory=list)
    height: list[float] = field(default_factory=list)
    winners: Counter = field(default_factory=Counter)
    winners_by_category: dict[int, Counter] = field(default_factory=lambda: defaultdict(Counter))
    selection: Counter = field(default_factory=Counter)
    broken: list[dict] = field(default_factory=list)
    damaged: list[dict] = field(default_factory=list)

    def reject(self, category: int, name: str | None, reason: str, where: dict) -> None:
        if name:
            self.names.setdefault(category, name)
        self.rejected[category][reason] += 1
        if len(self.named[category]) < NAMED_REJECTS:
            self.named[category].append({**where, "reason": reason})


def _read_instances(src: _Sources, tally: _Tally, kept_grid: _Grid, rejected_grid: _Grid) -> None:
    for index, shard in enumerate(src.shards):
        blocks = _jpg_blocks(shard) if src.dropped else {}
        damage: list = []
        for sample in iter_indexed(shard) or iter_tar(shard, damage):
            key = sample["__key__"]
            try:
                meta = formats.read_instance_meta(sample)
                category = int(meta["category_id"])
            except (KeyError, ValueError, TypeError) as e:
                tally.broken.append({"shard": shard, "key": key, "problem": f"{type(e).__name__}: {e}"})
                continue
            tally.names.setdefault(category, str(meta.get("category", "")))
            dropped = src.dropped.get((index, blocks.get(key, -1)))
            load = (lambda s=sample: _rgba(s.get("jpg", b""), _mask_of(s),
                                           kept_grid.side))
            if dropped:
                tally.reject(category, None, dropped, {"shard": shard, "key": key})
                rejected_grid.offer(category, key, load)
                continue
            _count_kept(tally, category, meta)
            kept_grid.offer(category, key, load)
        tally.damaged += [{"shard": d.shard, "error": d.error} for d in damage]


def _count_kept(tally: _Tally, category: int, meta: dict) -> None:
    tally.kept[category] += 1
    if meta.get("clip_score") is not None:
        tally.clip[category].append(float(meta["clip_score"]))
    for name, values in (("area_ratio", tally.area_ratio), ("area", tally.area),
                         ("width", tally.width), ("height", tally.height)):
        if meta.get(name) is not None:
            values.append(float(meta[name]))
    segmenter = str(meta.get("segmenter", "?"))
    tally.winners[segmenter] += 1
    tally.winners_by_category[category][segmenter] += 1
    tally.selection[str(meta.get("selection", "clip-score" if meta.get("candidate_scores")
                                 else "unrecorded"))] += 1


def _rejects_folders(shards: list[str]) -> list[str]:
    return sorted({(s.rpartition("/")[0] or ".") for s in shards})


def _read_rejects(src: _Sources, tally: _Tally, grid: _Grid) -> dict:
    """Rejects written by the extract stage beside the instance shards; stats totals to check."""
    from_stats: Counter = Counter()
    for folder in _rejects_folders(src.shards):
        for path in urls.expand(f"{folder}/rejects/*.tar"):
            shard = f"{folder}/{path.rpartition('/')[2]}"
            for record in read_rejects(shard):
                meta = record["meta"]
                category = meta.get("category_id")
                category = -1 if category is None else int(category)
                where = {"shard": meta.get("source_shard"), "key": meta.get("source_key"),
                         "detail": meta.get("detail", "")}
                tally.reject(category, meta.get("category"), meta["reason"], where)
                if "jpg" in record and "mask.png" in record:
                    grid.offer(category, meta.get("source_key", ""),
                               lambda r=record: _rgba(r["jpg"], ("mask.png", r["mask.png"]), grid.side))
        for stats_file in urls.expand(f"{folder}/*.stats.json"):
            stats = read_stats(stats_file[: -len(".stats.json")] + ".tar") or {}
            from_stats.update(stats.get("failures", {}))
    return dict(from_stats)


def _frequencies(path: str | None) -> dict[int, str]:
    if not path:
        return {}
    doc = formats.read_categories(path) if _has_schema(path) else _plain_json(path)
    return {int(c["id"]): c.get("frequency") for c in doc.get("categories", []) if c.get("frequency")}


def _has_schema(path: str) -> bool:
    return "schema" in _plain_json(path)


def _plain_json(path: str) -> dict:
    try:
        with urls.open_url(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable categories file ({e})") from None


def run_report(cfg: ReportConfig) -> dict:
    refuse_bank_folder(cfg.output)
    src = _sources(cfg.inputs)
    categories_path = find_categories(cfg.categories, cfg.inputs)
    frequency = _frequencies(categories_path)
    tally = _Tally()
    kept_grid = _Grid(cfg.grid_size, cfg.seed, cfg.thumbnail_side)
    rejected_grid = _Grid(cfg.grid_size, cfg.seed, cfg.thumbnail_side)
    _read_instances(src, tally, kept_grid, rejected_grid)
    stats_failures = _read_rejects(src, tally, rejected_grid)
    summary = _summary(cfg, src, tally, frequency, categories_path, stats_failures)
    os.makedirs(cfg.output, exist_ok=True)
    summary["files"] = _plots(cfg, summary) + _grids(cfg, tally, kept_grid, rejected_grid)
    with open(os.path.join(cfg.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _summary(cfg: ReportConfig, src: _Sources, tally: _Tally, frequency: dict[int, str],
             categories_path: str | None, stats_failures: dict) -> dict:
    ids = sorted(set(tally.kept) | set(tally.rejected) | set(frequency))
    per_category = {}
    for c in ids:
        rejected = dict(tally.rejected.get(c, {}))
        per_category[str(c)] = {
            "name": tally.names.get(c), "frequency": frequency.get(c), "kept": tally.kept.get(c, 0),
            "rejected": sum(rejected.values()), "rejected_by_reason": rejected,
            "winners": dict(tally.winners_by_category.get(c, {})),
            "clip_score": _histogram(tally.clip.get(c, []), cfg.bins) if tally.clip.get(c) else None,
            "rejected_samples": tally.named.get(c, [])}
    reasons: Counter = Counter()
    for counts in tally.rejected.values():
        reasons.update(counts)
    all_clip = [s for c in ids for s in tally.clip.get(c, [])]
    groups = {g: _histogram([s for c in ids if frequency.get(c) == g for s in tally.clip.get(c, [])],
                            cfg.bins) for g in "rcf"} if frequency else {}
    return {
        "schema": "xpaste.report/1", "inputs": cfg.inputs, "bank": src.bank, "shards": len(src.shards),
        "categories_file": categories_path,
        "kept": sum(tally.kept.values()), "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(reasons), "extract_failures_in_stats": stats_failures,
        "zero_survivor_categories": [{"id": c, "name": tally.names.get(c),
                                      "rejected_by_reason": dict(tally.rejected.get(c, {}))}
                                     for c in ids if c >= 0 and not tally.kept.get(c)],
        "segmenter_wins": dict(tally.winners), "selection_rules": dict(tally.selection),
        "clip_score": {"overall": _histogram(all_clip, cfg.bins), "by_frequency": groups},
        "mask": {name: _histogram(values, cfg.bins) for name, values in
                 (("area_ratio", tally.area_ratio), ("area", tally.area), ("width", tally.width),
                  ("height", tally.height))},
        "broken_instances": tally.broken, "damaged_shards": tally.damaged,
        "categories": per_category}


def _plots(cfg: ReportConfig, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def bars(ax, hist: dict, title: str) -> None:
        if hist.get("count"):
            edges = np.asarray(hist["edges"])
            ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", edgecolor="k")
        ax.set_title(f"{title} (n={hist.get('count', 0)})")

    def save(fig, name: str) -> None:
        path = os.path.join(cfg.output, name)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    # a plot is drawn only for data that exist (no scorer ran: no CLIP plot; nothing kept: no
    # mask or segmenter plot); a panel only for a group with values
    clip = summary["clip_score"]
    panels = [(title, hist) for title, hist in
              [("all", clip["overall"])] + [(f"frequency {g}", h) for g, h in clip["by_frequency"].items()]
              if hist.get("count")]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
        for ax, (title, hist) in zip(axes[0], panels, strict=True):
            bars(ax, hist, f"CLIP score, {title}")
        save(fig, "clip_scores.png")
    masks = [(name, hist) for name, hist in summary["mask"].items() if hist.get("count")]
    if masks:
        fig, axes = plt.subplots(1, len(masks), figsize=(4 * len(masks), 3), squeeze=False)
        for ax, (name, hist) in zip(axes[0], masks, strict=True):
            bars(ax, hist, name)
        save(fig, "masks.png")
    wins = summary["segmenter_wins"]
    if wins:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(wins), list(wins.values()))
        ax.set_title("segmenter wins")
        save(fig, "segmenters.png")
    return written


def _grids(cfg: ReportConfig, tally: _Tally, kept: _Grid, rejected: _Grid) -> list[str]:
    written = []
    for kind, grid in (("kept", kept), ("rejected", rejected)):
        folder = os.path.join(cfg.output, "grids", kind)
        for category, items in sorted(grid.items.items()):
            if not items:
                continue
            os.makedirs(folder, exist_ok=True)
            name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in
                           (tally.names.get(category) or "unknown"))
            stem = f"{category:05d}-{name}" if category >= 0 else f"unknown-{name}"
            path = os.path.join(folder, stem + ".png")
            grid_image([png for _, png in items], cfg.thumbnail_side).save(path)
            written.append(path)
    return written


def register(sub) -> None:
    p = sub.add_parser("report", help="quality report of extracted instances (shards or a bank)")
    p.add_argument("inputs", nargs="+", help="instance shards (patterns allowed) or one bank folder")
    p.add_argument("-o", "--output", required=True, help="report folder (never inside a bank)")
    p.add_argument("--categories", help="categories.json (r/c/f groups); default: found beside the inputs")
    p.add_argument("--grid-size", type=int, default=16, help="cut-outs per category grid (0: none)")
    p.add_argument("--seed", type=int, default=0, help="which random cut-outs the grids show")
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = from_dict(ReportConfig, {"inputs": args.inputs, "output": args.output,
                                   "categories": args.categories, "grid_size": args.grid_size,
                                   "seed": args.seed}, "report")
    summary = run_report(cfg)
    print(f"report: {summary['kept']} kept, {summary['rejected']} rejected "
          f"({', '.join(f'{r} {n}' for r, n in sorted(summary['rejected_by_reason'].items())) or 'none'}); "
          f"{len(summary['zero_survivor_categories'])} categories with zero survivors; "
          f"written to {cfg.output}")
    return 0
