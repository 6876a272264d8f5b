"""Stage 3: the DALI copy-paste loader (see loader.py for the data flow, docs/LOADER.md for the design).

    from xpaste_stream.loader import CopyPasteLoader, PasteConfig
    loader = CopyPasteLoader(urls, bank_dir, PasteConfig(output_size=640), batch_size=16, device_id=0)
"""

from .config import LoaderConfig, PasteConfig
from .detectron2 import to_detectron2
from .loader import Batch, CopyPasteLoader, LoaderError, check_bank_matches
from .plan import PastePlan

__all__ = ["Batch", "CopyPasteLoader", "LoaderConfig", "LoaderError", "PasteConfig", "PastePlan",
           "check_bank_matches", "to_detectron2"]
