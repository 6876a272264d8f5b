"""Stage 2: cut objects out of generated images into instance shards (docs/FORMATS.md)."""

from .stage import ExtractConfig, extract_one, run_extract

__all__ = ["ExtractConfig", "extract_one", "run_extract"]
