"""Stage 2 driver: image shards -> segment -> clean -> filter -> select -> instance shards.

Work units: `maxcount` samples of one input shard each, keyed by the input's location and size
and written as exactly one instance shard whose number the run manifest gives (manifest.py), so
a rerun skips finished units, an input that was missing and came back becomes new units (no
duplicate, no gap), and nothing depends on listing order. Units run under any executor
(executors.py) with the same function. Within a unit, samples are processed in batches
of `batch_size`: each configured segmenter (built-in, model-backed or plug-in: plugins.py) runs
once per batch, every candidate mask is cleaned (largest contour, holes filled) and checked
(area ratio, segmenter confidence), and each image keeps one mask by the selection rule:
- `clip-score` (a CLIP scorer is configured): all candidates of the batch are CLIP-scored in one
  forward pass and the highest score wins (the original method);
- `segmenter-confidence` (no scorer): the candidate its segmenter is most confident in wins.
Ties go to the segmenter listed first. The rule, the winner and every candidate's confidence
(and score) are written into the instance JSON. Images that give no usable object are counted by
reason in the shard stats and recorded, with a thumbnail, in `rejects/` beside the instance
shards (rejects.py); the run goes on.

The per-category CLIP bar needs every score of a category, so it is applied when the bank is
indexed (`xpaste-stream index --min-clip`), not here.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from .. import formats, urls
from ..config import ConfigError, check
from ..executors import ExecutorConfig, run_units, start_ray, unit_summary, wants_gpu
from ..manifest import (
    RunManifest,
    identity_location,
    input_identity,
    open_run,
    output_files,
    settings_of,
)
from ..remote import check_location
from ..shards import (
    ShardWriter,
    TarDamage,
    check_components,
    check_output_pattern,
    gather_units,
    index_keys,
    iter_tar,
    read_stats,
    resolve_inputs,
    sample_key,
    unit_finished,
)
from . import plugins
from .clip_score import ClipConfig, ClipScorer
from .models import Precision
from .postprocess import clean_mask, tight_box
from .rejects import Rejected, RejectsWriter, rejects_path
from .segmenters import SegmentResult

# why an image gave no instance, from the candidate that came closest to surviving
CANDIDATE_REASONS = ("low_confidence", "mask_too_large", "mask_too_small", "empty_mask")


@dataclass
class ExtractConfig:
    inputs: list[str]
    output: str = "runs/xpaste/instances/inst-{shard:06d}.tar"
    # Candidate masks per image, one per segmenter: built-in names (plain-background, grabcut,
    # clipseg, sam, sam3, semantic-foreground), entry points of group `xpaste_stream.segmenters`
    # or `module:Class` plug-ins. The embedded default needs no weights.
    segmenters: list[str] = field(default_factory=lambda: ["plain-background"])
    # keyword options per segmenter, e.g. {"sam": {"model": "/models/sam-vit-h", "prompt": "clipseg"}}
    segmenter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    scorer: Literal["none", "clip"] = "none"
    clip: ClipConfig = field(default_factory=ClipConfig)
    device: str = "auto"               # segmenter models: "auto" = cuda when available
    precision: Precision = "auto"      # segmenter models: auto = float16 on a GPU, float32 on CPU
    local_files_only: bool = True      # never download segmenter weights
    batch_size: int = 32               # images per batch (x segmenters = masks per CLIP forward)
    mask_threshold: int = 128          # binarise alpha at 128 (original)
    min_area_ratio: float = 0.05       # keep masks covering 5..95 % of the image (original)
    max_area_ratio: float = 0.95
    min_confidence: float = 0.0        # drop candidates their segmenter is less sure of (0: off)
    rejects: Literal["none", "list", "thumbnails"] = "thumbnails"  # what rejects/ keeps
    thumbnail_side: int = 96
    jpeg_quality: int = 95
    maxcount: int = 1000
    maxsize: int = 1 << 30

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: no image shards given")
        if not 0 <= self.min_area_ratio < self.max_area_ratio <= 1:
            raise ValueError("need 0 <= min_area_ratio < max_area_ratio <= 1")
        if not 1 <= self.mask_threshold <= 255:
            raise ValueError("mask_threshold must be in 1..255")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError("min_confidence must be in [0, 1]")
        if self.batch_size < 1 or self.thumbnail_side < 8:
            raise ValueError("batch_size must be >= 1 and thumbnail_side >= 8")
        if self.maxcount < 1 or self.maxsize < 1:
            raise ValueError(f"maxcount {self.maxcount} and maxsize {self.maxsize} must be >= 1")
        names = self.segmenters
        if not names or len(set(names)) != len(names):
            raise ValueError(f"segmenters {names}: give at least one, each once")
        stray = sorted(set(self.segmenter_options) - set(names))
        if stray:
            raise ValueError(f"segmenter_options for {stray}, which are not among segmenters {names}")
        check_output_pattern(self.output)

    @property
    def selection(self) -> str:
        return "clip-score" if self.scorer == "clip" else "segmenter-confidence"

    def runtime(self) -> dict:
        return {"device": self.device, "precision": self.precision,
                "local_files_only": self.local_files_only}

    def check_models(self) -> None:
        """Every segmenter resolves and its weights, like CLIP's, are here before any work."""
        for spec in self.segmenters:
            plugins.check(spec, self.segmenter_options.get(spec, {}), self.local_files_only)
        if self.scorer == "clip":
            from .clip_score import resolve_checkpoint

            resolve_checkpoint(self.clip.model, self.clip.pretrained, self.clip.cache_dir)

    def check_inputs(self) -> None:
        """Every input exists, is a tar and holds image samples (errors name the shard)."""
        resolve_inputs(self.inputs, schema=formats.IMAGE_SCHEMA, stage="extract")


