"""Stage 3: the DALI copy-paste loader (see loader.py for the data flow, docs/LOADER.md for the design).

    from xpaste_stream.loader import CopyPasteLoader, PasteConfig
    loader = CopyPasteLoader(urls, bank_dir, PasteConfig(output_size=640), batch_size=16, device_id=0)

Names are imported on first use, so registering the `demo` and `bench` commands (and reading
a PasteConfig) does not load torch, DALI and numba.
"""

import importlib

_EXPORTS = {
    "config": ("LoaderConfig", "PasteConfig"),
    "detectron2": ("to_detectron2",),
    "loader": ("Batch", "CopyPasteLoader", "LoaderError", "check_bank_matches"),
    "plan": ("PastePlan",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
