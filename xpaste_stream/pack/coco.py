"""pack-coco: a COCO or LVIS annotation file plus its image folder -> background shards.

Reader (annotation file, via `lvis` / pycocotools) -> work units of `maxcount` images (sorted by
id) on any executor (executors.py: this process, local processes, Ray) -> one shard per unit
(ShardWriter: atomic shards, DALI index, stats, rejects list), byte-identical whichever runs them.
Images are stored as they are (no re-encoding).

Two passes, because each background carries its LVIS repeat factor and that factor depends on
which images are packed: first every image is checked (read, decoded, its annotations checked;
an image that cannot be packed is skipped and named, an annotation with an unknown category or a
malformed mask is dropped and named, its image kept); then `categories.json` is computed over the
images that pass (counts, paste-scale statistics, repeat factors) and written; then the images
are packed, masks turned into compressed RLE.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .. import formats, urls
from ..config import ConfigError, check
from ..executors import ExecutorConfig, PlainJob, for_stage, run_units, start_ray, unit_summary
from ..manifest import input_identity, open_run, settings_of
from ..remote import check_location
from ..shards import ShardNames, ShardWriter, check_output_pattern, gather_units, unit_finished

LVIS_RARE_MAX, LVIS_COMMON_MAX = 10, 100  # LVIS frequency groups by training image count


@dataclass
class PackCocoConfig:
    annotations: str
    images: str
    output: str = "runs/backgrounds/bg-{shard:06d}.tar"
    categories_out: str | None = None  # default: categories.json beside the shards
    repeat_threshold: float = 0.001    # LVIS repeat-factor sampling t
    verify_images: bool = True         # decode every image once to catch corrupt files
    allow_outside_images: bool = False  # file_names may be absolute or climb out with `..`
    workers: int | None = None         # None: the executor's (pipeline [executor], --workers)
    maxcount: int = 1000
    maxsize: int = 1 << 30

    def validate(self) -> None:
        if not 0 < self.repeat_threshold < 1:
            raise ValueError("repeat_threshold must be in (0, 1)")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.maxcount < 1 or self.maxsize < 1:
            raise ValueError(f"maxcount {self.maxcount} and maxsize {self.maxsize} must be >= 1")
        check_output_pattern(self.output)

    def check_inputs(self) -> None:
        if not os.path.isfile(self.annotations):
            raise ConfigError(f"annotation file {self.annotations} not found")
        if not os.path.isdir(self.images):
            raise ConfigError(f"image folder {self.images} not found")

    def categories_path(self) -> str:
        return self.categories_out or os.path.join(os.path.dirname(self.output), "categories.json")


def compact_polygons(obj: dict) -> dict:
    """json object_hook: an annotation's polygons as float64 arrays, made while the file is
    parsed. LVIS v1 train has ~100M polygon coordinates: as Python floats in lists they take
    ~3 GB, as arrays ~0.8 GB (pycocotools takes either). Anything that is not a list of
    numeric lists is left as it is, for the checks to judge."""
    seg = obj.get("segmentation")
    if type(seg) is list and seg and all(type(p) is list for p in seg):
        try:
            obj["segmentation"] = [np.array(p, np.float64) for p in seg]
        except (TypeError, ValueError):
            pass
    return obj


def load_dataset(path: str):
    """Open with `lvis.LVIS` when the file is LVIS-format, else `pycocotools.coco.COCO`."""
    try:
        with open(path, encoding="utf-8") as f:  # text: the file's bytes are not held as well
            doc = json.load(f, object_hook=compact_polygons)
    except FileNotFoundError:
        raise formats.FormatError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise formats.FormatError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in doc]
    if not isinstance(doc, dict) or missing:
        raise formats.FormatError(f"{path}: not a COCO/LVIS annotation file (missing {missing})")
    is_lvis = any("frequency" in c for c in doc["categories"])
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries print while indexing
        if is_lvis:
            from lvis import LVIS

            class ParsedLVIS(LVIS):
                """LVIS over an already parsed document (LVIS() insists on reading the file)."""

                def __init__(self, dataset: dict):
                    self.logger = logging.getLogger("lvis")
                    self.dataset = dataset
                    self._create_index()

            ds = ParsedLVIS(doc)
        else:
            from pycocotools.coco import COCO

            ds = COCO()
            ds.dataset = doc
            ds.createIndex()
    return ds, is_lvis


def to_rle(segmentation, height: int, width: int) -> dict:
    """Polygon, uncompressed or compressed RLE -> compressed RLE with a str `counts`."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode() if isinstance(counts, bytes) else counts}


