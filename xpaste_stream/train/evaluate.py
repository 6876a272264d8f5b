"""Evaluate a training checkpoint on LVIS / COCO validation images: `lvis`' LVISEval (AP,
APr, APc, APf) or pycocotools' COCOeval, boxes and masks.

Images come from an annotation file + its image folder, or from background shards (the
ground truth is then rebuilt from the shards' annotations, LVIS fields included). Predictions
are written in the LVIS / COCO results format with data-set category ids (the model's
contiguous labels mapped back), then scored by the evaluator exactly as a direct call would:

    evaluate(EvalConfig(checkpoint="runs/r50/checkpoint-00090000.pt",
                        annotations="lvis_v1_val.json", images="coco/val2017", output="runs/eval"))
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils

from .. import formats, urls
from ..config import check, device_index, parse_device
from ..pack.coco import load_dataset
from ..shards import iter_tar
from .checkpoint import model_from_checkpoint
from .model import LabelMap

GROUPS = ("r", "c", "f")
TABLE_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
# (images, image ids) -> torchvision outputs with contiguous labels, at the images' own size
Predictor = Callable[[list[torch.Tensor], list[int]], list[dict]]


class EvalError(ValueError):
    """Evaluation inputs that do not fit (named file, what is wrong)."""


@dataclass
class EvalConfig:
    checkpoint: str
    annotations: str | None = None        # LVIS / COCO json ...
    images: str | None = None             # ... and its image folder
    backgrounds: list[str] | None = None  # or background shards (ground truth from them)
    categories: str | None = None         # categories.json of the shards (default: beside them)
    evaluator: Literal["auto", "lvis", "coco"] = "auto"  # auto: LVIS when the data has its fields
    output: str = "runs/eval"             # results.json, predictions.json (+ gt.json for shards)
    batch_size: int = 4
    device: str = "auto"                  # auto, cpu, cuda or cuda:N (config.parse_device)
    detections_per_image: int = 0         # 0: 300 for LVIS, 100 for COCO (the official limits)
    score_threshold: float = 1e-4
    image_size: int = 0                   # longest side at test time; 0: the training size
    max_images: int = 0                   # 0: all

    def validate(self) -> None:
        from_json = self.annotations is not None or self.images is not None
        if from_json == bool(self.backgrounds):
            raise ValueError("give either annotations + images, or backgrounds (shards)")
        if from_json and not (self.annotations and self.images):
            raise ValueError("annotations and images go together (the json and its image folder)")
        if self.batch_size < 1 or self.detections_per_image < 0 or self.max_images < 0:
            raise ValueError("batch_size must be >= 1; detections_per_image and max_images >= 0")
        if not 0 <= self.score_threshold < 1:
            raise ValueError(f"score_threshold {self.score_threshold} must be in [0, 1)")
        self.device = parse_device(self.device)


@dataclass
class EvalImage:
    image_id: int
    image: torch.Tensor  # (3, H, W) uint8 RGB


# -- ground truth and images ------------------------------------------------------------------


def folder_images(doc: dict, folder: str, limit: int = 0) -> Iterator[EvalImage]:
    """The annotation file's images from its folder (LVIS v1 names them by `coco_url`)."""
    from torchvision.io import ImageReadMode, decode_image

    for entry in doc["images"][:limit or None]:
        name = entry.get("file_name") or os.path.basename(entry.get("coco_url", ""))
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise EvalError(f"{path}: image {entry['id']} of the annotation file is not in "
                            f"{folder}") from None
        if formats.skip_oversized(data, f"evaluate: {path}"):  # before it decodes
            continue
        yield EvalImage(int(entry["id"]), decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                       mode=ImageReadMode.RGB))