@dataclass
class _Candidate:
    """One segmenter's cleaned mask of an image, cropped to its tight box."""

    segmenter: str
    box: tuple[int, int, int, int]
    ratio: float
    confidence: float
    rgb: np.ndarray
    mask: np.ndarray
    score: float | None = None


def _samples(urls_: list[str], damage: list[TarDamage]) -> Iterator[dict]:
    for url in urls_:
        if not urls.exists(url):
            damage.append(TarDamage(url, "missing shard", 0))
            continue
        yield from iter_tar(url, damage, complete=_whole)


def _whole(sample: dict) -> bool:
    """A sample read where its shard is cut short counts when every component is there."""
    return check_components(sample, formats.IMAGE_COMPONENTS) is None


def _decode(sample: dict) -> tuple[dict, np.ndarray] | Rejected:
    """Metadata and RGB pixels of an image sample, or why it cannot be read."""
    problem = check_components(sample, formats.IMAGE_COMPONENTS)
    if problem is not None and problem[0] == "dotted_key":
        return Rejected(*problem)
    try:
        meta = formats.read_image_meta(sample)
        category_id, category = int(meta["category_id"]), str(meta["category"])
    except KeyError as e:
        what = "no json component" if "json" not in sample else f"json lacks {e}"
        return Rejected("missing_metadata", what)
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        return Rejected("missing_metadata", f"unreadable json ({e})")
    if not sample.get("jpg"):
        return Rejected("unreadable_image", "no jpg component", category_id, category)
    try:  # the size its header declares, before anything decodes it
        formats.check_image_header(sample["jpg"], "jpg")
    except formats.FormatError as e:
        return Rejected("image_too_large", str(e), category_id, category)
    try:
        rgb = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return Rejected("unreadable_image", f"jpg does not decode ({e})", category_id, category)
    return meta, rgb


