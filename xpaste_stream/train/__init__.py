"""Training and evaluation on top of the loader: torchvision Mask R-CNN from shard URLs
(loop.py), checkpoints that resume mid-epoch (checkpoint.py), LVIS / COCO evaluation
(evaluate.py), and the `train` / `evaluate` commands (cli.py).

    from xpaste_stream.train import TrainConfig, train
    train(TrainConfig(backgrounds=["bg/bg-*.tar"], bank="bank", output_dir="runs/r50"))

Names are imported on first use, so registering the commands does not load torch and DALI.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "checkpoint": ("CheckpointError", "model_from_checkpoint", "read_checkpoint", "save_checkpoint"),
    "loop": ("StepRecord", "TrainConfig", "TrainError", "TrainResult", "Trainer", "train"),
    "model": ("LabelMap", "ModelConfig", "ModelError", "build_model", "set_pasted_losses"),
})
