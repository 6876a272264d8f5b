"""Model-backed segmenters (transformers), batched, half precision on a GPU, offline.

Each takes `model`: a hub id found in the local Hugging Face cache (`local_files_only`, nothing
is downloaded at run time) or a folder written by `save_pretrained`. `check_model` fails before
any work with a message naming the segmenter and the model; the stage calls it for every
configured segmenter before reading a single image.

- `clipseg`: CLIPSeg prompted with the category name (one of X-Paste's four segmenters); the
  conditional (text) embedding is computed once per category.
- `sam`: SAM, SAM-HQ or SAM 2, whichever the checkpoint's config names, prompted without a human
  by one box per image: the tight box of a prior mask, either the classical plain-background
  estimate (default, free) or CLIPSeg's heat map for the category. Three masks come back
  (multimask: whole / part / sub-part); the one with the highest predicted IoU is kept and that
  IoU is its confidence.
- `sam3`: SAM 3 promptable concept segmentation: the category name is the prompt; the query with
  the highest detection score (class x presence) gives the mask. Text features are cached.
- `semantic-foreground`: any transformers semantic-segmentation model with a background class
  (e.g. DeepLabV3-MobileViT on Pascal VOC): foreground = 1 - P(background). A background-removal
  model loadable without remote code.
See docs/SEGMENTERS.md for the prompts and why.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

import numpy as np

from ..modelrefs import looks_like_path, resolve_device, resolve_dtype
from .postprocess import clean_mask, tight_box
from .segmenters import PlainBackgroundSegmenter, SegmentResult

Precision = Literal["auto", "float32", "float16", "bfloat16"]

DEFAULT_MODELS = {
    "clipseg": "CIDAS/clipseg-rd64-refined",
    "sam": "facebook/sam-vit-huge",
    "sam3": "facebook/sam3",
    "semantic-foreground": "apple/deeplabv3-mobilevit-small",
}


class SegmenterWeightsMissing(FileNotFoundError):
    """A segmenter's model is not on this machine (nothing is downloaded at run time)."""


def check_model(segmenter: str, model: str, local_files_only: bool = True) -> str:
    """The folder or hub id to load `model` from; SegmenterWeightsMissing names what is missing."""
    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise SegmenterWeightsMissing(
                f"segmenter {segmenter!r}: model folder {model!r} has no config.json; pass a folder "
                "written by save_pretrained")
        return folder
    if looks_like_path(model):
        raise SegmenterWeightsMissing(f"segmenter {segmenter!r}: model folder {model!r} not found")
    if local_files_only:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise SegmenterWeightsMissing(
                f"segmenter {segmenter!r}: model {model!r} is not in the local Hugging Face cache "
                f"and nothing is downloaded at run time; run `hf download {model}` on a machine "
                "with network, or pass a local folder (--model NAME=PATH)")
    return model


@lru_cache(maxsize=8)
def _load(kind: str, model: str, device: str, dtype_name: str, local_files_only: bool):
    """(model, processor) loaded once per process and shared (SAM's CLIPSeg prompt reuses the
    `clipseg` segmenter's model when both name the same checkpoint)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    source = check_model(kind, model, local_files_only)
    if kind == "sam":
        model_cls, processor_cls = _sam_classes(source, model, local_files_only)
    else:
        model_cls, processor_cls = {
            "clipseg": ("CLIPSegForImageSegmentation", "CLIPSegProcessor"),
            "sam3": ("Sam3Model", "Sam3Processor"),
            "semantic-foreground": ("AutoModelForSemanticSegmentation", "AutoImageProcessor"),
        }[kind]
    hf_logging.disable_progress_bar()
    try:
        net = getattr(transformers, model_cls).from_pretrained(source, local_files_only=local_files_only)
        processor = getattr(transformers, processor_cls).from_pretrained(
            source, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise SegmenterWeightsMissing(f"segmenter {kind!r}: cannot load model {model!r} "
                                      f"({type(e).__name__}: {e})") from None
    return net.to(device, getattr(torch, dtype_name)).eval(), processor


def _sam_classes(source: str, model: str, local_files_only: bool) -> tuple[str, str]:
    """SAM, SAM-HQ or SAM 2, by the checkpoint's config."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(source, local_files_only=local_files_only).model_type
    classes = {"sam": ("SamModel", "SamProcessor"), "sam_hq": ("SamHQModel", "SamHQProcessor"),
               "sam2": ("Sam2Model", "Sam2Processor")}
    if model_type not in classes:
        raise SegmenterWeightsMissing(f"segmenter 'sam': model {model!r} is a {model_type!r}, not "
                                      f"one of {sorted(classes)}")
    return classes[model_type]