def category_table(categories: list[dict], images: list[dict], annotations: list[dict],
                   is_lvis: bool, repeat_threshold: float) -> list[dict]:
    """Per-category metadata and statistics over the given (packed) images and their
    annotations (docs/FORMATS.md, "Category metadata")."""
    n_images = max(1, len(images))
    area_of = {im["id"]: float(im["height"]) * float(im["width"]) for im in images}
    image_sets: dict[int, set[int]] = {c["id"]: set() for c in categories}
    scales: dict[int, list[float]] = {c["id"]: [] for c in categories}
    for a in annotations:
        cid = a["category_id"]
        if cid not in image_sets or a["image_id"] not in area_of:
            continue
        image_sets[cid].add(a["image_id"])
        if not a.get("iscrowd", 0):
            w, h = a["bbox"][2], a["bbox"][3]
            scales[cid].append(math.sqrt(max(w * h, 0.0) / area_of[a["image_id"]]))
    table = []
    for c in sorted(categories, key=lambda c: c["id"]):
        cid, s = c["id"], np.asarray(scales[c["id"]], float)
        image_count = len(image_sets[cid])
        freq = image_count / n_images
        frequency = c.get("frequency") if is_lvis else None
        if frequency is None:
            frequency = ("r" if image_count <= LVIS_RARE_MAX else
                         "c" if image_count <= LVIS_COMMON_MAX else "f")
        table.append({
            "id": cid, "name": c["name"], "synonyms": c.get("synonyms", [c["name"]]),
            "definition": c.get("def", ""), "frequency": frequency,
            "image_count": image_count, "instance_count": int(len(s)),
            "scale_mean": float(s.mean()) if len(s) else None,
            "scale_std": float(s.std()) if len(s) else None,  # one instance: a measured 0
            "repeat_factor": max(1.0, math.sqrt(repeat_threshold / freq)) if freq > 0 else None,
        })
    return table


# -- workers -----------------------------------------------------------------------------


@dataclass
class ImageCheck:
    """Pass 1 for one image: why it cannot be packed, or which annotations it keeps."""

    failure: tuple[str, str] | None = None       # (reason, detail): the image is skipped
    kept: list[int] = field(default_factory=list)  # indexes of the annotations kept
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) per annotation


def image_path(image: dict, image_dir: str) -> str:
    return os.path.join(image_dir, str(image.get("file_name", "")))


def outside_folder(image: dict, image_dir: str) -> bool:
    """A `file_name` that is absolute or climbs out of the image folder with `..` (judged by
    name, so a folder reached through symlinks stays usable)."""
    name = str(image.get("file_name", ""))
    if os.path.isabs(name) or name.startswith("~"):
        return True
    inside = os.path.normpath(os.path.join(image_dir, name))
    root = os.path.normpath(image_dir)
    return os.path.commonpath([os.path.abspath(inside), os.path.abspath(root)]) != os.path.abspath(root)


def image_key(image: dict) -> str | None:
    """The background key of an image entry; None when its id is not an integer."""
    image_id = image.get("id")
    if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
        return None
    return formats.background_key(image_id)


def check_image(task: tuple) -> ImageCheck:
    """Read and check one image and its annotations (pass 1)."""
    image, anns, image_dir, known_categories, verify, allow_outside = task
    failure = _image_problem(image, image_dir, verify, allow_outside)
    if failure is not None:
        return ImageCheck(failure)
    result = ImageCheck()
    h, w = int(image["height"]), int(image["width"])
    for i, a in enumerate(anns):
        problem = _annotation_problem(a, known_categories, h, w)
        if problem is None:
            result.kept.append(i)
        else:
            result.dropped.append(problem)
    return result


