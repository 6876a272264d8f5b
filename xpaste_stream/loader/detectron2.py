"""detectron2 adapter: CopyPasteLoader batches as detectron2's training input.

`build_xpaste_train_loader(cfg)` stands in for `build_detection_train_loader(cfg)` in a
detectron2 trainer: an endless iterable of lists of dataset dicts, one list per step, each
{"image": (3, H, W) uint8 in cfg.INPUT.FORMAT, "height", "width", "image_id",
"instances": Instances(gt_boxes, gt_classes, gt_masks, gt_source)} with `gt_classes` the
contiguous 0..C-1 ids of detectron2's metadata (`thing_dataset_id_to_contiguous_id`: data-set
ids sorted). It has `state_dict()` / `load_state_dict()`, so registering it with the trainer's
checkpointer resumes mid-epoch (pipelines/detectron2_lvis_xpaste.py does).

detectron2 is imported only where Instances are built; `detectron2_fields` does the whole
conversion with torch alone (tested without detectron2).
"""

from __future__ import annotations

import copy
import os

import torch

INSTALL_HINT = ("detectron2 is not installed; install it from https://github.com/facebookresearch/detectron2 "
                "(built from its source as README.md's detectron2 section shows), or use the "
                "torchvision-format `batch.targets` directly")

# cfg.XPASTE: what build_xpaste_train_loader reads besides SOLVER.IMS_PER_BATCH, INPUT.FORMAT,
# SEED and MODEL.ROI_HEADS.NUM_CLASSES. PASTE keys are PasteConfig fields, upper-cased.
XPASTE_DEFAULTS = {
    "BACKGROUNDS": [],           # background shard URLs / patterns
    "BANK": "",                  # instance bank folder
    "CATEGORIES": "",            # categories.json ("" = beside the shards)
    "NUM_THREADS": 4,            # DALI threads per process
    "WORKERS": 2,                # processes doing the loader's host work per process
    "DEVICE": "cuda",            # the --device grammar: "cuda" (this process's GPU), "cuda:N",
                                 # "auto" or "cpu"; no GPU here: the CPU
    "PASTE": {"OUTPUT_SIZE": 1024, "SCALE_RANGE": [0.1, 2.0], "MIN_PASTES": 0, "MAX_PASTES": 19,
              "CATEGORY_SAMPLING": "cas", "BLENDING": "hard"},
}


class Detectron2ConfigError(ValueError):
    """cfg.XPASTE / the model config do not fit the data (key named, what differs)."""


def contiguous_ids(categories_doc: dict) -> dict[int, int]:
    """detectron2's `thing_dataset_id_to_contiguous_id`: data-set ids in sorted order -> 0..C-1."""
    return {cid: i for i, cid in enumerate(sorted(int(c["id"]) for c in categories_doc["categories"]))}


def detectron2_fields(image: torch.Tensor, target: dict, id_map: dict[int, int] | None = None,
                      input_format: str = "RGB") -> dict:
    """One composited image and its target as plain tensors in detectron2's conventions:
    image channels in `input_format` ("RGB" or "BGR"), boxes xyxy float, classes through
    `id_map` (category ids unchanged when None), masks bool."""
    if input_format not in ("RGB", "BGR"):
        raise Detectron2ConfigError(f"INPUT.FORMAT {input_format!r}: the loader gives RGB or BGR only")
    labels = target["labels"].long()
    if id_map is not None:
        table = torch.full((max(max(id_map), int(labels.max()) if len(labels) else 0) + 1,), -1,
                           dtype=torch.int64)
        table[torch.tensor(list(id_map))] = torch.tensor(list(id_map.values()))
        classes = table.to(labels.device)[labels]
        if bool((classes < 0).any()):
            unknown = sorted(set(labels[classes < 0].tolist()))
            raise Detectron2ConfigError(f"category ids {unknown} are not in the id map "
                                        f"({len(id_map)} categories)")
        labels = classes
    h, w = image.shape[-2:]
    return {"image": image.flip(0) if input_format == "BGR" else image, "height": int(h), "width": int(w),
            "image_id": int(target["image_id"]), "boxes": target["boxes"].float(), "classes": labels,
            "masks": target["masks"].bool(), "source": target["source"]}


