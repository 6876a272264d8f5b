"""`xpaste-stream train` and `xpaste-stream evaluate`.

Settings come from flags, or from a TOML file's `[train]` table (`--config`) with flags given
on the command line taking precedence; either way they go through `TrainConfig` and its checks.
"""

from __future__ import annotations

import sys

from ..config import ConfigError, from_dict, load_toml

# flag -> (section, key) of TrainConfig; section None is the top level
_TRAIN_FLAGS = {
    "backgrounds": (None, "backgrounds"), "bank": (None, "bank"), "categories": (None, "categories"),
    "output": (None, "output_dir"), "batch_size": (None, "batch_size"), "epochs": (None, "epochs"),
    "max_steps": (None, "max_steps"), "optimizer": (None, "optimizer"), "lr": (None, "lr"),
    "weight_decay": (None, "weight_decay"), "warmup": (None, "warmup_steps"),
    "lr_steps": (None, "lr_steps"), "clip_grad": (None, "clip_grad_norm"), "amp": (None, "amp"),
    "device": (None, "device"), "seed": (None, "seed"), "threads": (None, "loader_threads"),
    "pasted_box_loss": (None, "pasted_box_loss"), "pasted_mask_loss": (None, "pasted_mask_loss"),
    "log_every": (None, "log_every"), "checkpoint_every": (None, "checkpoint_every"),
    "resume": (None, "resume"), "overwrite": (None, "overwrite"),
    "backbone": ("model", "backbone"), "weights": ("model", "weights"),
    "backbone_weights": ("model", "backbone_weights"),
    "max_pastes": ("paste", "max_pastes"), "min_pastes": ("paste", "min_pastes"),
    "blending": ("paste", "blending"), "workers": (None, "loader_workers"),
}


def register(subparsers) -> None:
    t = subparsers.add_parser(
        "train", help="train Mask R-CNN from background shards + an instance bank",
        description="Trains a torchvision Mask R-CNN on batches composited by CopyPasteLoader; one "
                    "GPU, DDP under torchrun (one process per GPU), or the CPU. Writes checkpoints "
                    "(model, optimizer, step, loader state) and log.jsonl (loss, images/s, "
                    "data-wait fraction) to --output; --resume auto continues mid-epoch.")
    t.add_argument("--config", help="TOML file with a [train] table (flags override it)")
    t.add_argument("--backgrounds", nargs="+", help="background shard URLs / patterns")
    t.add_argument("--bank", help="instance bank folder")
    t.add_argument("--categories", help="categories.json (default: beside the shards)")
    t.add_argument("--output", help="folder for checkpoints and log.jsonl (required, here or in "
                                     "--config; one run per folder)")
    t.add_argument("--backbone", help="resnet50 (default), resnet18/34/101/..., or tiny (tests)")
    t.add_argument("--size", type=int, help="canvas side: loader output size = model input size")
    t.add_argument("--weights", help="local torchvision Mask R-CNN weights (e.g. COCO); never downloaded")
    t.add_argument("--backbone-weights", help="local ImageNet weights of the backbone")
    t.add_argument("--batch-size", type=int, help="images per GPU / process")
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", type=int, help="stop after this many steps (epochs ignored)")
    t.add_argument("--optimizer", choices=["sgd", "adamw"])
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup", type=int, help="linear warm-up steps")
    t.add_argument("--lr-steps", type=int, nargs="*", help="steps where the lr drops x0.1")
    t.add_argument("--clip-grad", type=float, help="gradient norm clip (0: off)")
    t.add_argument("--amp", choices=["auto", "off", "fp16", "bf16"])
    t.add_argument("--device", help="(default: auto)")
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="loader (DALI) threads per process")
    t.add_argument("--max-pastes", type=int)
    t.add_argument("--min-pastes", type=int)
    t.add_argument("--blending", choices=["hard", "alpha", "gaussian"])
    t.add_argument("--workers", type=int, help="loader processes for host work (read, plan, fetch)")
    t.add_argument("--no-pasted-box-loss", dest="pasted_box_loss", action="store_const", const=False,
                   help="leave pasted objects out of the box-regression loss (X-Paste ablation)")
    t.add_argument("--no-pasted-mask-loss", dest="pasted_mask_loss", action="store_const", const=False,
                   help="leave pasted objects out of the mask loss (X-Paste ablation)")
    t.add_argument("--log-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--resume", help="a checkpoint file, or 'auto': the newest in --output")
    t.add_argument("--overwrite", action="store_const", const=True,
                   help="--output holds an earlier run: remove its checkpoints and log, start over")
    t.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "evaluate", help="LVIS / COCO evaluation of a training checkpoint",
        description="Runs a checkpoint over validation images (annotation json + image folder, or "
                    "background shards) and scores boxes and masks with LVISEval (AP, APr, APc, "
                    "APf) or COCOeval; writes OUTPUT/results.json and OUTPUT/predictions.json and "
                    "prints a table per frequency group.")
    e.add_argument("checkpoint")
    e.add_argument("--annotations", help="LVIS / COCO validation json")
    e.add_argument("--images", help="its image folder")
    e.add_argument("--backgrounds", nargs="+", help="or background shards (ground truth from them)")
    e.add_argument("--categories", help="categories.json of the shards (default: beside them)")
    e.add_argument("--evaluator", choices=["auto", "lvis", "coco"], default="auto",
                   help="auto: from the ground truth's format (an LVIS json, or shards packed from "
                        "LVIS: LVISEval; COCO: COCOeval)")
    e.add_argument("--output", default="runs/eval")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="auto")
    e.add_argument("--max-dets", type=int, default=0, help="detections per image (0: 300 LVIS, 100 COCO)")
    e.add_argument("--score-thresh", type=float, default=1e-4)
    e.add_argument("--size", type=int, default=0, help="test size, longest side (0: training size)")
    e.add_argument("--max-images", type=int, default=0, help="evaluate the first N images (0: all)")
    e.set_defaults(func=run_evaluate)