def _image_problem(image: dict, image_dir: str, verify: bool,
                   allow_outside: bool = False) -> tuple[str, str] | None:
    path = image_path(image, image_dir)
    if image_key(image) is None:
        return "bad_image_id", f"{path}: image id {image.get('id')!r} is not a non-negative integer"
    if not image.get("file_name") or not all(isinstance(image.get(k), int) and image[k] > 0
                                             for k in ("width", "height")):
        return "bad_image_entry", (f"image {image['id']}: needs file_name and positive integer "
                                   f"width and height, has {sorted(image)}")
    if not allow_outside and outside_folder(image, image_dir):
        return "image_outside_folder", (f"image {image['id']}: file_name {image['file_name']!r} "
                                        f"is absolute or leaves the image folder {image_dir} "
                                        "(--allow-outside-images reads it)")
    try:
        formats.check_image_dims(image["height"], image["width"], f"{path} (annotation file)")
    except formats.FormatError as e:
        return "image_too_large", str(e)
    data = _read(path)
    if isinstance(data, tuple):
        return data
    try:
        fmt, size = _open_checked(data, path, load=verify)
    except formats.FormatError as e:
        return "image_too_large", str(e)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return "corrupt_image", f"{path}: {type(e).__name__}: {e}"
    if fmt not in _EXTENSIONS:
        return "unsupported_image_format", f"{path}: {fmt}"
    if size != (image["width"], image["height"]):
        return "size_mismatch", (f"{path}: file is {size[0]}x{size[1]}, annotation says "
                                 f"{image['width']}x{image['height']}")
    return None


def _open_checked(data: bytes, path: str, load: bool) -> tuple[str | None, tuple[int, int]]:
    """(PIL format, size) of image bytes whose declared size is within bounds (FormatError if
    not, before anything decodes them); `load`: decode every pixel (a corrupt file raises)."""
    formats.check_image_header(data, path)
    with Image.open(io.BytesIO(data)) as im:
        fmt, size = im.format, im.size
        formats.check_pil_size(im, path)
        if load:
            im.load()
    return fmt, size


def _read(path: str) -> bytes | tuple[str, str]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return "missing_image", f"{path}: {e.strerror or e}"


def _annotation_problem(a: dict, known_categories: set[int], h: int, w: int) -> tuple[str, str] | None:
    if a.get("category_id") not in known_categories:
        return "unknown_category", (f"annotation {a.get('id')}: category id {a.get('category_id')} "
                                    "is not in the file's categories")
    try:
        _annotation(a, h, w)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return "bad_annotation", f"annotation {a.get('id')}: {type(e).__name__}: {e}"
    return None


def _annotation(a: dict, h: int, w: int) -> formats.BackgroundAnnotation:
    bbox = tuple(float(v) for v in a["bbox"])
    if len(bbox) != 4:
        raise ValueError(f"bbox has {len(bbox)} values")
    return formats.BackgroundAnnotation(
        id=int(a["id"]), category_id=int(a["category_id"]), bbox=bbox,
        area=float(a.get("area", 0.0)), iscrowd=int(a.get("iscrowd", 0)),
        rle=to_rle(a["segmentation"], h, w))


_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}


