"""torchvision Mask R-CNN builders, the category-id <-> contiguous-label map, and the switch
that keeps pasted objects out of a loss term (X-Paste's USE_XPASTE_BOX_LOSS / _MASK_LOSS
ablation).

The loader's targets carry data-set category ids (LVIS: 1..1203 with gaps in other sets);
the model wants contiguous labels 1..C (0 is background). `LabelMap` converts both ways, so
training feeds the model contiguous labels and evaluation writes category ids again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")
# Class-dependent layers of torchvision's Mask R-CNN: re-initialised when pretrained detector
# weights were trained for another number of classes.
CLASS_LAYERS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")


class ModelError(ValueError):
    """Model weights or settings that do not fit (named file, what differs)."""


@dataclass
class ModelConfig:
    """Which Mask R-CNN. `backbone`: a torchvision ResNet with FPN (R50-FPN is the standard
    LVIS baseline), or `tiny` (a 3-conv backbone for tests and CPU figures, not for accuracy)."""

    backbone: str = "resnet50"
    image_size: int = 1024              # model min_size = max_size: the loader's output_size
    weights: str | None = None          # local torchvision Mask R-CNN state dict (e.g. COCO)
    backbone_weights: str | None = None  # local ImageNet state dict of the backbone
    trainable_backbone_layers: int = 3  # with pretrained weights (frozen BN); 5 otherwise
    detections_per_image: int = 100     # evaluation sets 300 for LVIS
    score_threshold: float = 0.05

    def validate(self) -> None:
        if self.backbone not in (*RESNETS, "tiny"):
            raise ValueError(f"backbone {self.backbone!r}: use one of {', '.join(RESNETS)} or 'tiny'")
        if self.backbone == "tiny" and self.backbone_weights:
            raise ValueError(f"backbone_weights {self.backbone_weights!r} (--backbone-weights) given "
                             "with backbone 'tiny', which has no pretrained form; drop them or "
                             "use a ResNet backbone")
        if not 32 <= self.image_size <= 4096:
            raise ValueError(f"image_size {self.image_size} must be in [32, 4096]")
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ValueError(f"trainable_backbone_layers {self.trainable_backbone_layers} must be in [0, 5]")
        if self.detections_per_image < 1 or not 0 <= self.score_threshold < 1:
            raise ValueError("detections_per_image must be >= 1 and score_threshold in [0, 1)")


class LabelMap:
    """Data-set category ids <-> contiguous model labels 1..C (sorted by id; 0 = background)."""

    def __init__(self, category_ids):
        ids = sorted(int(c) for c in category_ids)
        if not ids or len(set(ids)) != len(ids) or ids[0] < 0:
            raise ModelError(f"category ids must be distinct and >= 0, got {ids[:10]}")
        self.category_ids = ids
        self._to_label = torch.zeros(ids[-1] + 1, dtype=torch.int64)
        self._to_label[torch.tensor(ids)] = torch.arange(1, len(ids) + 1)
        self._to_id = torch.tensor([0, *ids], dtype=torch.int64)

    @classmethod
    def from_categories(cls, categories_doc: dict) -> LabelMap:
        return cls(c["id"] for c in categories_doc["categories"])

    @property
    def num_classes(self) -> int:
        """C + 1 (background included), as torchvision's `num_classes`."""
        return len(self.category_ids) + 1

    def to_labels(self, category_ids: torch.Tensor) -> torch.Tensor:
        """Category ids -> 1..C; an id outside the map is an error (not a silent background)."""
        table = self._to_label.to(category_ids.device)
        ids = category_ids.long()
        known = (ids >= 0) & (ids < len(table))
        labels = table[ids.clamp(0, len(table) - 1)] * known
        if not bool((labels > 0).all()):
            bad = sorted(set(ids[labels == 0].tolist()))[:10]
            raise ModelError(f"category ids {bad} are not among the model's {len(self.category_ids)} "
                             "categories")
        return labels

    def to_category_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return self._to_id.to(labels.device)[labels.long()]


class SourceAwareRoIHeads(RoIHeads):
    """torchvision's RoIHeads, able to leave objects with `source == 1` (pasted) out of the
    box-regression and/or mask loss, as X-Paste's ablation does. Only the losses change: a
    proposal matched to a pasted object still counts as foreground for classification."""

    pasted_box_loss: bool = True
    pasted_mask_loss: bool = True

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled  # read back by forward() for the losses it recomputes
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or (self.pasted_box_loss and self.pasted_mask_loss):
            return super().forward(features, proposals, image_shapes, targets)
        predicted = {}
        hook = self.box_predictor.register_forward_hook(lambda _m, _i, out: predicted.update(out=out))
        mask_pool = self.mask_roi_pool
        if not self.pasted_mask_loss:
            self.mask_roi_pool = None  # the parent skips its mask branch; computed below
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
            self.mask_roi_pool = mask_pool
        proposals, matched_idxs, labels, regression_targets = self._sampled
        del self._sampled
        real_labels = [torch.where(_matched_pasted(m, t), 0, lab)
                       for m, t, lab in zip(matched_idxs, targets, labels, strict=True)]
        if not self.pasted_box_loss:
            class_logits, box_regression = predicted["out"]
            losses["loss_box_reg"] = fastrcnn_loss(class_logits, box_regression, real_labels,
                                                   regression_targets)[1]
        if not self.pasted_mask_loss:
            losses["loss_mask"] = self._real_mask_loss(features, proposals, matched_idxs,
                                                       real_labels, image_shapes, targets)
        return result, losses

    def _real_mask_loss(self, features, proposals, matched_idxs, real_labels, image_shapes, targets):
        positive = [torch.where(lab > 0)[0] for lab in real_labels]
        boxes = [p[pos] for p, pos in zip(proposals, positive, strict=True)]
        matched = [m[pos] for m, pos in zip(matched_idxs, positive, strict=True)]
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        return maskrcnn_loss(logits, boxes, [t["masks"] for t in targets],
                             [t["labels"] for t in targets], matched)