def _upsample(maps, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """(B, h, w) probabilities -> one float32 (H, W) map per image, bilinear."""
    import torch

    out = []
    for prob, size in zip(maps, sizes, strict=True):
        big = torch.nn.functional.interpolate(prob[None, None].float(), size=size, mode="bilinear",
                                              align_corners=False)
        out.append(big[0, 0].clamp(0, 1).cpu().numpy())
    return out


def _result(prob: np.ndarray, confidence: float | None = None) -> SegmentResult:
    """A probability map as alpha; confidence defaults to the mean probability inside the mask."""
    inside = prob >= 0.5
    if confidence is None:
        confidence = float(prob[inside].mean()) if inside.any() else 0.0
    return SegmentResult((prob * 255).round().astype(np.uint8), float(confidence))


class _ModelSegmenter:
    kind = ""

    def __init__(self, model: str | None = None, device: str = "auto", precision: Precision = "auto",
                 local_files_only: bool = True):
        import torch

        self.model_id = model or DEFAULT_MODELS[self.kind]
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)
        self.local_files_only = local_files_only
        self.net, self.processor = _load(self.kind, self.model_id, self.device,
                                         str(self.dtype).removeprefix("torch."), local_files_only)
        self._torch = torch

    @classmethod
    def check(cls, model: str | None = None, local_files_only: bool = True, **_) -> None:
        """Before any work: the weights must be on this machine."""
        check_model(cls.kind, model or DEFAULT_MODELS[cls.kind], local_files_only)

    def pixels(self, images: list[np.ndarray]):
        processor = getattr(self.processor, "image_processor", self.processor)
        values = processor(images=images, return_tensors="pt")["pixel_values"]
        return values.to(self.device, self.dtype)


class _TextPrompted(_ModelSegmenter):
    """A model prompted with `prompt` filled with the category name; what the text encoder
    makes of a category is computed once and cached."""

    def __init__(self, model: str | None = None, prompt: str = "{name}", **runtime):
        super().__init__(model, **runtime)
        if "{name}" not in prompt:
            raise ValueError(f"{self.kind} prompt {prompt!r} needs a {{name}} placeholder")
        self.prompt = prompt
        self._text: dict = {}

    def per_category(self, categories: list[str], encode) -> list:
        """The cached encoding of each category; `encode(prompts)` makes one per prompt, for
        the categories not seen yet."""
        new = sorted({c for c in categories if c not in self._text})
        if new:
            prompts = [self.prompt.format(name=c.replace("_", " ")) for c in new]
            with self._torch.inference_mode():
                self._text.update(zip(new, encode(prompts), strict=True))
        return [self._text[c] for c in categories]