def pack_image(task: tuple) -> dict | tuple[str, str]:
    """Build the background sample of a checked image (pass 2), or return (reason, detail)."""
    image, anns, image_dir, repeat_factors = task
    path = image_path(image, image_dir)
    data = _read(path)
    if isinstance(data, tuple):
        return data
    try:
        ext = _EXTENSIONS.get(_open_checked(data, path, load=False)[0])
    except (OSError, ValueError, SyntaxError) as e:
        return "corrupt_image", f"{path}: changed since it was checked ({type(e).__name__}: {e})"
    if ext is None:
        return "unsupported_image_format", f"{path}: changed since it was checked"
    h, w = int(image["height"]), int(image["width"])
    annotations = [_annotation(a, h, w) for a in anns]
    rf = max([repeat_factors.get(a.category_id) or 1.0 for a in annotations], default=1.0)
    return formats.background_sample(
        formats.background_key(int(image["id"])), data, ext, image_id=int(image["id"]),
        file_name=image["file_name"], width=w, height=h, annotations=annotations,
        neg_category_ids=image.get("neg_category_ids", []),
        not_exhaustive_category_ids=image.get("not_exhaustive_category_ids", []),
        repeat_factor=rf)


# -- work units ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PackUnit:
    """Images [start, end) of the sorted image list, written as shard `shard` (= the unit's
    number): a fixed range whatever else is packed, so a rerun skips the units whose shard
    stats exist. It carries its images, their annotations and (pass 2) their checks, so a
    worker needs nothing else of the annotation file."""

    key: str
    shard: int
    start: int
    end: int
    images: tuple
    anns: tuple                # per image: its annotations (pass 1) or those kept (pass 2)
    checks: tuple = ()         # pass 2: each image's ImageCheck


@dataclass
class CheckJob(PlainJob):
    """Pass 1 as work units: each image checked (picklable: sent to processes and actors)."""

    images: str
    known: set
    verify: bool
    allow_outside: bool

    def run(self, context, unit: PackUnit) -> list[ImageCheck]:
        return [check_image((im, anns, self.images, self.known, self.verify, self.allow_outside))
                for im, anns in zip(unit.images, unit.anns, strict=True)]


@dataclass
class PackJob(PlainJob):
    """Pass 2 as work units: one unit -> exactly its shard and stats, under every executor."""

    cfg: PackCocoConfig
    repeat_factors: dict
    fingerprint: str

    def run(self, context, unit: PackUnit) -> dict:
        cfg = self.cfg
        writer = ShardWriter(cfg.output, maxcount=cfg.maxcount, maxsize=cfg.maxsize,
                             run=self.fingerprint)
        with writer.writing_unit(unit.shard, unit.start, unit.key):
            for position, im, anns, c in zip(range(unit.start, unit.end), unit.images, unit.anns,
                                             unit.checks, strict=True):
                source, key = image_path(im, cfg.images), image_key(im)
                result = c.failure or pack_image((im, anns, cfg.images, self.repeat_factors))
                if isinstance(result, tuple):
                    writer.fail(position, *result, source=source, key=key)
                else:
                    writer.add(position, result, source=source, dropped=c.dropped)
            return writer.finish_unit(unit.end)


def plan_units(images: list[dict], anns: list[list[dict]], maxcount: int,
               checks: list[ImageCheck] | None = None) -> list[PackUnit]:
    """`maxcount` images per unit, in image order; with `checks`, the kept annotations only."""
    if checks is not None:
        anns = [[a[i] for i in c.kept] for a, c in zip(anns, checks, strict=True)]
    return [PackUnit(f"images-{a:09d}-{min(a + maxcount, len(images)):09d}", u, a,
                     min(a + maxcount, len(images)), tuple(images[a:a + maxcount]),
                     tuple(anns[a:a + maxcount]),
                     tuple(checks[a:a + maxcount]) if checks is not None else ())
            for u, a in enumerate(range(0, len(images), maxcount))]


# -- driver ------------------------------------------------------------------------------


def _sort_key(image: dict):
    image_id = image.get("id")
    return (0, image_id, "") if isinstance(image_id, int) else (1, 0, repr(image_id))


def run_settings(cfg: PackCocoConfig) -> dict:
    """What the run manifest fingerprints: the annotation file by identity (relative to the
    output, so a moved project folder resumes) and size (an LVIS json is too big to hash on
    every run), the image folder, every rule that shapes shards."""
    settings = settings_of(cfg, ("output", "categories_out", "workers", "annotations", "images",
                                 "allow_outside_images"))
    if cfg.allow_outside_images:  # recorded only when set: older manifests stay comparable
        settings["allow_outside_images"] = True
    settings.update(annotations=input_identity(cfg.annotations, cfg.output),
                    annotations_bytes=os.path.getsize(cfg.annotations),
                    images=input_identity(cfg.images, cfg.output))
    return settings


