"""Stage 3: the DALI copy-paste loader (see loader.py for the data flow, docs/LOADER.md for the design).

    from xpaste_stream.loader import CopyPasteLoader, PasteConfig
    loader = CopyPasteLoader(urls, bank_dir, PasteConfig(output_size=640), batch_size=16, device_id=0)

Names are imported on first use, so registering the `demo` and `bench` commands (and reading
a PasteConfig) does not load torch, DALI and numba.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ("LoaderConfig", "PasteConfig"),
    "detectron2": ("to_detectron2",),
    "loader": ("Batch", "CopyPasteLoader", "LoaderError", "check_bank_matches"),
    "plan": ("PastePlan",),
})
