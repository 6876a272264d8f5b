"""Stage 2 driver: image shards -> segment -> clean -> filter -> score -> instance shards.

Inputs are the samples of the image shards in the order given, numbered from 0, so a rerun
resumes at the first sample no finished instance shard covers. Samples are processed in batches
of `batch_size`: every image is segmented by each configured segmenter, all candidate masks of the
batch are CLIP-scored in one forward pass, each image keeps its best-scoring mask (the original
method), and results are written in input order. Images that give no usable object are counted
by reason in the shard stats (the run goes on).

The per-category CLIP bar needs every score of a category, so it is applied when the bank is
indexed (`xpaste-stream index --min-clip`), not here.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import formats, urls
from ..config import ConfigError
from ..shards import ShardWriter, TarDamage, iter_tar
from .clip_score import ClipConfig, ClipScorer
from .postprocess import clean_mask, tight_box
from .segmenters import SEGMENTERS

SegmenterName = Literal["plain-background", "grabcut"]


@dataclass
class ExtractConfig:
    inputs: list[str]
    output: str = "runs/xpaste/instances/inst-{shard:06d}.tar"
    # Candidate masks per image; with a scorer the best-scoring one is kept, without one only
    # the first segmenter runs. The embedded default needs no weights.
    segmenters: list[SegmenterName] = field(default_factory=lambda: ["plain-background"])
    scorer: Literal["none", "clip"] = "none"
    clip: ClipConfig = field(default_factory=ClipConfig)
    batch_size: int = 32               # images per batch (x segmenters = masks per CLIP forward)
    mask_threshold: int = 128          # binarise alpha at 128 (original)
    min_area_ratio: float = 0.05       # keep masks covering 5..95 % of the image (original)
    max_area_ratio: float = 0.95
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
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        names = self.segmenters
        if not names or len(set(names)) != len(names):
            raise ValueError(f"segmenters {names}: give at least one, each once")
        if len(names) > 1 and self.scorer == "none":
            raise ValueError(f"segmenters {names}: choosing among several masks needs "
                             "scorer = 'clip'")

    def check_models(self) -> None:
        """The CLIP weights must be on this machine before any work starts (never downloaded)."""
        if self.scorer == "clip":
            from .clip_score import resolve_checkpoint

            resolve_checkpoint(self.clip.model, self.clip.pretrained, self.clip.cache_dir)

    def check_inputs(self) -> None:
        found = urls.expand(self.inputs)
        missing = [u for u in found if not urls.exists(u)]
        if not found or missing:
            raise ConfigError(f"image shards not found: {missing or self.inputs}")


@dataclass
class _Candidate:
    """One segmenter's cleaned mask of an image, cropped to its tight box."""

    segmenter: str
    box: tuple[int, int, int, int]
    ratio: float
    rgb: np.ndarray
    mask: np.ndarray
    score: float | None = None


def _samples(urls_: list[str], damage: list[TarDamage]) -> Iterator[dict]:
    for url in urls_:
        if not urls.exists(url):
            damage.append(TarDamage(url, "missing shard", 0))
            continue
        yield from iter_tar(url, damage)


def _candidates(rgb: np.ndarray, segmenters: list, cfg: ExtractConfig) -> list[_Candidate] | str:
    """The masks that pass the area rule, or why none did ("empty_mask" / "area_ratio")."""
    found, reason = [], "empty_mask"
    for segmenter in segmenters:
        mask = clean_mask(segmenter(rgb), cfg.mask_threshold)
        box = tight_box(mask)
        if box is None:
            continue
        ratio = float((mask > 0).mean())
        if not cfg.min_area_ratio <= ratio <= cfg.max_area_ratio:
            reason = "area_ratio"
            continue
        x0, y0, x1, y1 = box
        found.append(_Candidate(segmenter.name, box, ratio, np.ascontiguousarray(rgb[y0:y1, x0:x1]),
                                np.ascontiguousarray(mask[y0:y1, x0:x1])))
    return found or reason


def extract_batch(samples: list[dict], segmenters: list, scorer: ClipScorer | None,
                  cfg: ExtractConfig) -> list[dict | str]:
    """Image samples -> instance samples (or the reason each yields none), in order.

    Without a scorer only the first segmenter runs and its mask is kept unscored.
    """
    segmenters = segmenters if scorer is not None else segmenters[:1]
    prepared: list[tuple[dict, list[_Candidate]] | str] = []
    for sample in samples:
        try:
            meta = formats.read_image_meta(sample)
            rgb = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        except (KeyError, OSError, ValueError):
            prepared.append("unreadable_image")
            continue
        found = _candidates(rgb, segmenters, cfg)
        prepared.append(found if isinstance(found, str) else (meta, found))
    if scorer is not None:
        flat = [(c, p[0]["category"]) for p in prepared if not isinstance(p, str) for c in p[1]]
        scores = scorer.score([(c.rgb, c.mask, name) for c, name in flat])
        for (c, _), s in zip(flat, scores, strict=True):
            c.score = round(float(s), 4)
    return [p if isinstance(p, str) else _instance(sample, *p, scorer is not None, cfg)
            for sample, p in zip(samples, prepared, strict=True)]


def _instance(sample: dict, meta: dict, found: list[_Candidate], scored: bool,
              cfg: ExtractConfig) -> dict:
    best = max(found, key=lambda c: c.score) if scored else found[0]  # first wins ties
    x0, y0, x1, y1 = best.box
    extra = {"candidate_scores": {c.segmenter: c.score for c in found}} if scored else {}
    return formats.instance_sample(
        sample["__key__"], best.rgb, best.mask, category_id=meta["category_id"],
        category=meta["category"], clip_score=best.score, source_key=sample["__key__"],
        generator=meta["generator"], segmenter=best.segmenter, jpeg_quality=cfg.jpeg_quality,
        source_box=[x0, y0, x1 - x0, y1 - y0], area_ratio=round(best.ratio, 4), **extra)


def extract_one(sample: dict, segmenters: list, scorer: ClipScorer | None,
                cfg: ExtractConfig) -> dict | str:
    """One image sample -> an instance sample, or the reason it yields none."""
    return extract_batch([sample], segmenters, scorer, cfg)[0]


def make_segmenters(cfg: ExtractConfig) -> list:
    return [SEGMENTERS[name]() for name in cfg.segmenters]


def make_scorer(cfg: ExtractConfig) -> ClipScorer | None:
    return ClipScorer.load(cfg.clip) if cfg.scorer == "clip" else None


def run_extract(cfg: ExtractConfig, progress: bool = True, scorer: ClipScorer | None = None) -> dict:
    """Run stage 2. `scorer` overrides the one `cfg` describes (tests, benchmarks)."""
    inputs = urls.expand(cfg.inputs)
    segmenters = make_segmenters(cfg)
    scorer = scorer if scorer is not None else make_scorer(cfg)
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
    start = writer.resume()
    damage: list[TarDamage] = []

    def flush(batch: list[tuple[int, dict]]) -> None:
        results = extract_batch([s for _, s in batch], segmenters, scorer, cfg)
        for (position, sample), result in zip(batch, results, strict=True):
            if isinstance(result, str):
                writer.fail(position, result, sample["__key__"])
            else:
                writer.add(position, result)
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
    summary = writer.close()
    summary["damaged_inputs"] = [vars(d) for d in damage]
    return summary
