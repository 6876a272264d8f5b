"""A segmenter plug-in (`slow_segmenter:Slow`): the plain-background segmenter, `delay` seconds
slower per batch, logging which Ray node (or `local`) segments which category, so a test can
kill a node while it is inside a unit and see the unit run again on another."""

from __future__ import annotations

import time

from xpaste_stream.extract.segmenters import PlainBackgroundSegmenter


class Slow(PlainBackgroundSegmenter):
    name = "slow-plain-background"

    def __init__(self, delay: float, log: str):
        super().__init__()
        self.delay, self.log = delay, log

    def segment(self, images, categories):
        with open(self.log, "a") as f:
            f.write(f"{_node()} {categories[0]}\n")
        time.sleep(self.delay)
        return super().segment(images, categories)


def _node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except ImportError:
        return "local"
