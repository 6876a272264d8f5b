"""Training and evaluation on top of the loader: torchvision Mask R-CNN from shard URLs
(loop.py), checkpoints that resume mid-epoch (checkpoint.py), LVIS / COCO evaluation
(evaluate.py), and the `train` / `evaluate` commands (cli.py).

    from xpaste_stream.train import TrainConfig, train
    train(TrainConfig(backgrounds=["bg/bg-*.tar"], bank="bank", output_dir="runs/r50"))

Names are imported on first use, so registering the commands does not load torch and DALI.
"""

import importlib

_EXPORTS = {
    "checkpoint": ("CheckpointError", "model_from_checkpoint", "read_checkpoint", "save_checkpoint"),
    "loop": ("StepRecord", "TrainConfig", "TrainError", "TrainResult", "Trainer", "train"),
    "model": ("LabelMap", "ModelConfig", "ModelError", "build_model", "set_pasted_losses"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
