"""Stage 2 driver: image shards -> segment -> clean -> filter -> select -> instance shards.

Inputs are the samples of the image shards in the order given, numbered from 0, so a rerun
resumes at the first sample no finished instance shard covers. Samples are processed in batches
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import errors, formats, urls
from ..config import ConfigError
from ..shards import (
    ShardWriter,
    TarDamage,
    check_components,
    check_output_pattern,
    iter_tar,
    resolve_inputs,
    sample_key,
)
from . import plugins
from .clip_score import ClipConfig, ClipScorer
from .models import Precision
from .postprocess import clean_mask, tight_box
from .rejects import Rejected, RejectsWriter
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


def run_extract(cfg: ExtractConfig, progress: bool = True, scorer: ClipScorer | None = None) -> dict:
    """Run stage 2. `scorer` overrides the one `cfg` describes (tests, benchmarks)."""
    inputs = resolve_inputs(cfg.inputs, schema=formats.IMAGE_SCHEMA, stage="extract")
    for spec in cfg.segmenters:  # weights missing: fail naming the model before any work
        plugins.check(spec, cfg.segmenter_options.get(spec, {}), cfg.local_files_only)
    segmenters = make_segmenters(cfg)
    scorer = scorer if scorer is not None else make_scorer(cfg)
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
    start = writer.resume()
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
            if rejects is not None:
                rejects.note_progress()
        bar.update(len(batch))

    with tqdm(desc="extract", unit="img", initial=start, disable=not progress) as bar:
        batch: list[tuple[int, dict]] = []
        for position, sample in enumerate(_samples(inputs, damage)):
            if position < start:
                continue
            batch.append((position, sample))
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    for d in damage:
        writer.reject_damage(d)
    summary = writer.close()
    errors.record(writer.outcome("extract", summary))
    if rejects is not None:
        rejects.close()
    summary["damaged_inputs"] = [vars(d) for d in damage]
    summary["selection"] = cfg.selection
    summary["segmenters"] = [s.name for s in segmenters]
    return summary
