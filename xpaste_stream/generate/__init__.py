"""Stage 1: generators stream object images into image shards (docs/FORMATS.md, "Image shards")."""

from .stage import GenerateConfig, load_category_list, run_generate

__all__ = ["GenerateConfig", "load_category_list", "run_generate"]
