"""CLIP scoring of cut-out objects, as in the original filter (open_clip, ViT-L/14 by default).

An object is scored the way X-Paste scored it: binarise the mask at 128, composite the object on
a white background, embed it with CLIP and compare with the text embedding of
"a photo of {name}"; score = 100 x cosine. Images of a batch go through one forward pass; text
embeddings are computed once per category name.

Weights are never downloaded: `pretrained` is a local checkpoint file, or an open_clip tag
("openai", ...) whose file is already in the local cache. torch and open_clip are imported when a
scorer is built, so commands that never score start without them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..config import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class ClipConfig:
    """Which CLIP scores the objects; the defaults are the published recipe."""

    model: str = "ViT-L-14"            # an open_clip model name
    pretrained: str = "openai"         # an open_clip tag found in the local cache, or a checkpoint path
    prompt: str = "a photo of {name}"  # {name}: category name, underscores -> spaces
    device: str = "auto"               # "auto": cuda when available, else cpu
    fp16: bool = True                  # half precision on GPU (CPU always runs float32)
    cache_dir: str | None = None       # where to look for tagged weights (open_clip's default if None)

    def validate(self) -> None:
        if "{name}" not in self.prompt:
            raise ValueError(f"prompt {self.prompt!r} needs a {{name}} placeholder")
        if not self.model or not self.pretrained:
            raise ValueError("model and pretrained must be non-empty")


class ClipWeightsMissing(FileNotFoundError):
    """The CLIP checkpoint is not on this machine (nothing is downloaded at run time)."""


def resolve_checkpoint(model: str, pretrained: str, cache_dir: str | None = None) -> tuple[str, bool]:
    """(local checkpoint path, quick_gelu) for a tag or a path, without touching the network."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    if os.path.isfile(pretrained):
        return pretrained, False
    if model not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model!r} (open_clip.list_models() has the names)")
    tag = oc_pretrained.get_pretrained_cfg(model, pretrained)
    if not tag:
        known = oc_pretrained.list_pretrained_tags_by_model(model)
        raise ClipWeightsMissing(
            f"CLIP pretrained={pretrained!r} is neither a file nor a known tag of {model} "
            f"(tags: {', '.join(known) or 'none'}); give the path of a local checkpoint")
    looked: list[str] = []
    found = next(_cached_files(tag, cache_dir, looked), None)
    if found:
        return found, bool(tag.get("quick_gelu", False))
    raise ClipWeightsMissing(
        f"CLIP weights {model}/{pretrained} are not on this machine (looked for: "
        f"{'; '.join(looked)}) and nothing is downloaded at run time. Copy the checkpoint here "
        f"and set pretrained to its path (extract.clip.pretrained = '/path/to/checkpoint'), "
        f"or fill the cache (extract.clip.cache_dir) on a machine with network access")


def _cached_files(tag: dict, cache_dir: str | None, looked: list[str]):
    """Files that hold a tag's weights, from the Hugging Face cache or open_clip's URL cache."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        for name in names:
            looked.append(f"hf cache {repo}/{name}")
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                yield found
    if tag.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"),
                            os.path.basename(tag["url"]))
        looked.append(path)
        if os.path.isfile(path):
            yield path


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray, threshold: int = 128) -> np.ndarray:
    """The object where alpha >= threshold, white elsewhere (what the original scored)."""
    return np.where((alpha >= threshold)[..., None], rgb, np.uint8(255)).astype(np.uint8)


class ClipScorer:
    """Scores (rgb crop, alpha, category name) triples: 100 x cosine(image, text)."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer,
                 prompt: str = "a photo of {name}", device: str = "cpu", fp16: bool = False):
        import torch

        self.device = torch.device(device)
        self.dtype = torch.float16 if fp16 and self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.prompt = prompt
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, cfg: ClipConfig) -> ClipScorer:
        """Build from a ClipConfig, offline (ClipWeightsMissing names what is missing)."""
        import open_clip
        import torch

        path, quick_gelu = resolve_checkpoint(cfg.model, cfg.pretrained, cfg.cache_dir)
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=path, force_quick_gelu=quick_gelu)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, preprocess, open_clip.get_tokenizer(cfg.model), cfg.prompt, device, cfg.fp16)

    def text_embedding(self, names: list[str]) -> torch.Tensor:
        """Unit text embeddings (N, D) in float32, computed once per category name."""
        import torch

        new = sorted({n for n in names if n not in self._text})
        if new:
            prompts = [self.prompt.format(name=n.replace("_", " ")) for n in new]
            with torch.inference_mode():
                emb = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
            for n, e in zip(new, torch.nn.functional.normalize(emb, dim=-1), strict=True):
                self._text[n] = e
        return torch.stack([self._text[n] for n in names])

    def image_embedding(self, crops: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        """Unit image embeddings (N, D) in float32 of objects composited on white, one forward."""
        import torch

        batch = torch.stack([self.preprocess(Image.fromarray(composite_on_white(rgb, alpha)))
                             for rgb, alpha in crops])
        with torch.inference_mode():
            emb = self.model.encode_image(batch.to(self.device, self.dtype)).float()
        return torch.nn.functional.normalize(emb, dim=-1)

    def score(self, items: list[tuple[np.ndarray, np.ndarray, str]]) -> list[float]:
        """100 x cosine of each object with its category's prompt, in the order given."""
        if not items:
            return []
        images = self.image_embedding([(rgb, alpha) for rgb, alpha, _ in items])
        texts = self.text_embedding([name for _, _, name in items])
        return (100 * (images * texts).sum(dim=-1)).cpu().tolist()