def run_pack_coco(cfg: PackCocoConfig, progress: bool = True, overwrite: bool = False,
                  executor: ExecutorConfig | None = None) -> dict:
    """Pack as work units (pass 1 and pass 2: `maxcount` images each) on `executor` (default:
    local, `cfg.workers` or 1 worker); the shards are the same whichever runs them."""
    check(cfg, "pack-coco")
    executor = for_stage(executor, cfg.workers)
    check(executor, "pack-coco")
    cfg.check_inputs()
    check_location(cfg.output)
    run = open_run("pack-coco", cfg.output, run_settings(cfg), overwrite=overwrite)
    ds, is_lvis = load_dataset(cfg.annotations)
    images = sorted(ds.dataset["images"], key=_sort_key)
    anns_of: dict = {}
    for a in ds.dataset["annotations"]:
        anns_of.setdefault(a.get("image_id"), []).append(a)
    anns = [anns_of.get(im.get("id"), []) for im in images]
    if images:
        try:  # a brace range naming too few shards: refused before work
            ShardNames(cfg.output)[(len(images) - 1) // cfg.maxcount]
        except ValueError as e:
            raise ConfigError(f"pack-coco: {e}") from None
    units = plan_units(images, anns, cfg.maxcount)
    # finished units, known before work (stats of another run or unit refuse the output here)
    finished = {u.shard for u in units if unit_finished(cfg.output, u.key, u.shard, run.fingerprint)}
    if executor.executor == "ray":
        start_ray(executor.ray_address)
    run.save()  # the inputs are readable: work starts
    known = {c["id"] for c in ds.dataset["categories"]}
    checked = run_units(CheckJob(cfg.images, known, cfg.verify_images, cfg.allow_outside_images),
                        units, executor, stage="pack-coco: check", progress=progress,
                        weights=[u.end - u.start for u in units])
    checks = [c for unit_checks in checked for c in unit_checks]
    return _pack_all(images, anns, checks, is_lvis, ds.dataset["categories"], cfg, executor,
                     progress, run.fingerprint, finished)


def _pack_all(images: list[dict], anns: list[list[dict]], checks: list[ImageCheck], is_lvis: bool,
              categories: list[dict], cfg: PackCocoConfig, executor: ExecutorConfig,
              progress: bool, run: str, finished: set[int]) -> dict:
    """categories.json over the images that pass, then pass 2: pack the units not finished."""
    packed = [(im, [a[i] for i in c.kept]) for im, a, c in zip(images, anns, checks, strict=True)
              if c.failure is None]
    table = category_table(categories, [im for im, _ in packed],
                           [a for _, kept in packed for a in kept], is_lvis, cfg.repeat_threshold)
    doc = {"schema": formats.CATEGORIES_SCHEMA, "dataset": "lvis" if is_lvis else "coco",
           "source": os.path.abspath(cfg.annotations), "num_images": len(packed),
           "repeat_threshold": cfg.repeat_threshold, "categories": table}
    urls.write_bytes(cfg.categories_path(), json.dumps(doc, indent=1).encode())

    repeat_factors = {c["id"]: c["repeat_factor"] for c in table}
    units = plan_units(images, anns, cfg.maxcount, checks)
    todo = [u for u in units if u.shard not in finished]
    run_units(PackJob(cfg, repeat_factors, run), todo, executor, stage="pack-coco",
              progress=progress, weights=[u.end - u.start for u in todo])
    summary, _ = gather_units("pack-coco", cfg.output, [u.shard for u in units],
                              maxcount=cfg.maxcount, maxsize=cfg.maxsize, run=run)
    return {**summary, "categories": cfg.categories_path(), **unit_summary(units, todo, executor)}
