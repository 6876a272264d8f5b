"""The detectron2 adapter: conversion and config handling with torch alone; Instances and the
train-loader builder only where detectron2 is importable (skipped with the reason otherwise)."""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from xpaste_stream.config import ConfigError
from xpaste_stream.loader.detectron2 import (
    XPASTE_DEFAULTS,
    Detectron2ConfigError,
    check_num_classes,
    contiguous_ids,
    detectron2_fields,
    loader_settings,
)

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
needs_detectron2 = pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed (not on PyPI; "
                                      "build it from source as README.md's detectron2 section shows)")
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "pipelines", "detectron2_lvis_xpaste.yaml")


def sample_target() -> tuple[torch.Tensor, dict]:
    image = torch.stack([torch.full((6, 8), v, dtype=torch.uint8) for v in (10, 20, 30)])
    masks = torch.zeros(3, 6, 8, dtype=torch.uint8)
    masks[0, :2, :2] = masks[1, 2:, 3:] = masks[2, 1:3, 5:] = 1
    return image, {"boxes": torch.tensor([[0, 0, 2, 2], [3, 2, 8, 6], [5, 1, 8, 3]], dtype=torch.float32),
                   "labels": torch.tensor([1203, 5, 1]), "masks": masks,
                   "source": torch.tensor([0, 1, 1], dtype=torch.uint8), "image_id": 42}


def test_fields_follow_detectron2_conventions():
    image, target = sample_target()
    id_map = contiguous_ids({"categories": [{"id": 5}, {"id": 1203}, {"id": 1}, {"id": 9}]})
    assert id_map == {1: 0, 5: 1, 9: 2, 1203: 3}  # thing_dataset_id_to_contiguous_id: sorted ids
    f = detectron2_fields(image, target, id_map, "BGR")
    assert f["classes"].tolist() == [3, 1, 0] and f["classes"].dtype == torch.int64
    assert f["image"][:, 0, 0].tolist() == [30, 20, 10]  # RGB -> BGR
    assert (f["height"], f["width"], f["image_id"]) == (6, 8, 42)
    assert f["masks"].dtype == torch.bool and torch.equal(f["masks"], target["masks"].bool())
    assert torch.equal(f["boxes"], target["boxes"]) and f["source"].tolist() == [0, 1, 1]
    rgb = detectron2_fields(image, target)
    assert torch.equal(rgb["image"], image) and rgb["classes"].tolist() == [1203, 5, 1]


def test_fields_refuse_unknown_ids_and_formats():
    image, target = sample_target()
    with pytest.raises(Detectron2ConfigError, match=r"category ids \[1203\] are not in the id map"):
        detectron2_fields(image, target, {1: 0, 5: 1})
    with pytest.raises(Detectron2ConfigError, match="INPUT.FORMAT 'YUV'"):
        detectron2_fields(image, target, None, "YUV")
    empty = {**target, "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
             "masks": torch.zeros(0, 6, 8, dtype=torch.uint8), "source": torch.zeros(0, dtype=torch.uint8)}
    assert detectron2_fields(image, empty, {1: 0})["classes"].shape == (0,)


def as_namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{k: as_namespace(v) for k, v in value.items()})
    return value


def detectron2_like(xpaste: dict, ims_per_batch: int = 16, num_classes: int = 3):
    """The parts of a detectron2 CfgNode the adapter reads, without detectron2."""
    return SimpleNamespace(XPASTE=SimpleNamespace(**{k: as_namespace(v) if k != "PASTE" else v
                                                     for k, v in xpaste.items()}),
                           SOLVER=SimpleNamespace(IMS_PER_BATCH=ims_per_batch), SEED=-1,
                           MODEL=SimpleNamespace(ROI_HEADS=SimpleNamespace(NUM_CLASSES=num_classes)))