def shard_ground_truth(background_urls, categories_doc: dict, limit: int = 0) -> tuple[dict, list]:
    """(LVIS / COCO annotation document, encoded images) rebuilt from background shards."""
    images, annotations, encoded = [], [], []
    for url in urls.expand(background_urls):
        for sample in iter_tar(url):
            meta, anns = formats.read_background(sample)
            _, data = formats.background_image(sample)
            images.append({"id": meta["image_id"], "file_name": meta["file_name"],
                           "height": meta["height"], "width": meta["width"],
                           "neg_category_ids": meta["neg_category_ids"],
                           "not_exhaustive_category_ids": meta["not_exhaustive_category_ids"]})
            annotations += [{**a, "image_id": meta["image_id"]} for a in anns]
            encoded.append((meta["image_id"], data))
            if limit and len(images) >= limit:
                break
        if limit and len(images) >= limit:
            break
    categories = [{k: v for k, v in c.items() if k in ("id", "name", "frequency", "synonyms",
                                                        "image_count", "instance_count")}
                  for c in categories_doc["categories"]]
    dataset = categories_doc.get("dataset")
    info = {"xpaste_dataset": dataset} if dataset in ("lvis", "coco") else {}
    return {"info": info, "images": images, "annotations": annotations,
            "categories": categories}, encoded


def decoded(encoded: list[tuple[int, bytes]]) -> Iterator[EvalImage]:
    from torchvision.io import ImageReadMode, decode_image

    for image_id, data in encoded:
        if formats.skip_oversized(data, f"evaluate: image {image_id}"):  # before it decodes
            continue
        yield EvalImage(image_id, decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                               mode=ImageReadMode.RGB))


def ground_truth_format(doc: dict) -> str:
    """'lvis' or 'coco': what the ground truth is, however it was passed (a json, or shards
    whose categories.json names the data set pack-coco read); `--evaluator` forces one."""
    dataset = (doc.get("info") or {}).get("xpaste_dataset")
    if dataset in ("lvis", "coco"):
        return dataset
    return "lvis" if is_lvis(doc) else "coco"


def is_lvis(doc: dict) -> bool:
    return all("frequency" in c for c in doc["categories"]) and \
        all("neg_category_ids" in i for i in doc["images"][:10])


# -- predictions --------------------------------------------------------------------------------


class ModelPredictor:
    """A torchvision detector as a `Predictor`: uint8 images in, outputs at their own size."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model.to(device).eval(), device

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor], image_ids: list[int]) -> list[dict]:
        outputs = self.model([im.to(self.device).float().div_(255) for im in images])
        return [{k: v.cpu() for k, v in out.items()} for out in outputs]


def to_results(output: dict, image_id: int, labels: LabelMap) -> list[dict]:
    """One image's torchvision output -> LVIS / COCO result entries (xywh boxes, category ids,
    masks thresholded at 0.5 as compressed RLE). Scores and boxes stay unrounded: the
    evaluators rank detections of all images by score, so rounding would tie near-equal scores
    of different images and let image order decide (AP changes)."""
    boxes = output["boxes"].float()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    category_ids = labels.to_category_ids(output["labels"]).tolist()
    scores = output["scores"].float().tolist()
    masks = (output["masks"][:, 0] > 0.5).numpy().astype(np.uint8) if len(scores) else []
    out = []
    for i, (box, cid, score) in enumerate(zip(xywh, category_ids, scores, strict=True)):
        rle = mask_utils.encode(np.asfortranarray(masks[i]))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}
        out.append({"image_id": int(image_id), "category_id": int(cid), "score": score,
                    "bbox": box, "segmentation": segmentation})
    return out


def predict_all(predictor: Predictor, images: Iterator[EvalImage], labels: LabelMap,
                batch_size: int, total: int | None = None, progress: bool = False
                ) -> tuple[list[dict], int]:
    """(results of every image, number of images); a progress bar on stderr with `progress`."""
    from tqdm import tqdm

    results, seen, pending = [], 0, []
    bar = tqdm(total=total, desc="evaluate: predict", unit="img", disable=not progress)

    def flush():
        outputs = predictor([p.image for p in pending], [p.image_id for p in pending])
        for p, out in zip(pending, outputs, strict=True):
            results.extend(to_results(out, p.image_id, labels))
        pending.clear()

    for item in images:
        pending.append(item)
        seen += 1
        if len(pending) == batch_size:
            flush()
            bar.update(batch_size)
    if pending:
        bar.update(len(pending))
        flush()
    bar.close()
    return results, seen


# -- metrics ------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_evaluator():
    """LVIS / pycocotools print progress, log at INFO/WARNING and raise numpy warnings (empty
    means of categories without detections): none of it is for the user, the table is."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("lvis", "lvis.lvis", "lvis.eval", "lvis.results")]
    levels = [lg.level for lg in loggers]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@contextlib.contextmanager
