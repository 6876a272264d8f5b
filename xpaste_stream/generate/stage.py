"""Stage 1 driver: (category, index) work items -> generator -> image shards.

Work items are numbered category-major (position = category slot * images_per_category + index)
and cut into fixed work units of `maxcount` positions: unit u is shard u, whatever else exists,
so a rerun skips the units whose shard stats exist and redoes only the others. Every image's seed
derives from (run seed, category id, index): the same config always yields the same shards,
whatever the batch size, the executor (executors.py) or the number of workers. The run manifest
(manifest.py) refuses a rerun with other settings before any work. A generator (procedural,
diffusers, folder: see base.py) only turns a batch of work items into images or failures;
numbering, units, shards and resume live here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

from .. import errors, formats, urls
from ..config import ConfigError, check
from ..executors import ExecutorConfig, run_units, start_ray, unit_summary, wants_gpu
from ..manifest import file_fingerprint, input_identity, open_run, settings_of
from ..remote import check_location
from ..shards import ShardWriter, check_output_pattern, gather_units, unit_finished
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
            got = f"{self.folder.root!r} is not a directory" if self.folder.root else "none given"
            raise ValueError(f"generator 'folder' needs --folder ROOT (folder.root in a pipeline "
                             f"file), a directory of <category name>/ image folders; {got}")
        if self.maxcount < 1 or self.maxsize < 1:
            raise ValueError(f"maxcount {self.maxcount} and maxsize {self.maxsize} must be >= 1")
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


@dataclass(frozen=True)
class GenerateUnit:
    """Positions [start, end) of the category-major numbering, written as shard `shard`.

    Position = category slot * images_per_category + index, so a unit is a fixed set of
    (category, index range) pairs whatever else exists; unit u covers maxcount positions.
    """

    key: str
    shard: int
    start: int
    end: int


def plan_units(cfg: GenerateConfig, num_categories: int) -> list[GenerateUnit]:
    total = num_categories * cfg.images_per_category
    return [GenerateUnit(f"positions-{a:09d}-{min(a + cfg.maxcount, total):09d}", u, a,
                         min(a + cfg.maxcount, total))
            for u, a in enumerate(range(0, total, cfg.maxcount))]


def _unit_items(cfg: GenerateConfig, cats: list[tuple[int, str]], counts: list[int],
                unit: GenerateUnit) -> list[WorkItem]:
    per = cfg.images_per_category
    items = []
    for position in range(unit.start, unit.end):
        slot, index = divmod(position, per)
        if index < counts[slot]:
            cat_id, name = cats[slot]
            prompt = cfg.prompt_template.format(name=name.replace("_", " "))
            items.append(WorkItem(position, cat_id, name, index, prompt))
    return items


def _batches(items: Iterable[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


# settings that do not change what the shards hold
RUNTIME_SETTINGS = ("output", "diffusers.device", "diffusers.batch_size", "diffusers.local_files_only")


def run_settings(cfg: GenerateConfig) -> dict:
    """What the run manifest fingerprints: the config without runtime knobs, and the
    categories file by content."""
    settings = settings_of(cfg, RUNTIME_SETTINGS)
    for other in {"diffusers", "folder"} - {cfg.generator}:  # another generator's table shapes nothing
        settings.pop(other)
    if cfg.categories is not None:
        settings["categories"] = input_identity(cfg.categories, cfg.output)
        settings["categories_sha256"] = file_fingerprint(cfg.categories)
    if cfg.generator == "folder":
        settings["folder"]["root"] = input_identity(cfg.folder.root, cfg.output)
    return settings


@dataclass
class GenerateJob:
    """What every worker needs to run generate units (picklable: sent to processes and actors)."""

    cfg: GenerateConfig
    cats: list[tuple[int, str]]
    counts: list[int]
    fingerprint: str
    num_gpus: float = 0.0

    def setup(self) -> Generator:
        return make_generator(self.cfg, self.cats)

    def run(self, gen: Generator, unit: GenerateUnit) -> dict:
        return generate_unit(self, gen, unit)


def generate_unit(job: GenerateJob, gen: Generator, unit: GenerateUnit) -> dict:
    """One work unit -> exactly its shard (and stats); the same under every executor."""
    cfg = job.cfg
    writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize, run=job.fingerprint)
    with writer.writing_unit(unit.shard, unit.start, unit.key):
        _generate_items(cfg, gen, writer, _unit_items(cfg, job.cats, job.counts, unit))
        return writer.finish_unit(unit.end)


def _generate_items(cfg: GenerateConfig, gen: Generator, writer: ShardWriter,
                    items: list[WorkItem]) -> None:
    for batch in _batches(items, gen.batch_size):
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


def run_generate(cfg: GenerateConfig, progress: bool = True,
                 generator: Generator | None = None, executor: ExecutorConfig | None = None,
                 overwrite: bool = False) -> dict:
    """Generate up to `images_per_category` images for every category; returns shard totals.

    `generator` overrides the one the config names (benchmarks pass a prebuilt pipeline; local
    executor with one worker only). Everything that can be checked is checked before work:
    config, categories, the run manifest (a rerun with other settings is refused), the executor,
    and (when work is left: a finished run needs no model) the model and its device.
    """
    check(cfg, "generate")
    executor = executor or ExecutorConfig()
    check(executor, "generate")
    if generator is not None and (executor.executor != "local" or executor.workers != 1):
        raise ConfigError("generate: a prebuilt generator runs only with the local executor, 1 worker")
    cats = _categories(cfg)
    check_location(cfg.output)
    run = open_run("generate", cfg.output, run_settings(cfg), overwrite=overwrite)
    gen = generator if generator is not None else make_generator(cfg, cats)
    per = cfg.images_per_category
    counts = [per if (n := gen.available(name)) is None else min(per, n) for _, name in cats]
    units = plan_units(cfg, len(cats))
    todo = [u for u in units if not unit_finished(cfg.output, u.key, u.shard, run.fingerprint)]
    if todo and generator is None:
        _check_model_before_work(cfg)
        if executor.executor == "ray":
            start_ray(executor.ray_address)
    gpus = 1.0 if cfg.generator == "diffusers" and wants_gpu(cfg.diffusers.device) else 0.0
    run.save()
    job = GenerateJob(cfg, cats, counts, run.fingerprint, gpus)
    in_process = executor.executor == "local" and executor.workers == 1
    run_units(job, todo, executor, stage="generate", progress=progress,
              context=gen if in_process else None,
              weights=[max(1, sum(1 for _ in _unit_items(cfg, cats, counts, u))) for u in todo])
    summary, _ = gather_units("generate", cfg.output, [u.shard for u in units], maxcount=cfg.maxcount,
                              maxsize=cfg.maxsize, run=run.fingerprint)
    return {**summary, "generator": gen.name, **unit_summary(units, todo, executor), **gen.report()}


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
