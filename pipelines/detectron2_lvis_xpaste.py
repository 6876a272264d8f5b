"""Train detectron2's Mask R-CNN R50-FPN on LVIS v1 with X-Paste batches from xpaste-stream.

    python pipelines/detectron2_lvis_xpaste.py --num-gpus 8 \
        [--config-file pipelines/detectron2_lvis_xpaste.yaml] [--resume] [KEY VALUE ...]

The only change to a stock detectron2 trainer is `build_train_loader`: CopyPasteLoader's batches
through `xpaste_stream.loader.detectron2` (LSJ and pasting on each process's GPU). The loader is
registered with the checkpointer, so `--resume` continues mid-epoch with the same batches.
Needs detectron2 (not on PyPI): build it from its source as README.md's detectron2 section says.

Offline and on the CPU (README, "detectron2"): `MODEL.DEVICE cpu XPASTE.DEVICE cpu`,
`MODEL.WEIGHTS ""` (random init; or a local .pkl / .pth: nothing is downloaded), and
`DATASETS.TEST "()"` when there is no LVIS val set (training runs without evaluation).
The model-zoo base config is found in detectron2's installed files, without `pkg_resources`
(gone from setuptools >= 81, which `detectron2.model_zoo` still imports).
"""

from __future__ import annotations

import os

import detectron2
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import LVISEvaluator

from xpaste_stream.loader.detectron2 import add_xpaste_config, build_xpaste_train_loader

BASE = "LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
HERE = os.path.dirname(os.path.abspath(__file__))


class XPasteTrainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_xpaste_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return LVISEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "eval"))


def base_config_file(name: str = BASE) -> str:
    """The model zoo's config file: in the installed package (`model_zoo/configs`, a link in
    editable installs) or the source tree's `configs/`; `detectron2.model_zoo` only if neither
    is there (it needs `pkg_resources`, i.e. setuptools < 81)."""
    package = os.path.dirname(detectron2.__file__)
    for root in (os.path.join(package, "model_zoo", "configs"), os.path.join(package, "..", "configs")):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return os.path.normpath(path)
    from detectron2 import model_zoo

    return model_zoo.get_config_file(name)


def setup(args):
    cfg = get_cfg()
    cfg.merge_from_file(base_config_file())
    add_xpaste_config(cfg)
    cfg.merge_from_file(args.config_file or os.path.join(HERE, "detectron2_lvis_xpaste.yaml"))
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    trainer = XPasteTrainer(cfg)
    # the loader's position goes into every checkpoint (its iterator starts lazily, after loading)
    trainer.checkpointer.add_checkpointable("xpaste_loader", trainer._trainer.data_loader)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
