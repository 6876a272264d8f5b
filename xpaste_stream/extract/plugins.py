"""Which segmenter a name means: a built-in, an installed entry point, or `module:Class`.

Users extend the stage without editing the package (docs/SEGMENTERS.md):
- a dotted path `mypkg.seg:MySegmenter` (module importable from sys.path);
- an entry point in group `xpaste_stream.segmenters` of an installed distribution, e.g. in its
  pyproject.toml: `[project.entry-points."xpaste_stream.segmenters"] my-seg = "mypkg.seg:MySeg"`.
The object named is a factory (usually a class). It is called with the keyword options of
`segmenter_options[spec]`, plus `device`, `precision` and `local_files_only` when its signature
takes them; it must return an object with a `name` and `segment(images, categories)`. An
optional `check(**options, local_files_only=...)` on the factory runs before any work.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points

from ..config import ConfigError
from .models import MODEL_SEGMENTERS
from .segmenters import CLASSICAL

ENTRY_POINT_GROUP = "xpaste_stream.segmenters"
BUILTIN = {**CLASSICAL, **MODEL_SEGMENTERS}
RUNTIME_KEYS = ("device", "precision", "local_files_only")


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve(spec: str):
    """The factory a segmenter name stands for; ConfigError naming it when there is none."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" in spec:
        return _import(spec)
    found = _entry_points()
    if spec in found:
        try:
            return found[spec].load()
        except Exception as e:  # a broken plug-in: say which
            raise ConfigError(f"segmenter {spec!r}: entry point {found[spec].value!r} failed to "
                              f"load ({type(e).__name__}: {e})") from None
    raise ConfigError(f"unknown segmenter {spec!r}: not a built-in ({', '.join(BUILTIN)}), not an "
                      f"entry point of group {ENTRY_POINT_GROUP!r} "
                      f"({', '.join(sorted(found)) or 'none installed'}), and not 'module:Class'")


def _import(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"segmenter {spec!r}: cannot import {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"segmenter {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"segmenter {spec!r}: {attr!r} is not a class or function")
    return obj


def check(spec: str, options: dict, local_files_only: bool = True) -> None:
    """Before any work: the factory exists and, where it says how, its weights are here."""
    factory = resolve(spec)
    checker = getattr(factory, "check", None)
    if callable(checker):
        checker(**options, local_files_only=local_files_only)


def build(spec: str, options: dict, runtime: dict):
    """A segmenter instance from its name, options and the stage's device settings."""
    factory = resolve(spec)
    kwargs = dict(options)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in RUNTIME_KEYS:
        if key in runtime and (takes_any or key in params):
            kwargs.setdefault(key, runtime[key])
    try:
        segmenter = factory(**kwargs)
    except TypeError as e:
        raise ConfigError(f"segmenter {spec!r}: bad options {sorted(options)} ({e})") from None
    if not callable(getattr(segmenter, "segment", None)):
        raise ConfigError(f"segmenter {spec!r}: {type(segmenter).__name__} has no "
                          "segment(images, categories) method")
    if not isinstance(getattr(segmenter, "name", None), str) or not segmenter.name:
        raise ConfigError(f"segmenter {spec!r}: {type(segmenter).__name__} has no `name` string")
    return segmenter