def train_config(args):
    """TrainConfig from `--config`'s [train] table, overridden by the flags given."""
    from .loop import TrainConfig

    table = {}
    if args.config:
        doc = load_toml(args.config)
        table = doc.get("train", doc)
    for flag, (section, key) in _TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            target = table.setdefault(section, {}) if section else table
            target[key] = value
    if args.size is not None:
        table.setdefault("model", {})["image_size"] = args.size
        table.setdefault("paste", {})["output_size"] = args.size
    if getattr(args, "quiet", False):
        table["progress_every"] = 0.0
    if not table.get("output_dir"):
        raise ConfigError("train: --output FOLDER is required (checkpoints and log.jsonl go there; "
                          "a run that keeps nothing cannot resume)")
    return from_dict(TrainConfig, table, args.config or "train")


def run_train(args) -> int:
    from ..loader import LoaderError
    from .checkpoint import CheckpointError
    from .loop import TrainError, train
    from .model import ModelError

    try:
        result = train(train_config(args))
    except (LoaderError, TrainError, CheckpointError, ModelError) as e:
        print(f"xpaste-stream train: error: {e}", file=sys.stderr)
        return 2
    print(f"trained {result.steps} steps; {result.images_per_s:.3g} images/s, data wait "
          f"{100 * result.data_wait_fraction:.1f} % of step time; checkpoint {result.last_checkpoint}")
    return 0


def run_evaluate(args) -> int:
    from .checkpoint import CheckpointError
    from .evaluate import EvalConfig, EvalError, evaluate, format_table
    from .model import ModelError

    cfg = from_dict(EvalConfig, {
        "checkpoint": args.checkpoint, "annotations": args.annotations, "images": args.images,
        "backgrounds": args.backgrounds, "categories": args.categories, "evaluator": args.evaluator,
        "output": args.output, "batch_size": args.batch_size, "device": args.device,
        "detections_per_image": args.max_dets, "score_threshold": args.score_thresh,
        "image_size": args.size, "max_images": args.max_images}, "evaluate")
    try:
        results = evaluate(cfg, progress=not getattr(args, "quiet", False))
    except (EvalError, CheckpointError, ModelError) as e:
        print(f"xpaste-stream evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"{results['evaluator'].upper()} evaluation of {cfg.checkpoint} (step {results['step']}) on "
          f"{results['images']} images, {results['detections']} detections:")
    print(format_table(results["metrics"]))
    print(f"results: {cfg.output}/results.json")
    return 0
