"""Shared fixtures: small COCO / LVIS-format datasets made on the fly (nothing downloaded)."""

from __future__ import annotations

import pytest

from xpaste_stream.generate.procedural import SceneSpec, category_names, write_scene_dataset


def make_dataset(folder: str, lvis: bool, num_images: int = 12, num_categories: int = 8) -> str:
    """Real JPEGs with polygon (even ids) and RLE (odd ids) masks; LVIS adds r/c/f groups."""
    return write_scene_dataset(folder, category_names(num_categories),
                               SceneSpec(num_images=num_images, image_size=(96, 128), lvis=lvis,
                                         max_objects=4, seed=3))


@pytest.fixture
def lvis_dataset(tmp_path) -> tuple[str, str]:
    path = make_dataset(str(tmp_path / "lvis"), lvis=True)
    return path, str(tmp_path / "lvis" / "images")


@pytest.fixture
def coco_dataset(tmp_path) -> tuple[str, str]:
    path = make_dataset(str(tmp_path / "coco"), lvis=False)
    return path, str(tmp_path / "coco" / "images")

