"""Stage 2: cut objects out of generated images into instance shards (docs/FORMATS.md)."""

from .clip_score import ClipConfig, ClipScorer, ClipWeightsMissing
from .models import SegmenterWeightsMissing
from .rejects import Rejected
from .segmenters import Segmenter, SegmentResult
from .stage import ExtractConfig, extract_batch, extract_one, run_extract

__all__ = ["ClipConfig", "ClipScorer", "ClipWeightsMissing", "ExtractConfig", "Rejected",
           "SegmentResult", "Segmenter", "SegmenterWeightsMissing", "extract_batch", "extract_one",
           "run_extract"]