def _run_segmenter(segmenter, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
    """segment() checked against the contract: one (H, W) uint8 or bool mask per image."""
    results = segmenter.segment(images, categories)
    if len(results) != len(images):
        raise RuntimeError(f"segmenter {segmenter.name!r} returned {len(results)} results for "
                           f"{len(images)} images")
    checked = []
    for rgb, r in zip(images, results, strict=True):
        alpha = np.asarray(r.alpha)
        if alpha.dtype == bool:
            alpha = alpha.astype(np.uint8) * 255
        if alpha.shape != rgb.shape[:2] or alpha.dtype != np.uint8:
            raise RuntimeError(f"segmenter {segmenter.name!r} returned a {alpha.dtype} mask of shape "
                               f"{alpha.shape} for a {rgb.shape[:2]} image; expected (H, W) uint8")
        checked.append(SegmentResult(alpha, float(r.confidence)))
    return checked


def _candidate(name: str, rgb: np.ndarray, result: SegmentResult, cfg: ExtractConfig,
               info: dict) -> _Candidate | None:
    """The cleaned mask cropped to its box (None when empty); `info["reason"]` is set when it
    breaks the area or confidence rules."""
    mask = clean_mask(result.alpha, cfg.mask_threshold)
    box = tight_box(mask)
    ratio = float((mask > 0).mean())
    info.update(confidence=round(result.confidence, 4), area_ratio=round(ratio, 4))
    if box is None:
        info["reason"] = "empty_mask"
    elif ratio < cfg.min_area_ratio:
        info["reason"] = "mask_too_small"
    elif ratio > cfg.max_area_ratio:
        info["reason"] = "mask_too_large"
    elif result.confidence < cfg.min_confidence:
        info["reason"] = "low_confidence"
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return _Candidate(name, box, ratio, result.confidence, np.ascontiguousarray(rgb[y0:y1, x0:x1]),
                      np.ascontiguousarray(mask[y0:y1, x0:x1]))


def _rejected(meta: dict, rgb: np.ndarray, near: list[_Candidate], info: dict) -> Rejected:
    """Why no candidate survived; the most confident near miss is kept for a thumbnail."""
    reasons = [i["reason"] for i in info.values()]
    reason = min(reasons, key=CANDIDATE_REASONS.index)
    detail = "; ".join(f"{s}: {i['reason']} (area {i['area_ratio']}, confidence {i['confidence']})"
                       for s, i in info.items())
    best = max(near, key=lambda c: c.confidence) if near else None
    crop = (best.rgb, best.mask) if best else (rgb, np.full(rgb.shape[:2], 255, np.uint8))
    return Rejected(reason, detail, int(meta["category_id"]), str(meta["category"]), info, crop)


def extract_batch(samples: list[dict], segmenters: list, scorer: ClipScorer | None,
                  cfg: ExtractConfig) -> list[dict | Rejected]:
    """Image samples -> instance samples (or why each yields none: `Rejected`), in order."""
    decoded = [_decode(s) for s in samples]
    readable = [i for i, d in enumerate(decoded) if not isinstance(d, Rejected)]
    images = [decoded[i][1] for i in readable]
    categories = [str(decoded[i][0]["category"]) for i in readable]
    outputs = {s.name: _run_segmenter(s, images, categories) for s in segmenters} if images else {}
    found: dict[int, list[_Candidate]] = {}
    results: list[dict | Rejected | None] = list(decoded)
    for j, i in enumerate(readable):
        meta, rgb = decoded[i]
        info: dict[str, dict] = {}
        near: list[_Candidate] = []
        for name, out in outputs.items():
            info[name] = {}
            cand = _candidate(name, rgb, out[j], cfg, info[name])
            if cand is not None:
                (near if "reason" in info[name] else found.setdefault(i, [])).append(cand)
        results[i] = None if i in found else _rejected(meta, rgb, near, info)
    if scorer is not None:
        flat = [(c, decoded[i][0]["category"]) for i, cands in found.items() for c in cands]
        scores = scorer.score([(c.rgb, c.mask, name) for c, name in flat])
        for (c, _), s in zip(flat, scores, strict=True):
            c.score = round(float(s), 4)
    for i, cands in found.items():
        results[i] = _instance(samples[i], decoded[i][0], cands, scorer is not None, cfg)
    return results


def _instance(sample: dict, meta: dict, found: list[_Candidate], scored: bool,
              cfg: ExtractConfig) -> dict:
    rank = (lambda c: c.score) if scored else (lambda c: c.confidence)
    best = max(found, key=rank)  # max keeps the first of equals: the segmenter listed first
    x0, y0, x1, y1 = best.box
    extra = {"candidate_scores": {c.segmenter: c.score for c in found}} if scored else {}
    return formats.instance_sample(
        sample["__key__"], best.rgb, best.mask, category_id=meta["category_id"],
        category=meta["category"], clip_score=best.score, source_key=sample["__key__"],
        generator=meta["generator"], segmenter=best.segmenter, jpeg_quality=cfg.jpeg_quality,
        source_box=[x0, y0, x1 - x0, y1 - y0], area_ratio=round(best.ratio, 4),
        selection=cfg.selection, confidence=round(best.confidence, 4),
        candidate_confidences={c.segmenter: round(c.confidence, 4) for c in found}, **extra)


def extract_one(sample: dict, segmenters: list, scorer: ClipScorer | None,
                cfg: ExtractConfig) -> dict | Rejected:
    """One image sample -> an instance sample, or why it yields none."""
    return extract_batch([sample], segmenters, scorer, cfg)[0]


def make_segmenters(cfg: ExtractConfig) -> list:
    """Every configured segmenter, built (model weights loaded) before any image is read."""
    built = [plugins.build(spec, cfg.segmenter_options.get(spec, {}), cfg.runtime())
             for spec in cfg.segmenters]
    names = [s.name for s in built]
    if len(set(names)) != len(names):
        raise ConfigError(f"segmenters {cfg.segmenters} are named {names}: names must differ "
                          "(they label every instance)")
    return built


def make_scorer(cfg: ExtractConfig) -> ClipScorer | None:
    return ClipScorer.load(cfg.clip) if cfg.scorer == "clip" else None


# settings that do not change what the shards hold
RUNTIME_SETTINGS = ("inputs", "output", "device", "batch_size", "local_files_only", "clip.device",
                    "clip.cache_dir")


@dataclass(frozen=True)
class ExtractUnit:
    """Samples [start, end) of input shard `source` (of `size` bytes), written as shard `shard`.

    The key names the input by identity (`manifest.input_identity`: its real path relative
    to the output, whatever its spelling) and size, so a unit means the same images whatever
    else exists, in what order or how the inputs were listed; shard numbers are given by the run
    manifest (new units after the known ones), never by listing order.
    """

    key: str
    shard: int
    source: str
    start: int
    end: int


def _unit_key(source: str, size: int, start: int, end: int) -> str:
    return f"{source}|{size}|{start:07d}-{end:07d}"


def _input_size(url: str) -> int:
    if urls.is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.size(path))
    return os.path.getsize(urls.local_path(url))


