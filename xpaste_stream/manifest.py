"""Run manifests: the settings that shape a shard set, kept beside it, so runs never mix.

Every stage that writes shards (pack-coco, generate, extract) writes `PREFIX-manifest.json`
beside its output (`out/gen-{shard:06d}.tar` -> `out/gen-manifest.json`) *before* any work:
schema `xpaste.run-manifest/1`, the stage, its settings (only those that change what the
shards hold: not the device, batch size or worker count), their fingerprint, and the work
units already given a shard number (extract). A rerun into the same output with other settings
is refused before any work, naming each setting that differs, unless the user asks to start
over (`overwrite=True`: that shard set is removed first) or writes elsewhere. Every shard's stats
carry the fingerprint (`run`), so `inspect` can tell a shard set written by mixed runs.

Inputs are named by `input_identity`, never by how they were spelled: a local file by its real
path relative to the output's folder (so `./x/a.tar`, `x/a.tar`, `$PWD/x/a.tar` and a symlink
to it are one input, and a project folder moved or copied whole keeps its manifests valid), an
object-store URL normalised. Manifests record this (`identity`); one written before it keyed
inputs by their spelling and is refused (with `--overwrite` to start over) rather than mixed.

The bank (`index`) needs no such guard: it recomputes every rule over all rows on each build
and records its settings in its own manifest.json (docs/FORMATS.md).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any

from . import urls
from .config import ConfigError

MANIFEST_SCHEMA = "xpaste.run-manifest/1"
MANIFEST_SUFFIX = "manifest.json"
IDENTITY = "output-relative/1"  # how `input_identity` names inputs (recorded in every manifest)


def manifest_path(pattern: str) -> str:
    """`out/gen-{shard:06d}.tar` -> `out/gen-manifest.json`: one manifest per shard set."""
    return urls.sidecar_path(pattern, MANIFEST_SUFFIX)


def output_folder(pattern: str) -> str:
    """The folder a shard pattern (or a bank folder's files) is written into."""
    folder = pattern.rpartition("/")[0]
    return folder or "."


def input_identity(url: str, output: str) -> str:
    """One name for one input whatever its spelling: a local path as its real path (symlinks
    resolved) relative to the real folder of `output` (a shard pattern), in POSIX form; a
    remote URL with its scheme lower-cased and its path normalised (no `//`, `.`, `..`).
    Identities of local inputs stay the same when the folder holding inputs and output moves."""
    if urls.is_remote(output) or urls.is_remote(url):
        return normalise_url(url) if urls.is_remote(url) else os.path.realpath(urls.local_path(url))
    real = os.path.realpath(urls.local_path(url))
    base = os.path.realpath(urls.local_path(output_folder(output)))
    try:
        rel = os.path.relpath(real, base)
    except ValueError:  # another drive (Windows): no relative path exists
        return real
    return rel.replace(os.sep, "/")


def identity_location(identity: str, output: str) -> str:
    """Where an input named by `input_identity` is now: a local identity as an absolute path
    (from the output's real folder), a URL as is (for messages and summaries)."""
    if urls.is_remote(identity) or os.path.isabs(identity) or urls.is_remote(output):
        return identity
    base = os.path.realpath(urls.local_path(output_folder(output)))
    return os.path.normpath(os.path.join(base, identity))


def normalise_url(url: str) -> str:
    """`S3://bucket//a/./b.tar` -> `s3://bucket/a/b.tar`: one spelling per object."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    path = posixpath.normpath("/" + path).lstrip("/") if slash else ""
    return f"{scheme.lower()}://{netloc}/{path}" if slash else f"{scheme.lower()}://{netloc}"


def settings_of(cfg: Any, leave_out: tuple[str, ...] = ()) -> dict:
    """A config dataclass as plain data, without the dotted names in `leave_out`
    (settings that do not change the outputs: devices, batch sizes, paths of the outputs)."""
    data = dataclasses.asdict(cfg)
    for dotted in leave_out:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return data


def file_fingerprint(path: str) -> str:
    """sha256 of a small input file (a categories list): settings by content, not by name."""
    with urls.open_url(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`name: old -> new` for every setting that differs (nested tables by dotted name)."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


@dataclass
class RunManifest:
    """The manifest of one shard set; `units` maps a work unit's key to its shard number."""

    path: str
    stage: str
    settings: dict
    units: dict[str, int] = field(default_factory=dict)
    created: str = ""
    pattern: str = ""  # the shard set: its writer lock is taken when the manifest is saved

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    def as_dict(self) -> dict:
        return {"schema": MANIFEST_SCHEMA, "stage": self.stage, "fingerprint": self.fingerprint,
                "identity": IDENTITY, "created": self.created, "settings": self.settings, "units": self.units}

    def save(self) -> None:
        if self.pattern:
            from .shards import lock_output

            lock_output(self.pattern, self.stage)
        urls.write_bytes(self.path, json.dumps(self.as_dict(), indent=1, sort_keys=True).encode())

    def assign(self, keys: list[str]) -> dict[str, int]:
        """Give every unit key without one the next free shard number (keys taken sorted, so the
        numbers never depend on listing order); returns the numbers of `keys`."""
        for key in sorted(k for k in keys if k not in self.units):
            self.units[key] = max(self.units.values(), default=-1) + 1
        return {k: self.units[k] for k in keys}


def read_manifest(path: str) -> dict | None:
    """The manifest at `path` (None when absent); ConfigError naming it when unreadable."""
    if not urls.exists(path):
        return None
    try:
        with urls.open_url(path, "rb") as f:
            doc = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable run manifest ({e}); remove it or use --overwrite") from None
    if not isinstance(doc, dict) or doc.get("schema") != MANIFEST_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise ConfigError(f"{path}: not a run manifest (schema {found!r}, expected {MANIFEST_SCHEMA!r})")
    return doc


def output_files(pattern: str) -> list[str]:
    """Every file of the shard set `pattern` names that exists: shards, their .idx, stats and
    leftover .tmp files."""
    if re.search(r"\{\d+\.\.\d+\}", pattern):
        stems = [u[:-4] if u.endswith(".tar") else u for u in urls.expand(pattern)]
        found = []
        for stem in stems:
            found += [p for p in (stem + ".tar", stem + ".tar.tmp", stem + ".idx", stem + ".stats.json")
                      if urls.exists(p)]
        return found
    wild = re.sub(r"\{shard[^}]*\}|%0?\d*d", "*", pattern)
    stem = wild[:-4] if wild.endswith(".tar") else wild
    found: list[str] = []
    for suffix in (".tar", ".tar.tmp", ".idx", ".stats.json"):
        found += _glob(stem + suffix)
    return sorted(set(found))


def _glob(pattern: str) -> list[str]:
    if urls.is_remote(pattern):
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        return [fs.unstrip_protocol(p) for p in paths]
    return glob.glob(urls.local_path(pattern))


def open_run(stage: str, pattern: str, settings: dict, *, overwrite: bool = False,
             extra_outputs: tuple[str, ...] = ()) -> RunManifest:
    """The manifest this run writes into, checked against what the output already holds;
    the caller saves it once every other check passed, right before work.

    Raises ConfigError before any work when the output was written with other settings (naming
    each), or holds shards without a manifest. `overwrite` removes the shard set (and
    `extra_outputs`, files the stage writes beside it) first.
    """
    from .shards import lock_output

    # one writer per shard set: a second is refused here (the lock is taken by `save`, right
    # before work, or here when --overwrite is about to remove files)
    lock_output(pattern, stage, check_only=not (overwrite and output_files(pattern)))
    path = manifest_path(pattern)
    if overwrite:
        for f in output_files(pattern) + [p for p in extra_outputs if urls.exists(p)] + [path]:
            urls.remove(f)
    doc = read_manifest(path)
    if doc is None:
        present = output_files(pattern)
        if present:
            raise ConfigError(f"{stage}: {pattern} already holds {len(present)} files (e.g. "
                              f"{present[0]}) but no run manifest {path}, so the settings they were "
                              "written with are unknown; rerun with --overwrite to start over, or "
                              "write elsewhere")
        return RunManifest(path, stage, settings, created=_now(), pattern=pattern)
    if not output_files(pattern):  # a manifest, but nothing written under it: nothing to mix
        return RunManifest(path, stage, settings, created=_now(), pattern=pattern)
    if doc.get("stage") != stage:
        raise ConfigError(f"{stage}: {path} belongs to a {doc.get('stage')!r} run; write elsewhere")
    if doc.get("identity") != IDENTITY:
        raise ConfigError(f"{stage}: {path} was written by an earlier xpaste-stream that named inputs "
                          "by their spelling (so one input could be read twice); rerun with "
                          "--overwrite to start over, or write elsewhere")
    changed = differences(doc.get("settings", {}), settings)
    if changed:
        raise ConfigError(f"{stage}: {pattern} was written with other settings ({'; '.join(changed)}"
                          "); rerunning would mix two runs in one shard set. Rerun with the same "
                          "settings to resume, with --overwrite to start over (removes these "
                          "shards), or write elsewhere")
    return RunManifest(path, stage, doc["settings"], dict(doc.get("units", {})), doc.get("created", ""),
                       pattern)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
