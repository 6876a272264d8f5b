"""Stage 1 driver: (category, index) work items -> generator -> image shards.

Work items are numbered category-major (position = category slot * images_per_category + index),
so a rerun resumes exactly where the last finished shard ended, and every image's seed derives
from (run seed, category id, index): the same config always yields the same shards, whatever the
batch size. A generator (procedural, diffusers, folder: see base.py) only turns a batch of work
items into images or failures; numbering, shards and resume live here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

from tqdm import tqdm

from .. import errors, formats, urls
from ..config import ConfigError, check
from ..shards import ShardWriter, check_output_pattern
from . import procedural
from .base import Failure, Generator, WorkItem
from .folder import FolderConfig, FolderGenerator
from .text2image import DiffusersConfig, DiffusersGenerator


@dataclass
class GenerateConfig:
    output: str = "runs/xpaste/images/gen-{shard:06d}.tar"
    generator: Literal["procedural", "diffusers", "folder"] = "procedural"
    categories: str | None = None  # categories.json from pack-coco or a COCO/LVIS json; None:
    num_categories: int = 20        # ... the first `num_categories` procedural categories
    images_per_category: int = 1000
    image_size: int = 512
    prompt_template: str = "a photo of a single {name}"
    seed: int = 0
    jpeg_quality: int = 95
    maxcount: int = 1000
    maxsize: int = 1 << 30
    diffusers: DiffusersConfig = field(default_factory=DiffusersConfig)  # generator "diffusers"
    folder: FolderConfig = field(default_factory=FolderConfig)  # generator "folder"

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
        if self.generator == "diffusers" and self.image_size % 8:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 8 for diffusers")
        if self.generator == "folder" and not os.path.isdir(self.folder.root):
            raise ValueError(f"generator 'folder' needs folder.root, a directory; got {self.folder.root!r}")
        check_output_pattern(self.output)

    def check_models(self) -> None:
        """The diffusers weights, and the device they run on, must be on this machine before
        any work starts."""
        if self.generator == "diffusers":
            from .text2image import ModelLoadError, check_model_available

            try:
                check_model_available(self.diffusers)
                errors.check_device(self.diffusers.device, "diffusers.device")
            except (ModelLoadError, ValueError) as e:
                raise ConfigError(str(e)) from None


def load_category_list(path: str) -> list[tuple[int, str]]:
    """(id, name) pairs from a categories.json (pack-coco) or a COCO/LVIS annotation file."""
    try:
        with urls.open_url(path, "rb") as f:
            doc = json.loads(f.read())
        cats = doc["categories"]
        return sorted((int(c["id"]), str(c["name"])) for c in cats)
    except FileNotFoundError:
        raise formats.FormatError(f"{path}: categories file not found") from None
    except (ValueError, KeyError, TypeError) as e:  # not JSON (e.g. a shard), or no list in it
        raise formats.FormatError(f"{path}: no readable 'categories' list "
                                  f"({type(e).__name__}: {e})") from None


def _categories(cfg: GenerateConfig) -> list[tuple[int, str]]:
    if cfg.categories is not None:
        return load_category_list(cfg.categories)
    return list(enumerate(procedural.category_names(cfg.num_categories), start=1))


def make_generator(cfg: GenerateConfig, categories: list[tuple[int, str]]) -> Generator:
    if cfg.generator == "diffusers":
        return DiffusersGenerator(cfg.diffusers, cfg.seed, cfg.image_size)
    if cfg.generator == "folder":
        return FolderGenerator(cfg.folder.root, categories, cfg.image_size)
    return procedural.ProceduralGenerator(cfg.seed, cfg.image_size)


def _work_items(cfg: GenerateConfig, cats: list[tuple[int, str]], counts: list[int],
                start: int) -> Iterator[WorkItem]:
    per = cfg.images_per_category
    for slot, ((cat_id, name), n) in enumerate(zip(cats, counts, strict=True)):
        prompt = cfg.prompt_template.format(name=name.replace("_", " "))
        for index in range(max(0, start - slot * per), n):
            yield WorkItem(slot * per + index, cat_id, name, index, prompt)


def _batches(items: Iterable[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def run_generate(cfg: GenerateConfig, progress: bool = True,
                 generator: Generator | None = None) -> dict:
    """Generate up to `images_per_category` images for every category; returns shard totals.

    `generator` overrides the one the config names (benchmarks pass a prebuilt pipeline).
    Everything that can be checked is checked before work: config, categories, and (when work
    is left: a finished run needs no model) the model and its device.
    """
    check(cfg, "generate")
    cats = _categories(cfg)
    gen = generator if generator is not None else make_generator(cfg, cats)
    per = cfg.images_per_category
    counts = [per if (n := gen.available(name)) is None else min(per, n) for _, name in cats]
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize)
    start = writer.resume()
    done = sum(min(n, max(0, start - slot * per)) for slot, n in enumerate(counts))
    if generator is None and done < sum(counts):
        _check_model_before_work(cfg)
    with tqdm(total=sum(counts), initial=done, desc="generate", unit="img",
              disable=not progress) as bar:
        for batch in _batches(_work_items(cfg, cats, counts, start), gen.batch_size):
            for item, result in zip(batch, gen.generate(batch), strict=True):
                key = formats.image_key(item.category_id, item.index)
                if isinstance(result, Failure):
                    writer.fail(item.position, result.reason, result.detail,
                                source=_source(gen, item), key=key)
                    continue
                height, width = result.rgb.shape[:2]
                meta = {"category_id": item.category_id, "category": item.category,
                        "prompt": item.prompt, "seed": cfg.seed, "generator": gen.name,
                        "width": width, "height": height, **result.meta}
                writer.add(item.position, formats.image_sample(
                    key, formats.encode_jpeg(result.rgb, cfg.jpeg_quality), **meta))
            bar.update(len(batch))
    summary = writer.close()
    errors.record(writer.outcome("generate", summary))
    return {**summary, "generator": gen.name, **gen.report()}


def _check_model_before_work(cfg: GenerateConfig) -> None:
    """ModelLoadError naming a model that is not here; ConfigError for a device that is not."""
    if cfg.generator == "diffusers":
        from .text2image import check_model_available

        check_model_available(cfg.diffusers)
        try:
            errors.check_device(cfg.diffusers.device, "diffusers.device")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _source(gen: Generator, item: WorkItem) -> str:
    """What a failed work item came from: the ingested file, or the generator and its prompt."""
    source_of = getattr(gen, "source_of", None)
    return source_of(item) if source_of is not None else f"{gen.name}: {item.prompt!r}"
