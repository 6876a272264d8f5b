"""The instance bank: a compact columnar index over instance shards, and samplers over it.

    build_index(shards, out_dir, workers=2, dedup=False, progress=True) -> summary dict
    InstanceBank.open(path) -> memory-mapped bank: instances_of, categories_of, sizes_of, read
    make_sampler(bank, kind="cas", seed=0, rank=0, worker=0, ...) -> Sampler with draw(n)
    describe_bank(path, category_meta=None, plot=False) -> text

The bank format is described in layout.py (and docs/FORMATS.md).
"""

from .bank import InstanceBank
from .build import build_index
from .describe import describe_bank
from .layout import BankError
from .sampler import Sampler, make_sampler

__all__ = ["build_index", "InstanceBank", "make_sampler", "Sampler", "describe_bank", "BankError"]
