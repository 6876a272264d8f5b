"""`xpaste-stream run PIPELINE.toml`: run the stages a pipeline file names, in order.

A pipeline file has a `[pipeline]` table (`stages = [...]`) and one table per stage, each a
typed config (see pipelines/*.toml). The whole file is checked before any stage starts; each
stage resumes from what an earlier run finished (shards with stats are skipped).

Stages: `scenes` (a procedural COCO/LVIS-format dataset), `pack_coco` (background shards),
`generate` (image shards), `extract` (instance shards), `index` (the instance bank). A `[loader]`
table describes the training loader that consumes them (`loader_from_pipeline`), with the paste
recipe in `[loader.paste]` and batching in `[loader.batching]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

from . import errors, formats, urls
from .config import ConfigError, from_dict, load_toml
from .executors import ExecutorConfig
from .extract import ExtractConfig, run_extract
from .generate import GenerateConfig, run_generate
from .generate.procedural import SceneSpec, category_names, write_scene_dataset
from .loader.config import LoaderConfig, PasteConfig
from .pack import PackCocoConfig, run_pack_coco
from .shards import resolve_inputs

Stage = Literal["scenes", "pack_coco", "generate", "extract", "index"]
STAGE_ORDER = ("scenes", "pack_coco", "generate", "extract", "index")


@dataclass
class ScenesConfig:
    """A procedural scene dataset in COCO/LVIS format: backgrounds without downloads."""

    output: str = "runs/demo/scenes"
    num_categories: int = 20
    num_images: int = 64
    height: int = 480
    width: int = 640
    max_objects: int = 6
    lvis: bool = True
    seed: int = 0

    def validate(self) -> None:
        category_names(self.num_categories)
        if self.num_images < 1 or min(self.height, self.width) < 32:
            raise ValueError("need num_images >= 1 and images of at least 32x32")


@dataclass
class IndexConfig:
    inputs: list[str]
    output: str = "runs/xpaste/bank"
    workers: int | None = None  # None: the pipeline's [executor] workers
    dedup: bool = False
    min_clip: float | None = None  # X-Paste filter: keep score >= min(min_clip, best_c - 1); 21

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: no instance shards given")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be >= 1")

    def check_inputs(self) -> list[str]:
        """Every input exists, is a tar and holds instance samples (errors name the shard)."""
        return resolve_inputs(self.inputs, schema=formats.INSTANCE_SCHEMAS, stage="index")


@dataclass
class LoaderSection:
    """Where the loader reads (shards, bank) and how it pastes and batches."""

    backgrounds: list[str]
    bank: str
    categories: str | None = None  # default: categories.json beside the background shards
    paste: PasteConfig = field(default_factory=PasteConfig)
    batching: LoaderConfig = field(default_factory=LoaderConfig)

    def validate(self) -> None:
        if not self.backgrounds:
            raise ValueError("backgrounds: no background shards given")

    def check_inputs(self) -> None:
        found = urls.expand(self.backgrounds)
        if not found or not all(urls.exists(u) for u in found):
            raise ConfigError(f"background shards {self.backgrounds} not found")
        if not os.path.exists(os.path.join(self.bank, "manifest.json")):
            raise ConfigError(f"bank {self.bank} not found (no manifest.json)")


@dataclass
class PipelineSection:
    name: str = "pipeline"
    stages: list[Stage] = field(default_factory=list)
    # when a stage that ran to its end still fails (and the pipeline stops there): errors.py
    errors: errors.ErrorPolicy = field(default_factory=errors.ErrorPolicy)

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("stages: name at least one stage")
        order = [STAGE_ORDER.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(f"stages must be distinct and in the order {list(STAGE_ORDER)}")


@dataclass
class PipelineConfig:
    pipeline: PipelineSection
    scenes: ScenesConfig | None = None
    pack_coco: PackCocoConfig | None = None
    generate: GenerateConfig | None = None
    extract: ExtractConfig | None = None
    index: IndexConfig | None = None
    loader: LoaderSection | None = None  # what the training loader reads; not a stage
    # how pack_coco, generate, extract and index run their work units; a stage table's
    # `workers` (pack_coco, index) overrides the worker count for that stage
    executor: ExecutorConfig | None = None

    def validate(self) -> None:
        for stage in self.pipeline.stages:
            if getattr(self, stage) is None:
                raise ValueError(f"stage {stage!r} is listed but has no [{stage}] table")


def load_pipeline(path: str, check_models: bool = True) -> PipelineConfig:
    """Parse and check a pipeline file; every error names the file and the key.

    With `check_models`, the weights of every model-backed stage must be on this machine."""
    raw = load_toml(path)
    stages = raw.get("pipeline", {}).get("stages", [])
    if "scenes" in stages and isinstance(raw.get("pack_coco"), dict):
        # scenes feed pack_coco unless the file says otherwise
        scenes_dir = raw.get("scenes", {}).get("output", ScenesConfig.output)
        raw["pack_coco"].setdefault("annotations", os.path.join(scenes_dir, "annotations.json"))
        raw["pack_coco"].setdefault("images", os.path.join(scenes_dir, "images"))
    cfg = from_dict(PipelineConfig, raw, path)
    check_inputs(cfg, path, check_models)
    check_outputs(cfg, path)
    return cfg


def output_folders(cfg: PipelineConfig) -> dict[str, list[str]]:
    """Stage -> the folders (or object-store locations) it writes into."""
    folder = {"scenes": lambda s: [s.output], "index": lambda s: [s.output],
              "pack_coco": lambda s: [os.path.dirname(s.output) or ".",
                                      os.path.dirname(s.categories_path()) or "."]}
    shards_only = lambda s: [os.path.dirname(s.output) or "."]  # noqa: E731
    return {stage: folder.get(stage, shards_only)(getattr(cfg, stage))
            for stage in cfg.pipeline.stages}


def check_outputs(cfg: PipelineConfig, where: str = "pipeline") -> None:
    """Every stage's output location must be usable before the first stage starts (a later
    stage's bad output would otherwise be found only after earlier stages wrote theirs)."""
    from .remote import check_location

    for stage, folders in output_folders(cfg).items():
        for folder in folders:
            problem = urls.output_problem(folder)
            if problem is not None:
                raise ConfigError(f"{where}.{stage}.output: {problem}")
        check_location(getattr(cfg, stage).output, f"{where}.{stage}.output")