def test_loader_settings_from_a_detectron2_config():
    xpaste = {**XPASTE_DEFAULTS, "BACKGROUNDS": ["bg/bg-*.tar"], "BANK": "bank",
              "PASTE": {**XPASTE_DEFAULTS["PASTE"], "OUTPUT_SIZE": 640, "BLENDING": "alpha"}}
    s = loader_settings(detectron2_like(xpaste), world_size=8)
    assert s["batch_size"] == 2 and s["seed"] == 0 and s["categories"] is None
    assert s["paste"].output_size == 640 and s["paste"].blending == "alpha"
    assert s["paste"].scale_range == (0.1, 2.0) and s["paste"].max_pastes == 19
    with pytest.raises(Detectron2ConfigError, match="IMS_PER_BATCH 16 is not divisible by the 3"):
        loader_settings(detectron2_like(xpaste), world_size=3)
    with pytest.raises(Detectron2ConfigError, match="XPASTE.BACKGROUNDS and XPASTE.BANK"):
        loader_settings(detectron2_like({**xpaste, "BANK": ""}), world_size=1)
    with pytest.raises(ConfigError, match="XPASTE.PASTE: unknown key"):
        loader_settings(detectron2_like({**xpaste, "PASTE": {"OUTPUT_SIZ": 640}}), world_size=1)
    with pytest.raises(Detectron2ConfigError, match="NUM_CLASSES is 3, but cats.json lists 4"):
        check_num_classes(detectron2_like(xpaste), {1: 0, 2: 1, 3: 2, 4: 3}, "cats.json")


def test_lvis_example_config_uses_known_keys():
    with open(EXAMPLE) as f:
        example = yaml.safe_load(f)
    xpaste = example["XPASTE"]
    assert set(xpaste) <= set(XPASTE_DEFAULTS) and set(xpaste["PASTE"]) <= set(XPASTE_DEFAULTS["PASTE"])
    cfg = detectron2_like({**XPASTE_DEFAULTS, **xpaste}, example["SOLVER"]["IMS_PER_BATCH"],
                          example["MODEL"]["ROI_HEADS"]["NUM_CLASSES"])
    s = loader_settings(cfg, world_size=8)
    assert s["batch_size"] == 2 and s["paste"].output_size == 1024
    assert example["INPUT"]["FORMAT"] in ("RGB", "BGR")
    assert example["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 1203


@pytest.mark.skipif(HAS_DETECTRON2, reason="detectron2 is installed: the missing-install message cannot show")
def test_builder_explains_when_detectron2_is_missing():
    from xpaste_stream.loader.detectron2 import build_xpaste_train_loader

    with pytest.raises(ImportError, match="detectron2 is not installed; install it from"):
        build_xpaste_train_loader(detectron2_like(XPASTE_DEFAULTS))


@needs_detectron2
def test_to_detectron2_builds_instances(tmp_path):
    from test_loader_fixtures import make_dataset

    from xpaste_stream.loader import CopyPasteLoader, PasteConfig, to_detectron2

    urls, bank = make_dataset(str(tmp_path))
    loader = CopyPasteLoader(urls, bank, PasteConfig(output_size=128, max_pastes=4), batch_size=2)
    batch = next(iter(loader))
    id_map = contiguous_ids(loader.categories_doc)
    dicts = to_detectron2(batch, id_map, "BGR")
    for d, t in zip(dicts, batch.targets, strict=True):
        inst = d["instances"]
        assert inst.image_size == (128, 128) and len(inst) == len(t["labels"])
        assert torch.equal(inst.gt_boxes.tensor, t["boxes"]) and inst.gt_masks.tensor.dtype == torch.bool
        assert inst.gt_classes.tolist() == [id_map[int(c)] for c in t["labels"]]


@needs_detectron2
def test_builder_gives_endless_lists_of_dataset_dicts(tmp_path):
    from detectron2.config import get_cfg
    from test_loader_fixtures import make_dataset

    from xpaste_stream.loader.detectron2 import add_xpaste_config, build_xpaste_train_loader

    urls, bank = make_dataset(str(tmp_path))
    cfg = get_cfg()
    add_xpaste_config(cfg)
    cfg.XPASTE.BACKGROUNDS, cfg.XPASTE.BANK, cfg.XPASTE.DEVICE = urls, bank, "cpu"
    cfg.XPASTE.PASTE.OUTPUT_SIZE, cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.ROI_HEADS.NUM_CLASSES = 128, 4, 4
    loader = build_xpaste_train_loader(cfg)
    it = iter(loader)
    steps = [next(it) for _ in range(len(loader) + 1)]  # runs into the second epoch
    assert all(1 <= len(s) <= 4 and "instances" in s[0] for s in steps) and loader.epoch == 1