def count_samples(url: str) -> int:
    """Samples in an image shard: from its DALI index, else its stats, else by reading it."""
    keys = index_keys(url)
    if keys is not None:
        return len(keys)
    try:
        stats = read_stats(url)
    except (OSError, ValueError):
        stats = None
    if stats and isinstance(stats.get("count"), int):
        return stats["count"]
    return sum(1 for _ in iter_tar(url, damage=[], complete=_whole))


def plan_units(inputs: list[str], maxcount: int, run: RunManifest, output: str) -> list[ExtractUnit]:
    """Units of `maxcount` samples per input shard, shard numbers from (and into) `run`.
    Inputs are keyed by `input_identity` (one input however it is spelled; the same input
    given twice is planned once).

    Raises ConfigError before work when an input was extracted before with another size (it
    changed: its old instances would stay beside the new ones)."""
    identities: dict[str, str] = {}
    for url in inputs:
        identities.setdefault(input_identity(url, output), url)
    sources = list(identities.values())
    with ThreadPoolExecutor(8) as pool:  # one small read per shard; overlaps remote latency
        sizes = list(pool.map(_input_size, sources))
        counts = list(pool.map(count_samples, sources))
    known: dict[str, str] = {}
    for key in run.units:
        source, size, _ = key.rsplit("|", 2)
        known[source] = size
    changed = [f"{u} ({known[i]} -> {n} bytes)" for (i, u), n in zip(identities.items(), sizes, strict=True)
               if i in known and known[i] != str(n)]
    if changed:
        raise ConfigError(f"extract: input shards changed since they were extracted into "
                          f"{run.path}: {', '.join(changed[:5])}; rerun with --overwrite to start over, "
                          "or write elsewhere")
    spans = [(i, u, size, a, min(a + maxcount, n))
             for (i, u), size, n in zip(identities.items(), sizes, counts, strict=True)
             for a in range(0, max(n, 1), maxcount)]
    keys = [_unit_key(i, size, a, b) for i, _, size, a, b in spans]
    numbers = run.assign(keys)
    return [ExtractUnit(k, numbers[k], u, a, b) for k, (_, u, _, a, b) in zip(keys, spans, strict=True)]


@dataclass
class ExtractJob:
    """What every worker needs to run extract units (picklable: sent to processes and actors)."""

    cfg: ExtractConfig
    fingerprint: str
    num_gpus: float = 0.0

    def setup(self) -> tuple[list, ClipScorer | None]:
        return make_segmenters(self.cfg), make_scorer(self.cfg)

    def run(self, context: tuple[list, ClipScorer | None], unit: ExtractUnit) -> dict:
        return extract_unit(self.cfg, self.fingerprint, *context, unit)


def _unit_samples(unit: ExtractUnit, damage: list[TarDamage]) -> Iterator[tuple[int, dict]]:
    for position, sample in enumerate(_samples([unit.source], damage)):
        if position >= unit.end:
            break
        if position >= unit.start:
            yield position, sample


