"""What model-backed stages (generate's text2image, extract's segmenters) share: where a model
runs, in which precision, and whether a model reference is a local folder or a hub id."""

from __future__ import annotations

import os


def resolve_device(device: str) -> str:
    """"auto": the first GPU when there is one, else the CPU; anything else as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(precision: str, device: str):
    """"auto": float16 on a GPU, float32 on the CPU (where half precision is slow or missing)."""
    import torch

    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, precision)


def looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a folder."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