def to_detectron2(batch, id_map: dict[int, int] | None = None, input_format: str = "RGB") -> list[dict]:
    """`Batch` -> detectron2 dataset dicts ({"image", "height", "width", "image_id",
    "instances": Instances(gt_boxes, gt_classes, gt_masks, gt_source)}) on the batch's device.
    `gt_classes` are the data set's category ids unless `id_map` (see `contiguous_ids`) is given."""
    try:
        from detectron2.structures import BitMasks, Boxes, Instances
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    out = []
    for image, target in zip(batch.images, batch.targets, strict=True):
        f = detectron2_fields(image, target, id_map, input_format)
        inst = Instances((f["height"], f["width"]))
        inst.gt_boxes = Boxes(f["boxes"])
        inst.gt_classes = f["classes"]
        inst.gt_masks = BitMasks(f["masks"])
        inst.gt_source = f["source"]
        out.append({"image": f["image"], "height": f["height"], "width": f["width"],
                    "image_id": f["image_id"], "instances": inst})
    return out


class Detectron2TrainLoader:
    """Endless lists of detectron2 dataset dicts, epoch after epoch, like the iterable
    `build_detection_train_loader` returns; checkpointable (epoch + the loader's state)."""

    def __init__(self, loader, id_map: dict[int, int], input_format: str = "BGR"):
        self.loader, self.id_map, self.input_format = loader, id_map, input_format
        self.epoch = 0
        self._resumed = False

    def __iter__(self):
        while True:
            if not self._resumed:
                self.loader.set_epoch(self.epoch)
            self._resumed = False
            for batch in self.loader:
                yield to_detectron2(batch, self.id_map, self.input_format)
            self.epoch += 1

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.epoch, self._resumed = int(state["epoch"]), True


def add_xpaste_config(cfg) -> None:
    """Add cfg.XPASTE (XPASTE_DEFAULTS) to a detectron2 config."""
    from detectron2.config import CfgNode

    cfg.XPASTE = CfgNode(copy.deepcopy(XPASTE_DEFAULTS))


def loader_settings(cfg, world_size: int) -> dict:
    """CopyPasteLoader arguments from a detectron2 config (anything with its attributes):
    batch per process = SOLVER.IMS_PER_BATCH / world size; canvas = XPASTE.PASTE.OUTPUT_SIZE."""
    from ..config import from_dict
    from .config import PasteConfig

    x = cfg.XPASTE
    if not x.BACKGROUNDS or not x.BANK:
        raise Detectron2ConfigError("XPASTE.BACKGROUNDS and XPASTE.BANK must name the background "
                                    "shards and the instance bank")
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total % world_size:
        raise Detectron2ConfigError(f"SOLVER.IMS_PER_BATCH {total} is not divisible by the "
                                    f"{world_size} processes")
    paste = from_dict(PasteConfig, {k.lower(): (list(v) if isinstance(v, (list, tuple)) else v)
                                    for k, v in dict(x.PASTE).items()}, "XPASTE.PASTE")
    backgrounds = [x.BACKGROUNDS] if isinstance(x.BACKGROUNDS, str) else list(x.BACKGROUNDS)
    return {"background_urls": backgrounds, "bank": x.BANK, "paste": paste,
            "categories": x.CATEGORIES or None, "batch_size": total // world_size,
            # detectron2's SEED -1 means "random"; batches must be reproducible, so it is 0 here
            "seed": max(int(cfg.SEED), 0), "num_threads": int(x.NUM_THREADS), "workers": int(x.WORKERS)}


def check_num_classes(cfg, id_map: dict[int, int], where: str) -> None:
    n = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if n != len(id_map):
        raise Detectron2ConfigError(f"MODEL.ROI_HEADS.NUM_CLASSES is {n}, but {where} lists "
                                    f"{len(id_map)} categories")


def build_xpaste_train_loader(cfg) -> Detectron2TrainLoader:
    """In place of `build_detection_train_loader(cfg)`: this process's slice of X-Paste batches
    (rank and world from detectron2.utils.comm), composited on its GPU."""
    try:
        from detectron2.utils import comm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    from ..config import parse_device
    from .loader import CopyPasteLoader

    settings = loader_settings(cfg, comm.get_world_size())
    device = parse_device(cfg.XPASTE.DEVICE)
    gpu = device != "cpu" and torch.cuda.is_available()
    index = int(device[5:]) if device.startswith("cuda:") and comm.get_world_size() == 1 \
        else comm.get_local_rank()
    loader = CopyPasteLoader(**settings, device_id=index if gpu else None,
                             rank=comm.get_rank(), world_size=comm.get_world_size())
    id_map = contiguous_ids(loader.categories_doc)
    check_num_classes(cfg, id_map, getattr(loader, "categories_path", None) or
                      os.path.join("(shards)", "categories.json"))
    return Detectron2TrainLoader(loader, id_map, cfg.INPUT.FORMAT)
