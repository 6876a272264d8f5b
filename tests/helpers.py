"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os

from xpaste_stream.extract import ExtractConfig
from xpaste_stream.generate import GenerateConfig


def shard_files(folder) -> list[str]:
    """The .tar files of a folder, sorted."""
    return sorted(os.path.join(str(folder), f) for f in os.listdir(folder) if f.endswith(".tar"))


def gen_config(folder, **kw) -> GenerateConfig:
    """Procedural image shards small enough for many runs: 3 categories x 4 images, 3 units."""
    settings = {"output": str(folder / "gen-{shard:04d}.tar"), "num_categories": 3,
                "images_per_category": 4, "image_size": 64, "maxcount": 4, **kw}
    return GenerateConfig(**settings)


def ext_config(inputs, folder, **kw) -> ExtractConfig:
    settings = {"maxcount": 4, "batch_size": 3, **kw}
    return ExtractConfig(inputs=[inputs], output=str(folder / "inst-{shard:04d}.tar"), **settings)


TIMES = ("seconds", "finished_at", "created")  # when, not what: left out of comparisons


def snapshot(folder) -> dict:
    """Every file under `folder` by relative name: bytes, JSON (stats, manifests) as data
    without its time stamps. Shards, .idx, rejects lists and tars, banks' columns compared whole."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            data = open(path, "rb").read()
            if name.endswith(".json"):
                doc = json.loads(data)
                data = {k: v for k, v in doc.items() if k not in TIMES} if isinstance(doc, dict) else doc
            found[os.path.relpath(path, folder)] = data
    return found
