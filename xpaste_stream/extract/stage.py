"""Stage 2 driver: image shards -> segment -> clean -> filter -> instance shards.

Inputs are the samples of the image shards in the order given, numbered from 0, so a rerun
resumes at the first sample no finished instance shard covers. Images that give no usable
object are counted by reason in the shard stats (the run goes on).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import formats, urls
from ..config import ConfigError
from ..shards import ShardWriter, TarDamage, iter_tar
from .postprocess import clean_mask, tight_box
from .segmenters import SEGMENTERS


@dataclass
class ExtractConfig:
    inputs: list[str]
    output: str = "runs/xpaste/instances/inst-{shard:06d}.tar"
    segmenter: Literal["plain-background"] = "plain-background"
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

    def check_inputs(self) -> None:
        found = urls.expand(self.inputs)
        missing = [u for u in found if not urls.exists(u)]
        if not found or missing:
            raise ConfigError(f"image shards not found: {missing or self.inputs}")


def _samples(urls_: list[str], damage: list[TarDamage]) -> Iterator[dict]:
    for url in urls_:
        if not urls.exists(url):
            damage.append(TarDamage(url, "missing shard", 0))
            continue
        yield from iter_tar(url, damage)


def extract_one(sample: dict, segmenter, cfg: ExtractConfig) -> dict | str:
    """One image sample -> an instance sample, or the reason it yields none."""
    try:
        meta = formats.read_image_meta(sample)
        rgb = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    except (KeyError, OSError, ValueError):
        return "unreadable_image"
    mask = clean_mask(segmenter(rgb), cfg.mask_threshold)
    box = tight_box(mask)
    if box is None:
        return "empty_mask"
    ratio = float((mask > 0).mean())
    if not cfg.min_area_ratio <= ratio <= cfg.max_area_ratio:
        return "area_ratio"
    x0, y0, x1, y1 = box
    return formats.instance_sample(
        sample["__key__"], np.ascontiguousarray(rgb[y0:y1, x0:x1]),
        np.ascontiguousarray(mask[y0:y1, x0:x1]), category_id=meta["category_id"],
        category=meta["category"], clip_score=None, source_key=sample["__key__"],
        generator=meta["generator"], segmenter=segmenter.name, jpeg_quality=cfg.jpeg_quality,
        source_box=[x0, y0, x1 - x0, y1 - y0], area_ratio=round(ratio, 4))


def run_extract(cfg: ExtractConfig, progress: bool = True) -> dict:
    inputs = urls.expand(cfg.inputs)
    segmenter = SEGMENTERS[cfg.segmenter]()
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
    start = writer.resume()
    damage: list[TarDamage] = []
    with tqdm(desc="extract", unit="img", initial=start, disable=not progress) as bar:
        for position, sample in enumerate(_samples(inputs, damage)):
            if position < start:
                continue
            result = extract_one(sample, segmenter, cfg)
            if isinstance(result, str):
                writer.fail(position, result, sample["__key__"])
            else:
                writer.add(position, result)
            bar.update(1)
    summary = writer.close()
    summary["damaged_inputs"] = [vars(d) for d in damage]
    return summary
