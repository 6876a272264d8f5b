"""Train a torchvision Mask R-CNN on X-Paste batches streamed from shard URLs (the
`xpaste-stream train` command as a script; every flag of `xpaste-stream train --help`).

    python pipelines/train_maskrcnn.py --backgrounds 'shards/bg/bg-*.tar' --bank shards/bank \
        --output runs/r50 --size 1024 --batch-size 2 --max-steps 90000 --lr-steps 60000 80000
    torchrun --nproc-per-node 8 pipelines/train_maskrcnn.py ...      # DDP, one process per GPU
    python pipelines/train_maskrcnn.py ... --resume auto             # continue mid-epoch
"""

import sys

from xpaste_stream.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