class ClipSegSegmenter(_TextPrompted):
    """CLIPSeg prompted with `prompt` filled with the category name."""

    name = kind = "clipseg"

    def conditional(self, categories: list[str]):
        """Conditional embeddings (B, D), computed once per category."""
        def encode(prompts):
            tokens = self.processor.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
            return self.net.get_conditional_embeddings(
                batch_size=len(prompts), input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"])
        return self._torch.stack(self.per_category(categories, encode))

    def heatmaps(self, images: list[np.ndarray], categories: list[str]) -> list[np.ndarray]:
        """P(object of that category) per pixel, at each image's own size."""
        with self._torch.inference_mode():
            logits = self.net(pixel_values=self.pixels(images),
                              conditional_embeddings=self.conditional(categories)).logits
        logits = logits.reshape(len(images), *logits.shape[-2:])
        return _upsample(logits.float().sigmoid(), [rgb.shape[:2] for rgb in images])

    def segment(self, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
        return [_result(prob) for prob in self.heatmaps(images, categories)]


class SamSegmenter(_ModelSegmenter):
    """SAM / SAM-HQ / SAM 2 with one automatic box prompt per image (see the module docstring)."""

    name = kind = "sam"

    def __init__(self, model: str | None = None, prompt: Literal["plain-background", "clipseg"] =
                 "plain-background", clipseg_model: str | None = None, **runtime):
        super().__init__(model, **runtime)
        if prompt not in ("plain-background", "clipseg"):
            raise ValueError(f"sam prompt {prompt!r}: use 'plain-background' or 'clipseg'")
        self.prompt = prompt
        self.prior = (ClipSegSegmenter(clipseg_model, **runtime) if prompt == "clipseg"
                      else PlainBackgroundSegmenter())

    @classmethod
    def check(cls, model: str | None = None, local_files_only: bool = True, prompt: str = "",
              clipseg_model: str | None = None, **_) -> None:
        super().check(model, local_files_only)
        if prompt == "clipseg":
            ClipSegSegmenter.check(clipseg_model, local_files_only)

    def boxes(self, images: list[np.ndarray], categories: list[str]) -> list[list[float]]:
        """[x0, y0, x1, y1] per image: the prior mask's tight box, or the central 80 % if empty."""
        priors = [r.alpha for r in self.prior.segment(images, categories)]
        out = []
        for rgb, prior in zip(images, priors, strict=True):
            box = tight_box(clean_mask(prior))
            h, w = rgb.shape[:2]
            out.append([float(v) for v in (box or (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h))])
        return out

    def segment(self, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
        torch = self._torch
        boxes = self.boxes(images, categories)
        inputs = self.processor(images=images, input_boxes=[[b] for b in boxes], return_tensors="pt")
        with torch.inference_mode():
            out = self.net(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                           input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
                           multimask_output=True)
        extra = ([inputs["reshaped_input_sizes"]] if "reshaped_input_sizes" in inputs else [])
        masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                                  *extra, binarize=False)
        iou = out.iou_scores.float().cpu()  # (B, 1, 3)
        results = []
        for i, logits in enumerate(masks):  # (1, 3, H, W) per image
            best = int(iou[i, 0].argmax())
            prob = logits[0, best].sigmoid().numpy()
            results.append(_result(prob, float(iou[i, 0, best].clamp(0, 1))))
        return results


class Sam3Segmenter(_TextPrompted):
    """SAM 3: masks from the category name itself; the best-scoring query wins."""

    name = kind = "sam3"

    def text_features(self, categories: list[str]):
        """(features (B, L, D), attention mask (B, L)), computed once per category."""
        def encode(prompts):
            tokens = self.processor(text=prompts, return_tensors="pt").to(self.device)
            feats = self.net.get_text_features(input_ids=tokens["input_ids"],
                                               attention_mask=tokens["attention_mask"]).pooler_output
            return zip(feats, tokens["attention_mask"], strict=True)
        feats, mask = zip(*self.per_category(categories, encode), strict=True)
        return self._torch.stack(feats), self._torch.stack(mask)

    def segment(self, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        torch = self._torch
        feats, mask = self.text_features(categories)
        with torch.inference_mode():
            out = self.net(pixel_values=self.pixels(images), attention_mask=mask,
                           text_embeds=BaseModelOutputWithPooling(pooler_output=feats))
        scores = out.pred_logits.float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid()
        best = scores.argmax(dim=1)
        rows = torch.arange(len(images), device=best.device)
        probs = _upsample(out.pred_masks[rows, best].float().sigmoid(), [rgb.shape[:2] for rgb in images])
        return [_result(p, float(scores[i, best[i]])) for i, p in enumerate(probs)]


class SemanticForegroundSegmenter(_ModelSegmenter):
    """Background removal with a semantic-segmentation model: foreground = 1 - P(background)."""

    name = kind = "semantic-foreground"

    def __init__(self, model: str | None = None, background_label: int | None = None, **runtime):
        super().__init__(model, **runtime)
        self.background = self.background_index(background_label)

    def background_index(self, given: int | None) -> int:
        labels = {int(k): str(v).lower() for k, v in self.net.config.id2label.items()}
        if given is not None:
            if given not in labels:
                raise ValueError(f"semantic-foreground: background_label {given} not among the "
                                 f"model's {len(labels)} labels ({self.model_id})")
            return given
        found = [i for i, name in labels.items() if name in ("background", "__background__", "bg")]
        if not found:
            raise ValueError(f"semantic-foreground: model {self.model_id!r} has no 'background' label "
                             "(id2label); set segmenter_options.semantic-foreground.background_label")
        return found[0]

    def segment(self, images: list[np.ndarray], categories: list[str]) -> list[SegmentResult]:
        with self._torch.inference_mode():
            logits = self.net(pixel_values=self.pixels(images)).logits
        foreground = 1 - logits.float().softmax(dim=1)[:, self.background]
        return [_result(p) for p in _upsample(foreground, [rgb.shape[:2] for rgb in images])]


MODEL_SEGMENTERS = {cls.kind: cls for cls in
                    (ClipSegSegmenter, SamSegmenter, Sam3Segmenter, SemanticForegroundSegmenter)}
