"""`generator = "diffusers"`: Stable Diffusion text-to-image, the X-Paste recipe.

The defaults are the paper's: SD 1.5, DPM-Solver multistep, 50 steps, guidance 7.5, 512x512
(`image_size`), fp16 on a GPU (fp32 on the CPU, where fp16 is slow or unsupported). Nothing is
downloaded at run time: `model` is a hub id looked up in the local Hugging Face cache
(`local_files_only`) or a folder written by `save_pretrained`. The safety checker is off, as in
X-Paste: prompts are object names, and a checker would black out some objects and cost time.

Every image gets its own CPU `torch.Generator`, seeded from (run seed, category id, index) the way
`procedural.seed_for` seeds procedural images. Its starting noise therefore does not depend on the
batch it lands in, on where a run resumed, or on the device's random number generator.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ModelLoadError
from ..modelrefs import looks_like_path, resolve_device, resolve_dtype
from .base import Failure, Generated, WorkItem
from .procedural import seed_for

GENERATOR = "diffusers"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@dataclass
class DiffusersConfig:
    model: str = DEFAULT_MODEL  # hub id (resolved offline, in the local cache) or a local folder
    # "dpm-solver-multistep": DPMSolverMultistepScheduler built from the model's scheduler config
    # (the paper's); "model": keep the scheduler saved with the model
    scheduler: Literal["dpm-solver-multistep", "model"] = "dpm-solver-multistep"
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 8  # images per pipeline call
    device: str = "auto"  # "auto": "cuda" when available, else "cpu"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    local_files_only: bool = True  # never download; False lets diffusers fetch a missing hub id

    def validate(self) -> None:
        if not self.model:
            raise ValueError("diffusers.model must name a hub id or a local folder")
        if self.steps < 1:
            raise ValueError("diffusers.steps must be >= 1")
        if self.guidance < 0:
            raise ValueError("diffusers.guidance must be >= 0 (<= 1 turns guidance off)")
        if self.batch_size < 1:
            raise ValueError("diffusers.batch_size must be >= 1")
        if not self.device:
            raise ValueError("diffusers.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


def image_seed(seed: int, category_id: int, index: int) -> int:
    """The torch seed of one image: derived like every other per-image seed in the engine."""
    return int(seed_for(seed, category_id, index).integers(0, 2**63 - 1))


def check_model_available(cfg: DiffusersConfig) -> None:
    """Fail before any work when the model is neither a saved folder nor in the local cache."""
    model = os.path.expanduser(cfg.model)
    if looks_like_path(cfg.model) or os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ModelLoadError(f"diffusers model folder {cfg.model!r} not found (no "
                                 "model_index.json); pass a folder written by save_pretrained")
        return
    if cfg.local_files_only:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(cfg.model, "model_index.json"), str):
            raise ModelLoadError(
                f"diffusers model {cfg.model!r} is not in the local cache (local_files_only = true: "
                f"nothing is downloaded at run time); download it once with `hf download {cfg.model}` "
                "on a machine with network, or pass a local folder")


def load_pipeline(cfg: DiffusersConfig, device: str, dtype):
    """A StableDiffusionPipeline on `device`, safety checker off; fails naming the model."""
    from diffusers import StableDiffusionPipeline

    model = os.path.expanduser(cfg.model)
    if looks_like_path(cfg.model) and not os.path.isdir(model):
        raise ModelLoadError(f"diffusers model folder {cfg.model!r} not found; pass a folder written "
                             "by save_pretrained, or a hub id present in the local cache")
    try:
        with warnings.catch_warnings():  # newer diffusers call it `dtype`; older know only this
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False,
                local_files_only=cfg.local_files_only)
    except (OSError, ValueError) as e:
        if cfg.local_files_only and not os.path.isdir(model):
            raise ModelLoadError(
                f"diffusers model {cfg.model!r} is not in the local cache (local_files_only = true: "
                f"nothing is downloaded at run time); download it once with `hf download {cfg.model}` "
                "(or `huggingface-cli download`) on a machine with network, or pass a local folder "
                f"[{type(e).__name__}: {e}]") from None
        raise ModelLoadError(f"cannot load diffusers model {cfg.model!r}: {type(e).__name__}: {e}") \
            from None
    return pipe.to(device)


class DiffusersGenerator:
    """Batched text-to-image; the pipeline is loaded on the first batch (a finished run needs none).

    `pipe` may be passed in (benchmarks build one from configs with random weights).
    """

    name = GENERATOR

    def __init__(self, cfg: DiffusersConfig, seed: int, size: int, pipe=None):
        if size % 8:
            raise ValueError(f"image_size {size} must be a multiple of 8 for Stable Diffusion")
        self.cfg, self.seed, self.size = cfg, seed, size
        self.batch_size = cfg.batch_size
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self._pipe = None
        if pipe is not None:
            self._setup(pipe)

    def _setup(self, pipe) -> None:
        from diffusers import DPMSolverMultistepScheduler

        if self.cfg.scheduler == "dpm-solver-multistep":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe
        self.meta = {"model": self.cfg.model, "scheduler": type(pipe.scheduler).__name__,
                     "steps": self.cfg.steps, "guidance": self.cfg.guidance,
                     "dtype": str(self.dtype).removeprefix("torch.")}

    @property
    def pipe(self):
        if self._pipe is None:
            self._setup(load_pipeline(self.cfg, self.device, self.dtype))
        return self._pipe

    def available(self, category: str) -> None:
        return None

    def report(self) -> dict:
        return {}

    def generate(self, items: list[WorkItem]) -> list[Generated | Failure]:
        import torch

        pipe = self.pipe
        seeds = [image_seed(self.seed, i.category_id, i.index) for i in items]
        images = pipe(prompt=[i.prompt for i in items], num_inference_steps=self.cfg.steps,
                      guidance_scale=self.cfg.guidance, height=self.size, width=self.size,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                      output_type="np").images
        results: list[Generated | Failure] = []
        for item, image, s in zip(items, images, seeds, strict=True):
            if not np.isfinite(image).all():  # e.g. an fp16 overflow in the VAE
                results.append(Failure("nan_output", f"{item.category} #{item.index} (image_seed "
                                                     f"{s}): non-finite pixels"))
                continue
            rgb = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            results.append(Generated(rgb, {**self.meta, "image_seed": s}))
        return results