def extract_unit(cfg: ExtractConfig, fingerprint: str, segmenters: list, scorer: ClipScorer | None,
                 unit: ExtractUnit) -> dict:
    """One work unit -> exactly its instance shard, stats and rejects/ tar; the same under
    every executor."""
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize, run=fingerprint)
    with writer.writing_unit(unit.shard, unit.start, unit.key):
        rejects = None if cfg.rejects == "none" else RejectsWriter(
            writer, cfg.thumbnail_side if cfg.rejects == "thumbnails" else None)
        damage: list[TarDamage] = []

        def flush(batch: list[tuple[int, dict]]) -> None:
            results = extract_batch([s for _, s in batch], segmenters, scorer, cfg)
            for (position, sample), result in zip(batch, results, strict=True):
                key, source = sample_key(sample, formats.IMAGE_COMPONENTS), sample.get("__url__", "")
                if isinstance(result, Rejected):
                    writer.fail(position, result.reason, result.detail, source=source, key=key)
                    if rejects is not None:
                        rejects.add(position, source, key, result)
                else:
                    writer.add(position, result, source=source)

        batch: list[tuple[int, dict]] = []
        for position, sample in _unit_samples(unit, damage):
            batch.append((position, sample))
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        if unit.start == 0:  # damage of an input shard is recorded once, by its first unit
            for d in damage:
                writer.reject_damage(d)
        stats = writer.finish_unit(unit.end)
        if rejects is not None:
            rejects.close()
        return stats


def run_extract(cfg: ExtractConfig, progress: bool = True, scorer: ClipScorer | None = None,
                executor: ExecutorConfig | None = None, overwrite: bool = False) -> dict:
    """Run stage 2 as work units (one per `maxcount` samples of an input shard). `scorer`
    overrides the one `cfg` describes (tests, benchmarks; local executor, 1 worker)."""
    executor = executor or ExecutorConfig()
    check(executor, "extract")
    if scorer is not None and (executor.executor != "local" or executor.workers != 1):
        raise ConfigError("extract: a prebuilt scorer runs only with the local executor, 1 worker")
    check_location(cfg.output)
    inputs = sorted(resolve_inputs(cfg.inputs, schema=formats.IMAGE_SCHEMA, stage="extract"))
    for spec in cfg.segmenters:  # weights missing: fail naming the model before any work
        plugins.check(spec, cfg.segmenter_options.get(spec, {}), cfg.local_files_only)
    run = open_run("extract", cfg.output, settings_of(cfg, RUNTIME_SETTINGS), overwrite=overwrite,
                   extra_outputs=tuple(_rejects_files(cfg.output)) if overwrite else ())
    units = plan_units(inputs, cfg.maxcount, run, cfg.output)
    fingerprint = run.fingerprint
    absent = sorted(identity_location(i, cfg.output) for i in {k.rsplit("|", 2)[0] for k in run.units}
                    - {input_identity(u, cfg.output) for u in inputs})
    todo = [u for u in units if not unit_finished(cfg.output, u.key, u.shard, fingerprint)]
    if todo and executor.executor == "ray":
        start_ray(executor.ray_address)
    run.save()
    in_process = executor.executor == "local" and executor.workers == 1
    context = (make_segmenters(cfg), scorer if scorer is not None else make_scorer(cfg)) \
        if in_process and todo else None
    # (the classical segmenters first: asking about a GPU imports torch, seconds for nothing)
    gpus = 1.0 if any(s not in ("plain-background", "grabcut") for s in cfg.segmenters) \
        and wants_gpu(cfg.device) else 0.0
    run_units(ExtractJob(cfg, fingerprint, gpus), todo, executor, stage="extract", progress=progress,
              context=context, weights=[u.end - u.start for u in todo])
    shard_numbers = sorted({u.shard for u in units} | set(run.units.values()))
    summary, writer = gather_units("extract", cfg.output, shard_numbers, maxcount=cfg.maxcount,
                                   maxsize=cfg.maxsize, run=fingerprint)
    summary["damaged_inputs"] = [d for n in shard_numbers
                                 for d in (read_stats(writer.names[n]) or {}).get("damaged_inputs", [])
                                 if d["what"] == "shard"]
    summary["selection"] = cfg.selection
    summary["segmenters"] = list(cfg.segmenters)
    summary.update(**unit_summary(units, todo, executor), absent_inputs=absent)
    return summary


def _rejects_files(pattern: str) -> list[str]:
    """The rejects/ tars beside an instance shard set (removed with it by --overwrite)."""
    return [rejects_path(f) for f in output_files(pattern) if f.endswith(".tar")]
