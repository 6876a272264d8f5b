"""Adapter to detectron2's training input: a list of dicts with `image` and `instances`.

detectron2 is imported only here, when the adapter is called, so the loader works without it.
"""

from __future__ import annotations

INSTALL_HINT = ("detectron2 is not installed; install it from https://github.com/facebookresearch/detectron2 "
                "(pip install 'git+https://github.com/facebookresearch/detectron2.git'), or use the "
                "torchvision-format `batch.targets` directly")


def to_detectron2(batch) -> list[dict]:
    """`Batch` -> detectron2 dataset dicts ({"image", "height", "width", "image_id",
    "instances": Instances(gt_boxes, gt_classes, gt_masks, gt_source)}) on the batch's device.

    `gt_classes` holds the category ids of the data set; map them to contiguous ids with
    detectron2's dataset metadata (`thing_dataset_id_to_contiguous_id`) if the model needs that.
    """
    try:
        from detectron2.structures import BitMasks, Boxes, Instances
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    out = []
    for image, target in zip(batch.images, batch.targets, strict=True):
        h, w = image.shape[-2:]
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(target["boxes"])
        inst.gt_classes = target["labels"]
        inst.gt_masks = BitMasks(target["masks"].bool())
        inst.gt_source = target["source"]
        out.append({"image": image, "height": h, "width": w, "image_id": target["image_id"],
                    "instances": inst})
    return out
