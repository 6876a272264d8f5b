"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os


def shard_files(folder) -> list[str]:
    """The .tar files of a folder, sorted."""
    return sorted(os.path.join(str(folder), f) for f in os.listdir(folder) if f.endswith(".tar"))
