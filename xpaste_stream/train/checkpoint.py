"""Training checkpoints: model, optimizer, step, RNG states and the loader's state dict, so a
restarted job continues mid-epoch with the same batches; plus what the model is (backbone and
category list), checked before any weights are loaded into another model.

A checkpoint is one torch file holding only tensors and plain Python values (loadable with
`weights_only=True`), written to a temporary name and renamed: a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from ..config import from_dict
from .model import LabelMap, ModelConfig, build_model, model_identity

CHECKPOINT_SCHEMA = "xpaste.train-checkpoint/1"
LATEST = "last_checkpoint"  # text file in the output folder naming the newest checkpoint


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another model or data set."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def save_checkpoint(path: str, *, model: torch.nn.Module, model_cfg: ModelConfig, labels: LabelMap,
                    categories: list[dict], step: int = 0, epoch: int = 0, optimizer=None, scaler=None,
                    loader_state: dict | None = None, config: dict | None = None) -> str:
    """Write atomically; `categories` are [{id, name, frequency}] (evaluation groups by them)."""
    model = model.module if hasattr(model, "module") else model
    state = {
        "schema": CHECKPOINT_SCHEMA,
        "identity": model_identity(model_cfg, labels),
        "model_config": dataclasses.asdict(model_cfg),
        "categories": [{"id": int(c["id"]), "name": str(c.get("name", c["id"])),
                        "frequency": c.get("frequency")} for c in categories],
        "model": model.state_dict(),
        "step": int(step), "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "loader": _plain(loader_state),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": _plain(config),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def mark_latest(folder: str, path: str) -> None:
    tmp = os.path.join(folder, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(path) + "\n")
    os.replace(tmp, os.path.join(folder, LATEST))


def latest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint of an output folder, or None when it has none."""
    marker = os.path.join(folder, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        path = os.path.join(folder, f.read().strip())
    if not os.path.isfile(path):
        raise CheckpointError(f"{marker} names {path}, which does not exist")
    return path


def read_checkpoint(path: str) -> dict:
    """Load and check the schema; a file that is not an xpaste-stream training checkpoint
    (a plain state dict, another program's file) is refused with its path named."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        found = state.get("schema") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not an xpaste-stream training checkpoint (schema {found!r}, "
                              f"expected {CHECKPOINT_SCHEMA!r}); pretrained weights go in "
                              "--weights instead")
    return state


def check_identity(state: dict, path: str, expected: dict) -> None:
    """Refuse a checkpoint of another backbone or category list before any weight is loaded."""
    found = state["identity"]
    if found["backbone"] != expected["backbone"]:
        raise CheckpointError(f"{path}: checkpoint of another model: backbone {found['backbone']!r}, "
                              f"this run builds {expected['backbone']!r}")
    if list(found["category_ids"]) != list(expected["category_ids"]):
        theirs, ours = set(found["category_ids"]), set(expected["category_ids"])
        diff = sorted(theirs ^ ours)[:10]
        raise CheckpointError(f"{path}: checkpoint of another model: trained for "
                              f"{len(theirs)} categories, this data set has {len(ours)} "
                              f"(differing ids {diff})")


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> None:
    model = model.module if hasattr(model, "module") else model
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: checkpoint of another model ({str(e).splitlines()[0]})") from None


def restore_rng(state: dict) -> None:
    rng = state.get("rng") or {}
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def model_from_checkpoint(path: str, **overrides) -> tuple[torch.nn.Module, LabelMap, dict, ModelConfig]:
    """(model in eval mode on CPU, label map, checkpoint, model config) of a checkpoint; the
    stored model config can be overridden (detections per image, score threshold, size)."""
    state = read_checkpoint(path)
    cfg = from_dict(ModelConfig, {**state["model_config"], "weights": None, "backbone_weights": None,
                                  **overrides}, f"{path}: model_config")
    labels = LabelMap(c["id"] for c in state["categories"])
    check_identity(state, path, model_identity(cfg, labels))
    model = build_model(cfg, labels.num_classes)
    load_model_state(model, state, path)
    return model.eval(), labels, state, cfg


def _plain(value):
    """numpy scalars and arrays -> Python values, so the file loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