def lvis_numpy_compat():
    """lvis 0.5.3 (the last release) accumulates with `np.float`, an alias numpy >= 1.24 removed;
    it is put back (as the builtin float it always was) while LVISEval runs, then removed."""
    added = "float" not in np.__dict__
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            del np.float


def lvis_metrics(gt, predictions: list[dict], max_dets: int) -> dict:
    """LVISEval for boxes and masks, each on its own copy of the predictions (LVISResults
    rewrites them in place)."""
    from lvis import LVISEval, LVISResults

    out = {}
    for iou_type in ("bbox", "segm"):
        with quiet_evaluator(), lvis_numpy_compat():
            ev = LVISEval(gt, LVISResults(gt, copy.deepcopy(predictions), max_dets=max_dets), iou_type)
            ev.run()
        out[iou_type] = {k: float(v) for k, v in ev.get_results().items()}
    return out


def coco_metrics(gt, predictions: list[dict], max_dets: int, frequency: dict[int, str]) -> dict:
    """COCOeval for boxes and masks; APr / APc / APf averaged from per-category AP when the
    categories have frequency groups."""
    from pycocotools.cocoeval import COCOeval

    out = {}
    for iou_type in ("bbox", "segm"):
        with quiet_evaluator():
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(predictions)), iou_type)
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics = dict(zip(TABLE_COLUMNS[:6], (float(v) for v in ev.stats[:6]), strict=True))
        per_category = _per_category_ap(ev.eval["precision"], ev.params.catIds)
        for group in GROUPS:
            values = [ap for cid, ap in per_category.items()
                      if frequency.get(cid) == group and not math.isnan(ap)]
            if values:
                metrics[f"AP{group}"] = float(np.mean(values))
        out[iou_type] = metrics
    return out


def _per_category_ap(precision: np.ndarray, category_ids: list[int]) -> dict[int, float]:
    """AP per category over IoU 0.5:0.95, all areas, the largest detection limit (COCOeval's
    precision array is [IoU, recall, category, area, max dets], -1 where undefined)."""
    out = {}
    for k, cid in enumerate(category_ids):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[int(cid)] = float(p.mean()) if p.size else float("nan")
    return out