def _matched_pasted(matched_idxs: torch.Tensor, target: dict) -> torch.Tensor:
    """Per sampled proposal: is its matched ground-truth object a pasted one?"""
    source = target.get("source")
    if source is None or len(source) == 0:
        return torch.zeros_like(matched_idxs, dtype=torch.bool)
    return source.to(matched_idxs.device)[matched_idxs] == 1


def set_pasted_losses(model: nn.Module, box: bool, mask: bool) -> None:
    """Turn the pasted objects' box-regression / mask loss on or off."""
    heads = _unwrap(model).roi_heads
    if not isinstance(heads, SourceAwareRoIHeads):
        heads.__class__ = SourceAwareRoIHeads  # same modules and state-dict keys, new losses
    heads.pasted_box_loss, heads.pasted_mask_loss = bool(box), bool(mask)


class TinyBackbone(nn.Sequential):
    """Three stride-2 convolutions (stride 8, 32 channels): a detector that trains in seconds
    on a CPU, for tests and CPU loader-in-the-loop figures."""

    out_channels = 32

    def __init__(self):
        layers = []
        for c_in, c_out in ((3, 16), (16, 32), (32, 32)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        super().__init__(*layers)

    def forward(self, x):
        return OrderedDict([("0", super().forward(x))])


def _tiny_maskrcnn(num_classes: int, **kw) -> MaskRCNN:
    c = TinyBackbone.out_channels
    return MaskRCNN(
        TinyBackbone(), num_classes=None,
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(c * 49, 128),
        box_predictor=FastRCNNPredictor(128, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=MaskRCNNHeads(c, [32, 32], 1),
        mask_predictor=MaskRCNNPredictor(32, 32, num_classes),
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150, box_batch_size_per_image=64, **kw)


def build_model(cfg: ModelConfig, num_classes: int) -> MaskRCNN:
    """A Mask R-CNN for `num_classes` (background included) at the loader's image size, with
    pretrained weights from local files when given (never downloaded)."""
    kw = {"min_size": cfg.image_size, "max_size": cfg.image_size,
          "box_detections_per_img": cfg.detections_per_image, "box_score_thresh": cfg.score_threshold}
    if cfg.backbone == "tiny":
        model = _tiny_maskrcnn(num_classes, **kw)
    else:
        pretrained = bool(cfg.weights or cfg.backbone_weights)
        backbone = resnet_fpn_backbone(
            backbone_name=cfg.backbone, weights=None,
            norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
            trainable_layers=cfg.trainable_backbone_layers if pretrained else 5)
        if cfg.backbone_weights:
            _load_backbone(backbone.body, cfg.backbone_weights)
        model = MaskRCNN(backbone, num_classes=num_classes, **kw)
    if cfg.weights:
        load_detector_weights(model, cfg.weights)
    set_pasted_losses(model, box=True, mask=True)
    return model


def read_state_dict(path: str) -> dict:
    """A state dict from a local file (raw, or under "model" / "state_dict")."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: weights file not found (weights are never downloaded: "
                         "pass a local file)") from None
    except Exception as e:  # pickle / zip errors: not a torch file
        raise ModelError(f"{path}: not a torch weights file ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path}: no state dict of tensors in this file")
    return data


def _load_backbone(body: nn.Module, path: str) -> None:
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    _check_fits(body, state, path, skip=())
    body.load_state_dict(state, strict=False)


def load_detector_weights(model: nn.Module, path: str) -> list[str]:
    """Pretrained detector weights; class-dependent layers of another class count are left
    at their initialisation (returned). Anything else that differs is an error."""
    state = read_state_dict(path)
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(CLASS_LAYERS) and k in own and state[k].shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    _check_fits(model, state, path, skip=CLASS_LAYERS)
    model.load_state_dict(state, strict=False)
    return skipped


def _check_fits(module: nn.Module, state: dict, path: str, skip: tuple[str, ...]) -> None:
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(skip)
                     and not k.endswith("num_batches_tracked"))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        parts = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                 (("unexpected", unexpected), ("missing", missing), ("other shapes", wrong)) if keys]
        raise ModelError(f"{path}: weights of another model ({'; '.join(parts)})")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def model_identity(cfg: ModelConfig, labels: LabelMap) -> dict:
    """What must match for weights to be reused: architecture and the category list."""
    return {"backbone": cfg.backbone, "category_ids": labels.category_ids}

