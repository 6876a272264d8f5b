"""Stage 1 driver: (category, index) work items -> generator -> image shards.

Work items are numbered category-major, so a rerun resumes exactly where the last finished shard
ended, and every image's seed derives from (run seed, category id, index): the same config
always yields the same shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from tqdm import tqdm

from .. import formats, urls
from ..shards import ShardWriter
from . import procedural


@dataclass
class GenerateConfig:
    output: str = "runs/xpaste/images/gen-{shard:06d}.tar"
    generator: Literal["procedural"] = "procedural"
    categories: str | None = None  # categories.json from pack-coco or a COCO/LVIS json; None:
    num_categories: int = 20        # ... the first `num_categories` procedural categories
    images_per_category: int = 1000
    image_size: int = 512
    prompt_template: str = "a photo of a single {name}"
    seed: int = 0
    jpeg_quality: int = 95
    maxcount: int = 1000
    maxsize: int = 1 << 30

    def validate(self) -> None:
        if self.images_per_category < 1:
            raise ValueError("images_per_category must be >= 1")
        if not 64 <= self.image_size <= 4096:
            raise ValueError(f"image_size {self.image_size} outside 64..4096")
        if "{name}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{name}'")
        if self.categories is None:
            procedural.category_names(self.num_categories)
        elif not urls.exists(self.categories):
            raise ValueError(f"categories file {self.categories} not found")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")


def load_category_list(path: str) -> list[tuple[int, str]]:
    """(id, name) pairs from a categories.json (pack-coco) or a COCO/LVIS annotation file."""
    try:
        with urls.open_url(path, "rb") as f:
            doc = json.loads(f.read())
        cats = doc["categories"]
        return sorted((int(c["id"]), str(c["name"])) for c in cats)
    except FileNotFoundError:
        raise formats.FormatError(f"{path}: categories file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise formats.FormatError(f"{path}: no readable 'categories' list ({e})") from None


def _categories(cfg: GenerateConfig) -> list[tuple[int, str]]:
    if cfg.categories is not None:
        return load_category_list(cfg.categories)
    return list(enumerate(procedural.category_names(cfg.num_categories), start=1))


def run_generate(cfg: GenerateConfig, progress: bool = True) -> dict:
    """Generate `images_per_category` images for every category; returns shard totals."""
    cats = _categories(cfg)
    per = cfg.images_per_category
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
    start = writer.resume()
    total = len(cats) * per
    with tqdm(total=total, initial=min(start, total), desc="generate", unit="img",
              disable=not progress) as bar:
        for position in range(start, total):
            cat_id, name = cats[position // per]
            index = position % per
            rgb = procedural.object_image(cat_id, index, cfg.seed, cfg.image_size)
            writer.add(position, formats.image_sample(
                formats.image_key(cat_id, index), formats.encode_jpeg(rgb, cfg.jpeg_quality),
                category_id=cat_id, category=name,
                prompt=cfg.prompt_template.format(name=name.replace("_", " ")),
                seed=cfg.seed, generator=procedural.GENERATOR,
                width=cfg.image_size, height=cfg.image_size))
            bar.update(1)
    return writer.close()
