"""What every stage-1 generator sees and returns.

The stage numbers work items category-major and hands them to a generator in batches; the
generator returns one result per item, in order: an image or a failure with a reason. Keeping
this contract small is what lets the procedural, diffusers and folder generators share one
resumable driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class WorkItem:
    position: int     # input number for ShardWriter: category slot * images_per_category + index
    category_id: int
    category: str     # category name as in the category list
    index: int        # image number within the category
    prompt: str       # the prompt template filled with the name (underscores -> spaces)


@dataclass
class Generated:
    rgb: np.ndarray                            # (H, W, 3) uint8
    meta: dict = field(default_factory=dict)   # extra JSON fields (model, source, ...)


@dataclass(frozen=True)
class Failure:
    reason: str       # counter key in the shard stats, e.g. "nan_output", "unreadable_image"
    detail: str = ""


class Generator(Protocol):
    name: str         # written as `generator` into every sample's JSON
    batch_size: int   # work items per `generate` call

    def available(self, category: str) -> int | None:
        """How many images this generator can make for a category; None: as many as asked."""

    def report(self) -> dict:
        """Extra fields for the stage summary (e.g. folders that match no category)."""

    def generate(self, items: list[WorkItem]) -> list[Generated | Failure]:
        """One result per item, in the order given."""