def format_table(metrics: dict) -> str:
    """Rows bbox / segm, columns AP ... APr APc APf in percent (results.json holds the same
    values as fractions, as LVISEval / COCOeval give them); '-' where not defined."""
    columns = [c for c in TABLE_COLUMNS if any(c in m for m in metrics.values())]
    lines = ["       " + "".join(f"{c:>8}" for c in columns)]
    for iou_type, m in metrics.items():
        cells = [f"{100 * m[c]:8.2f}" if c in m and m[c] >= 0 else f"{'-':>8}" for c in columns]
        lines.append(f"{iou_type:<7}" + "".join(cells))
    lines.append("(AP in %: results.json holds the same values as fractions)")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig, predictor: Predictor | None = None, labels: LabelMap | None = None,
             progress: bool = False) -> dict:
    """Predict on every image, write predictions.json and results.json, return the results.
    `predictor` / `labels` replace the checkpoint's model (tests, other models)."""
    check(cfg, "evaluate")
    gt_doc, images, gt_path = _ground_truth(cfg)
    lvis = cfg.evaluator == "lvis" or (cfg.evaluator == "auto" and ground_truth_format(gt_doc) == "lvis")
    if lvis and not is_lvis(gt_doc):
        raise EvalError(f"{gt_path}: LVIS evaluation needs LVIS fields (category frequency, "
                        "neg_category_ids and not_exhaustive_category_ids per image); use --evaluator coco")
    max_dets = cfg.detections_per_image or (300 if lvis else 100)
    step = None
    if predictor is None:
        overrides = {"detections_per_image": max_dets, "score_threshold": cfg.score_threshold}
        if cfg.image_size:
            overrides["image_size"] = cfg.image_size
        model, labels, state, _ = model_from_checkpoint(cfg.checkpoint, **overrides)
        step = state["step"]
        predictor = ModelPredictor(model, _device(cfg.device))
    _check_categories(labels, gt_doc, cfg)
    total = len(gt_doc["images"]) if cfg.annotations else None
    if total is not None and cfg.max_images:
        total = min(total, cfg.max_images)
    predictions, n_images = predict_all(predictor, images, labels, cfg.batch_size, total, progress)
    if not predictions:
        raise EvalError(f"{cfg.checkpoint}: no detections on {n_images} images above score "
                        f"{cfg.score_threshold}; nothing to evaluate")
    os.makedirs(cfg.output, exist_ok=True)
    with open(os.path.join(cfg.output, "predictions.json"), "w") as f:
        json.dump(predictions, f)
    gt = _load_ground_truth(gt_path, lvis)
    frequency = {int(c["id"]): c.get("frequency") for c in gt_doc["categories"]}
    metrics = lvis_metrics(gt, predictions, max_dets) if lvis else \
        coco_metrics(gt, predictions, max_dets, frequency)
    results = {"evaluator": "lvis" if lvis else "coco", "checkpoint": cfg.checkpoint, "step": step,
               "ground_truth": gt_path, "images": n_images, "detections": len(predictions),
               "max_dets": max_dets, "score_threshold": cfg.score_threshold, "metrics": metrics}
    with open(os.path.join(cfg.output, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _ground_truth(cfg: EvalConfig) -> tuple[dict, Iterator[EvalImage], str]:
    """(annotation document, its images, the path the evaluator reads it from). A document
    that is not the user's file as is (rebuilt from shards, or cut to `max_images`) is
    written to OUTPUT/gt.json."""
    if cfg.annotations:
        if not os.path.isdir(cfg.images):
            raise EvalError(f"{cfg.images}: image folder not found")
        with contextlib.redirect_stdout(io.StringIO()):
            doc = load_dataset(cfg.annotations)[0].dataset
        images = folder_images(doc, cfg.images, cfg.max_images)
        if not cfg.max_images:
            return doc, images, cfg.annotations
        keep = {int(i["id"]) for i in doc["images"][:cfg.max_images]}
        doc = {**doc, "images": [i for i in doc["images"] if int(i["id"]) in keep],
               "annotations": [a for a in doc["annotations"] if int(a["image_id"]) in keep]}
    else:
        shard_list = urls.expand(cfg.backgrounds)
        missing = [u for u in shard_list if not urls.exists(u)]
        if not shard_list or missing:
            raise EvalError(f"background shards not found: {missing or cfg.backgrounds}")
        categories = cfg.categories or os.path.join(os.path.dirname(shard_list[0]), "categories.json")
        doc, encoded = shard_ground_truth(shard_list, formats.read_categories(categories), cfg.max_images)
        images = decoded(encoded)
    os.makedirs(cfg.output, exist_ok=True)
    gt_path = os.path.join(cfg.output, "gt.json")
    with open(gt_path, "w") as f:
        json.dump(doc, f, default=_plain)   # pack.load_dataset holds polygons as arrays
    return doc, images, gt_path


def _plain(value):
    """json.dump's fallback for numpy values (polygons loaded as float64 arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _load_ground_truth(path: str, lvis: bool):
    """lvis.LVIS for LVISEval, pycocotools' COCO for COCOeval (an LVIS file works with both)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if lvis:
            return load_dataset(path)[0]
        from pycocotools.coco import COCO

        return COCO(path)


def _check_categories(labels: LabelMap, gt_doc: dict, cfg: EvalConfig) -> None:
    """The model must know every category the ground truth has (or evaluation is meaningless)."""
    unknown = sorted({int(c["id"]) for c in gt_doc["categories"]} - set(labels.category_ids))
    if unknown:
        raise EvalError(f"{cfg.checkpoint}: model trained for {len(labels.category_ids)} categories; "
                        f"the evaluation data has {len(unknown)} others ({unknown[:10]})")


def _device(name: str) -> torch.device:
    index = device_index(name)
    return torch.device("cpu") if index is None else torch.device("cuda", index)
