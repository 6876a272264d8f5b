"""`generator = "folder"`: ingest crawled images, X-Paste's second image source.

Layout: `ROOT/<category name>/*.{jpg,jpeg,png,webp}`. Folder names match category names after
lower-casing and turning spaces into underscores ("Baseball Bat" -> "baseball_bat"); folders that
match no category are reported, not ingested. Files are taken in sorted order, so image `index`
of a category is always the same file and a rerun resumes where it stopped (as long as the
folder does not change between runs). Each image is re-encoded as RGB JPEG: EXIF rotation
applied, transparency composited onto white (the plain background the extract stage expects),
shrunk so the long side is at most `image_size`. Unreadable files (random bytes, empty, cut
short, a link whose target is gone) are skipped and named, never fatal.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..formats import check_pil_size
from .base import Failure, Generated, WorkItem

GENERATOR = "folder"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class FolderConfig:
    root: str = ""  # ROOT/<category name>/*.{jpg,jpeg,png,webp}; required for generator "folder"


def folder_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def load_rgb(path: str, max_side: int) -> np.ndarray:
    """Decode one file into (H, W, 3) uint8 RGB with the long side <= max_side."""
    with Image.open(path) as im:
        check_pil_size(im, path)  # FormatError before anything decodes an oversized file
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        im = im.convert("RGB")
        w, h = im.size
        if max(w, h) > max_side:
            scale = max_side / max(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                           Image.Resampling.LANCZOS)
        return np.asarray(im)


class FolderGenerator:
    """Serves the sorted files of each category folder as work items."""

    name = GENERATOR
    batch_size = 16  # files decoded per call; any value gives the same shards

    def __init__(self, root: str, categories: list[tuple[int, str]], max_side: int):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"folder.root {root!r} is not a directory")
        self.root, self.max_side = root, max_side
        names = {folder_key(name): name for _, name in categories}
        self.files: dict[str, list[str]] = {}
        self.unknown_folders: list[str] = []
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            name = names.get(folder_key(entry.name))
            if name is None:
                self.unknown_folders.append(entry.name)
                continue
            found = [f.path for f in os.scandir(entry.path)  # a dangling link: listed, then named
                     if f.name.lower().endswith(EXTENSIONS) and (f.is_file() or f.is_symlink())]
            self.files[name] = sorted(self.files.get(name, []) + found)
        if self.unknown_folders:
            warnings.warn(f"{root}: {len(self.unknown_folders)} folder(s) match no category and are "
                          f"skipped: {', '.join(self.unknown_folders[:20])}", stacklevel=2)
        self.empty_categories = sum(1 for _, name in categories if not self.files.get(name))

    def available(self, category: str) -> int:
        return len(self.files.get(category, ()))

    def report(self) -> dict:
        return {"root": self.root, "unknown_folders": self.unknown_folders,
                "categories_without_images": self.empty_categories}

    def source_of(self, item: WorkItem) -> str:
        return self.files[item.category][item.index]

    def generate(self, items: list[WorkItem]) -> list[Generated | Failure]:
        results: list[Generated | Failure] = []
        for item in items:
            path = self.source_of(item)
            try:
                rgb = load_rgb(path, self.max_side)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                results.append(Failure("unreadable_image", f"{path}: {type(e).__name__}: {e}"))
                continue
            results.append(Generated(rgb, {"source": path, "prompt": ""}))
        return results