# a stage's inputs come from the stages named here when they run in the same pipeline
_PRODUCERS = {"pack_coco": {"scenes"}, "extract": {"generate"}, "index": {"extract"},
              "loader": {"pack_coco", "index"}}


def check_inputs(cfg: PipelineConfig, where: str = "pipeline", check_models: bool = True) -> None:
    """Inputs no stage of this pipeline produces, and model weights, must exist before any work."""
    parts = [*cfg.pipeline.stages, *(["loader"] if cfg.loader else [])]
    for stage in parts:
        section = getattr(cfg, stage)
        checks = [] if _PRODUCERS.get(stage, set()) & set(cfg.pipeline.stages) else ["check_inputs"]
        checks += ["check_models"] if check_models else []
        for name in checks:
            method = getattr(section, name, None)
            try:
                if method is not None:
                    method()
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(f"{where}.{stage}: {e}") from None
        if check_models:
            _check_devices(section, f"{where}.{stage}")


def _check_devices(section, where: str) -> None:
    """Every `device` a stage's config (or a nested one) names must exist on this machine."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_devices(value, f"{where}.{f.name}")
        elif f.name == "device" and isinstance(value, (str, int)):
            try:
                errors.check_device(value, f"{where}.device")
            except ValueError as e:
                raise ConfigError(str(e)) from None


def run_pipeline(cfg: PipelineConfig, progress: bool = True, report: str | None = None,
                 policy: errors.ErrorPolicy | None = None) -> dict:
    """Run the stages in order; the first stage the error policy (default: the file's) fails
    stops the pipeline, and `results["failed"]` says which and why."""
    policy = policy or cfg.pipeline.errors
    results: dict[str, dict] = {}
    for stage in cfg.pipeline.stages:
        started = time.time()
        if progress:
            print(f"== {cfg.pipeline.name}: {stage}", flush=True)
        with errors.collecting() as outcomes:
            results[stage] = _run_stage(cfg, stage, progress)
        results[stage]["wall_seconds"] = round(time.time() - started, 2)
        why = [w for outcome in outcomes for w in policy.judge(errors.record(outcome))]
        if why:
            results["failed"] = {"stage": stage, "why": why}
            break
    if report:
        urls.write_bytes(report, json.dumps(results, indent=1).encode())
    return results


def _run_stage(cfg: PipelineConfig, stage: str, progress: bool) -> dict:
    if stage == "scenes":
        s = cfg.scenes
        done = os.path.join(s.output, "annotations.json")  # written last: the stage's done marker
        if os.path.exists(done):
            return {"annotations": done, "images": os.path.join(s.output, "images"), "resumed": True}
        path = write_scene_dataset(s.output, category_names(s.num_categories), SceneSpec(
            num_images=s.num_images, image_size=(s.height, s.width), max_objects=s.max_objects,
            lvis=s.lvis, seed=s.seed))
        return {"annotations": path, "images": os.path.join(s.output, "images")}
    if stage == "pack_coco":
        return run_pack_coco(cfg.pack_coco, progress, executor=cfg.executor)
    if stage == "generate":
        return run_generate(cfg.generate, progress, executor=cfg.executor)
    if stage == "extract":
        return run_extract(cfg.extract, progress, executor=cfg.executor)
    if stage == "index":
        from .bank import build_index

        i = cfg.index
        summary = build_index(i.check_inputs(), i.output, workers=i.workers, dedup=i.dedup,
                              min_clip=i.min_clip, progress=progress, executor=cfg.executor)
        return {k: v for k, v in summary.items() if k != "shards_read"}
    raise ConfigError(f"unknown stage {stage!r}")


def loader_from_pipeline(path: str, device_id: int | None = None, rank: int | None = None,
                         world_size: int | None = None, **overrides):
    """The CopyPasteLoader a pipeline file's `[loader]` table describes (rank and world size
    from torchrun's environment when not given)."""
    from .loader import CopyPasteLoader

    cfg = load_pipeline(path)
    if cfg.loader is None:
        raise ConfigError(f"{path}: no [loader] table")
    section = cfg.loader
    if cfg.pipeline.stages:  # produced by this pipeline's stages: must exist by now
        section.check_inputs()
    return CopyPasteLoader(section.backgrounds, section.bank, section.paste,
                           config=section.batching, categories=section.categories,
                           device_id=device_id, rank=rank, world_size=world_size, **overrides)


def demo_pipeline(workdir: str, num_categories: int = 20, instances_per_category: int = 30,
                  num_backgrounds: int = 64, image_size: int = 512, seed: int = 0) -> PipelineConfig:
    """The embedded-defaults pipeline: procedural objects and scenes, no weights, no downloads."""
    j = lambda *p: os.path.join(workdir, *p)
    return PipelineConfig(
        pipeline=PipelineSection(name="demo", stages=list(STAGE_ORDER)),
        scenes=ScenesConfig(output=j("scenes"), num_categories=num_categories,
                            num_images=num_backgrounds, seed=seed),
        pack_coco=PackCocoConfig(annotations=j("scenes", "annotations.json"),
                                 images=j("scenes", "images"), output=j("backgrounds", "bg-{shard:06d}.tar"),
                                 maxcount=max(8, num_backgrounds // 4), workers=1),
        generate=GenerateConfig(output=j("images", "gen-{shard:06d}.tar"), num_categories=num_categories,
                                images_per_category=instances_per_category, image_size=image_size,
                                seed=seed, maxcount=200),
        extract=ExtractConfig(inputs=[j("images", "gen-*.tar")],
                              output=j("instances", "inst-{shard:06d}.tar"), maxcount=200),
        index=IndexConfig(inputs=[j("instances", "inst-*.tar")], output=j("bank"), workers=1),
    )


def make_demo_data(workdir: str, num_categories: int = 20, instances_per_category: int = 30,
                   num_backgrounds: int = 64, image_size: int = 512, seed: int = 0,
                   progress: bool = True) -> dict:
    """Build (or resume) the demo data set; returns the paths the loader needs."""
    cfg = demo_pipeline(workdir, num_categories, instances_per_category, num_backgrounds,
                        image_size, seed)
    results = run_pipeline(cfg, progress=progress, report=os.path.join(workdir, "pipeline-report.json"))
    if "failed" in results:
        raise RuntimeError(f"demo data in {workdir}: stage {results['failed']['stage']} failed: "
                           + "; ".join(results["failed"]["why"]))
    return {"backgrounds": urls.expand(os.path.join(workdir, "backgrounds", "bg-*.tar")),
            "categories": cfg.pack_coco.categories_path(), "bank": cfg.index.output}


def register(sub) -> None:
    p = sub.add_parser("run", help="run the stages of a pipeline file (pipelines/*.toml)")
    p.add_argument("config", help="pipeline TOML file")
    p.add_argument("--check", action="store_true", help="only check the file, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .cli import policy_from_args

    cfg = load_pipeline(args.config)
    args.error_policy = policy_from_args(args, cfg.pipeline.errors)  # flags override the file
    if args.check:
        print(f"{args.config}: ok, stages {cfg.pipeline.stages}")
        return 0
    results = run_pipeline(cfg, progress=not args.quiet, policy=args.error_policy)
    print(json.dumps(results, indent=1, default=str))
    return 0
