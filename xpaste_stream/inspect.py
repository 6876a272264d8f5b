"""`xpaste-stream inspect SHARDS... | BANK | categories.json`: what it holds, and what is broken.

For shards, every sample is checked the way its consumer will read it: components present and
non-empty, no dotted key, JSON readable and of the set's kind (the most common schema, or
`--kind`), payloads decoded (jpg / png, the instance mask; `ann.zst` and `masks.zst` decompressed) with
sizes matching the JSON, keys unique across the set. Each shard's stats are read too: the
failures its producing stage recorded are reported, and a sample count that differs from what
the shard holds is damage. A bank is checked against its shards (present, unchanged) and its
recorded skips; a categories file against its schema. Exit status 1 when something is broken.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import zstandard
from PIL import Image

from . import errors, formats, urls
from .bank.describe import HISTOGRAM_PNG
from .bank.tarscan import required as instance_required
from .config import ConfigError
from .manifest import MANIFEST_SUFFIX
from .manifest import read_manifest as read_run_manifest
from .shards import (
    TarDamage,
    check_components,
    dali_index_path,
    index_keys,
    iter_indexed,
    iter_tar,
    read_dali_index,
    read_stats,
    sample_key,
    stale_index,
)

_BACKGROUND_REQUIRED = tuple(c for c in formats.BACKGROUND_COMPONENTS
                             if c not in formats.BACKGROUND_IMAGE_EXTS)
_REQUIRED = {formats.IMAGE_SCHEMA: lambda sample: formats.IMAGE_COMPONENTS,
             formats.BACKGROUND_SCHEMA: lambda sample: _BACKGROUND_REQUIRED,
             **dict.fromkeys(formats.INSTANCE_SCHEMAS, instance_required)}  # mask: either version
_ALL_COMPONENTS = tuple(sorted({*formats.BACKGROUND_IMAGE_EXTS, *formats.IMAGE_COMPONENTS,
                                *formats.INSTANCE_COMPONENTS, *formats.INSTANCE_MASK_COMPONENTS,
                                *_BACKGROUND_REQUIRED}))
_KINDS = {"image": formats.IMAGE_SCHEMA, "instance": formats.INSTANCE_SCHEMA,
          "background": formats.BACKGROUND_SCHEMA}
_LISTED = 1000  # names kept per problem list (counts stay exact)


@dataclass
class ShardReport:
    shards: int = 0
    samples: int = 0
    schemas: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    component_bytes: Counter = field(default_factory=Counter)
    broken: list[dict] = field(default_factory=list)    # {shard, key, reason, detail}
    damaged: list[dict] = field(default_factory=list)   # shards cut short, unreadable, miscounted
    missing: list[str] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    same_source: list[dict] = field(default_factory=list)  # one source sample extracted twice
    recorded_failures: Counter = field(default_factory=Counter)  # from the shards' stats
    recorded_failed: list[dict] = field(default_factory=list)
    without_dali_index: list[str] = field(default_factory=list)
    without_stats: list[str] = field(default_factory=list)
    mixed_runs: list[dict] = field(default_factory=list)  # {shard, reason, run, shards, manifest}
    decoded: bool = True
    _runs: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _keys: dict[str, str] = field(default_factory=dict, repr=False)
    _sources: dict[tuple, tuple[str, str]] = field(default_factory=dict, repr=False)
    _by_schema: dict[str, list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    @property
    def has_problems(self) -> bool:
        return bool(self.broken or self.damaged or self.missing or self.duplicates or self.mixed_runs
                    or self.same_source)

    def as_dict(self) -> dict:
        return {"kind": "shards", "shards": self.shards, "samples": self.samples,
                "schemas": dict(self.schemas), "categories": len(self.categories),
                "instances_per_category": {str(k): v for k, v in sorted(self.categories.items())},
                "component_bytes": dict(self.component_bytes), "decoded": self.decoded,
                "broken": self.broken, "damaged": self.damaged, "missing": self.missing,
                "duplicates": self.duplicates, "same_source": self.same_source,
                "mixed_runs": self.mixed_runs,
                "recorded_failures": dict(self.recorded_failures),
                "recorded_failed": self.recorded_failed,
                "without_dali_index": self.without_dali_index, "without_stats": self.without_stats,
                "ok": not self.has_problems}


# -- one sample ---------------------------------------------------------------------------------


def _decode_image(data: bytes, what: str) -> Image.Image:
    """Decode fully (a header check passes random bytes behind valid markers), once its size
    is known to be within the image size limit (formats.check_image_dims)."""
    formats.check_image_header(data, what)
    try:
        with Image.open(io.BytesIO(data)) as im:
            formats.check_pil_size(im, what)
            im.load()
            return im.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise formats.FormatError(f"{what} does not decode ({type(e).__name__}: {e})") from None


def _check_image(sample: dict, meta: dict, decode: bool) -> list:
    if decode:
        size = _decode_image(sample["jpg"], "jpg").size
        _check_size(size, meta, "jpg")
    return [meta.get("category_id")]


def _check_instance(sample: dict, meta: dict, decode: bool) -> list:
    if decode:
        _check_size(_decode_image(sample["jpg"], "jpg").size, meta, "jpg")
        formats.decode_alpha(*reversed(formats.instance_mask(sample)), int(meta["width"]),
                             int(meta["height"]))  # FormatError when damaged or of another size
    return [meta.get("category_id")]


def _check_background(sample: dict, meta: dict, decode: bool) -> list:
    ext = next((e for e in formats.BACKGROUND_IMAGE_EXTS if e in sample), None)
    if ext is None or not sample[ext]:
        raise formats.FormatError(f"no image ({' or '.join(formats.BACKGROUND_IMAGE_EXTS)})")
    _, anns = formats.read_background(sample)
    if decode:
        _check_size(_decode_image(sample[ext], ext).size, meta, ext)
        if "masks.zst" in sample:
            boxes = np.array([a["mask_box"] for a in anns], np.int64).reshape(-1, 4)
            formats.unzstd_masks(sample["masks.zst"], boxes)
    return [a["category_id"] for a in anns]


_CHECKS = {formats.IMAGE_SCHEMA: _check_image, formats.BACKGROUND_SCHEMA: _check_background,
           **dict.fromkeys(formats.INSTANCE_SCHEMAS, _check_instance)}


def _check_size(size: tuple[int, int], meta: dict, what: str) -> None:
    expected = (meta.get("width"), meta.get("height"))
    if size != expected:
        raise formats.FormatError(f"{what} is {size[0]}x{size[1]}, the json says "
                                  f"{expected[0]}x{expected[1]}")


def check_sample(sample: dict, decode: bool = True) -> tuple[str | None, tuple[str, str] | None, list]:
    """(schema, (reason, detail) when broken, category ids) of one sample."""
    try:
        meta = json.loads(sample["json"])
        schema = meta.get("schema")
    except KeyError:
        return None, check_components(sample, ("json",)) or ("missing_component", "no json"), []
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        return None, ("unreadable_json", f"{type(e).__name__}: {e}"), []
    required = _REQUIRED.get(schema)
    if required is None:
        return schema, ("unknown_schema", f"schema {schema!r}"), []
    problem = check_components(sample, required(sample))
    if problem is not None:
        return schema, problem, []
    try:
        return schema, None, _CHECKS[schema](sample, meta, decode)
    except formats.FormatError as e:
        return schema, ("undecodable", str(e)), []
    except (ValueError, KeyError, TypeError, zstandard.ZstdError) as e:
        return schema, ("undecodable", f"{type(e).__name__}: {e}"), []


# -- a shard set --------------------------------------------------------------------------------


def inspect_shards(shard_urls: list[str], kind: str | None = None, decode: bool = True) -> ShardReport:
    report = ShardReport(decoded=decode)
    for url in shard_urls:
        if not urls.exists(url):
            report.missing.append(url)
            continue
        report.shards += 1
        _inspect_shard(url, report, decode)
    _judge_schemas(report, _KINDS.get(kind) if kind else None)
    _judge_runs(report)
    return report


def _judge_runs(report: ShardReport) -> None:
    """Shards written by more than one run (their stats carry other manifest fingerprints),
    or by a run their folder's manifest does not describe, are one mixed shard set."""
    manifests: dict[str, str] = {}
    for shards_ in report._runs.values():
        for folder in {u.rpartition("/")[0] or "." for u in shards_}:
            for path in urls.expand(f"{folder}/*-{MANIFEST_SUFFIX}"):
                try:
                    doc = read_run_manifest(path)
                except ValueError:
                    continue
                if doc:
                    manifests[doc["fingerprint"]] = path
    runs = dict(report._runs)
    if len(runs) < 2 and (not manifests or set(runs) <= set(manifests) | {"unrecorded"}):
        return
    for run, shards_ in sorted(runs.items()):
        manifest = manifests.get(run)
        report.mixed_runs.append({"shard": shards_[0], "reason": "mixed_run", "run": run,
                                  "shards": len(shards_), "manifest": manifest,
                                  "detail": f"{len(shards_)} shard(s) of run {run} (e.g. this one), "
                                            + (f"described by {manifest}" if manifest else
                                               "which no run manifest beside them describes")})


def _inspect_shard(url: str, report: ShardReport, decode: bool) -> None:
    damage: list[TarDamage] = []
    read = 0
    for sample in iter_tar(url, damage):
        read += 1
        report.samples += 1
        for k, v in sample.items():
            if not k.startswith("__"):
                report.component_bytes[k] += len(v)
        _note_key(sample["__key__"], url, report)
        schema, problem, categories = check_sample(sample, decode)
        if problem is not None:
            _add(report.broken, {"shard": url, "key": sample_key(sample, _ALL_COMPONENTS),
                                 "reason": problem[0], "detail": problem[1]})
        elif schema is not None:
            if schema in formats.INSTANCE_SCHEMAS:
                _note_source(json.loads(sample["json"]), url, sample["__key__"], report)
            report.schemas[schema] += 1
            names = report._by_schema.setdefault(schema, [])
            if len(names) < _LISTED:
                names.append((url, sample["__key__"]))
            report.categories.update(categories)
    report.damaged.extend({"shard": d.shard, "reason": d.reason, "detail": d.error,
                           "samples": d.samples, "lost": d.lost, "lost_keys": d.lost_keys}
                          for d in damage)
    _check_sidecars(url, read, bool(damage), report)


def _note_key(key: str, url: str, report: ShardReport) -> None:
    if key in report._keys:
        _add(report.duplicates, {"key": key, "shard": url, "reason": "duplicate_key",
                                 "detail": f"first in {report._keys[key]}"})
    else:
        report._keys[key] = url


def source_identity(meta: dict) -> tuple | None:
    """What names the source sample an instance was cut from: its key, box and category (the
    same image extracted twice gives the same triple; another run's image almost never does)."""
    if not meta.get("source_key"):
        return None
    return (meta["source_key"], tuple(meta.get("source_box") or ()), meta.get("category_id"))


def _note_source(meta: dict, url: str, key: str, report: ShardReport) -> None:
    ident = source_identity(meta)
    if ident is None:
        return
    first = report._sources.setdefault(ident, (url, key))
    if first != (url, key):
        _add(report.same_source, {"shard": url, "key": key, "reason": "same_source_sample",
                                  "detail": f"cut from source sample {ident[0]!r} like {first[1]} "
                                            f"in {first[0]}: an input read twice"})


def _check_sidecars(url: str, read: int, damaged: bool, report: ShardReport) -> None:
    """The DALI index and stats beside a shard: present, agreeing with it, recorded failures."""
    problem = None if damaged and not read else _stale_index(url)  # not a tar: said already
    keys = None if problem else index_keys(url)
    if problem:
        report.damaged.append({"shard": url, "reason": "stale_index", "detail": problem})
    elif keys is None:
        report.without_dali_index.append(url)
    elif len(keys) != read and not damaged:
        report.damaged.append({"shard": url, "reason": "index_mismatch",
                               "detail": f"{dali_index_path(url)} lists {len(keys)} samples, the "
                                         f"shard holds {read}"})
    try:
        stats = read_stats(url)
    except (OSError, ValueError) as e:
        report.damaged.append({"shard": url, "reason": "unreadable_stats", "detail": str(e)})
        return
    if stats is None:
        report.without_stats.append(url)
        return
    if stats.get("count") != read and not damaged:
        report.damaged.append({"shard": url, "reason": "stats_mismatch",
                               "detail": f"stats say {stats.get('count')} samples, the shard holds {read}"})
    report._runs.setdefault(stats.get("run") or "unrecorded", []).append(url)
    report.recorded_failures.update(stats.get("failures", {}))
    for r in stats.get("failed_samples", []):  # the key is of the input shard (`source`)
        _add(report.recorded_failed, {**r, "shard": r.get("source") or url, "recorded_in": url})


def _stale_index(url: str) -> str | None:
    """Why the DALI index beside `url` is not this shard's (None when it is, or there is none)."""
    text = read_dali_index(url)
    return stale_index(url, text) if text and text.startswith("v1.") else None


def _judge_schemas(report: ShardReport, expected: str | None) -> None:
    """Samples of another kind than the set's (that of its most common schema, or `expected`);
    versions of one kind (instance /1 and /2) mix freely."""
    if not report.schemas:
        return
    expected = _kind_of(expected or report.schemas.most_common(1)[0][0])
    for schema in report.schemas:
        if _kind_of(schema) == expected:
            continue
        for url, key in report._by_schema.get(schema, []):
            _add(report.broken, {"shard": url, "key": key, "reason": "wrong_schema",
                                 "detail": f"schema {schema}, the set holds {expected} samples"})


def _kind_of(schema: str) -> str:
    return next((kind for kind, s in _KINDS.items() if s == schema), None) or \
        ("instance" if schema in formats.INSTANCE_SCHEMAS else schema)


def _add(items: list, item: dict) -> None:
    if len(items) < _LISTED:
        items.append(item)


def format_report(report: ShardReport, show: int = 10) -> str:
    lines = [f"{report.shards} shards, {report.samples:,} samples"
             + ("" if report.decoded else " (payloads not decoded: --no-decode)")]
    for schema, n in report.schemas.most_common():
        lines.append(f"  schema {schema}: {n:,} samples")
    if report.categories:
        counts = sorted(report.categories.values())
        lines.append(f"  categories: {len(counts)} (objects per category: min {counts[0]}, "
                     f"median {counts[len(counts) // 2]}, max {counts[-1]})")
    for comp, n in sorted(report.component_bytes.items()):
        lines.append(f"  .{comp}: {n / max(report.samples, 1) / 1024:.1f} KiB per sample on average")
    if report.recorded_failures:
        reasons = ", ".join(f"{r} {n}" for r, n in report.recorded_failures.most_common())
        lines.append(f"  failures recorded by the producing stage: {reasons}")
        lines.extend(f"    {r['shard']} {r.get('key') or ''} {r['reason']}: {r.get('detail', '')}"
                     for r in report.recorded_failed[:show])
    problems = [("missing shards", report.missing), ("damaged shards", report.damaged),
                ("broken samples", report.broken), ("duplicate keys", report.duplicates),
                ("source samples held twice", report.same_source),
                ("runs mixed in one shard set (run manifest fingerprints)", report.mixed_runs),
                ("shards without a DALI index", report.without_dali_index),
                ("shards without stats (unfinished or foreign)", report.without_stats)]
    for title, items in problems:
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines.extend(f"    {_one_line(item)}" for item in items[:show])
            if len(items) > show:
                lines.append(f"    ... and {len(items) - show} more (--json lists them)")
    lines.append("  broken: see above" if report.has_problems else "  no broken samples")
    return "\n".join(lines)


def _one_line(item) -> str:
    if isinstance(item, str):
        return item
    where = " ".join(str(item[k]) for k in ("shard", "key") if item.get(k))
    what = item.get("reason", "duplicate")
    lost = f"; lost {', '.join(item['lost_keys'])}" if item.get("lost_keys") else ""
    return f"{where}: {what}" + (f" ({item['detail']}{lost})" if item.get("detail") else "")


# -- a bank, a categories file ------------------------------------------------------------------


def inspect_bank(path: str) -> dict:
    """The bank's counts, its shards checked against the manifest, and its recorded skips."""
    from .bank import BankError, sources
    from .bank.layout import STATS, read_manifest

    manifest = read_manifest(path)
    problems = []
    for entry in manifest["shards"]:
        try:
            sources.check_unchanged(entry, sources.identity(entry["path"]))
        except BankError as e:
            problems.append({"shard": entry["path"], "reason": "shard_changed", "detail": str(e)})
    stats_file = os.path.join(path, STATS)
    stats = json.loads(open(stats_file).read()) if os.path.exists(stats_file) else {}
    skipped = Counter()
    for entry in manifest["shards"]:
        skipped.update(entry.get("skipped", {}))
    problems += _bank_same_sources([e["path"] for e in sources.locate_shards(path, manifest, None)])
    rejects = os.path.join(path, errors.REJECTS_SUFFIX)
    return {"kind": "bank", "path": os.path.abspath(path), "instances": manifest["num_instances"],
            "indexed": manifest["num_indexed"], "categories": manifest["num_categories"],
            "shards": len(manifest["shards"]), "truncated": manifest["truncated"],
            "skipped": dict(skipped), "rejects": rejects if os.path.exists(rejects) else None,
            "instances_per_category": stats.get("instances_per_category", {}),
            "problems": problems, "ok": not problems}


def _bank_same_sources(shard_urls: list[str]) -> list[dict]:
    """Instances of a bank's shards cut from one source sample twice (reads the JSON only,
    through each shard's DALI index where it describes the shard: 10M instances ~0.13 -> ~0.03
    ms each; the shards' damage is `index`'s and the shard checks' to report)."""
    report = ShardReport()
    for url in shard_urls:
        if not urls.exists(url):
            continue
        for sample in iter_indexed(url) or iter_tar(url, []):
            try:
                meta = json.loads(sample.get("json", b""))
            except (ValueError, UnicodeDecodeError):
                continue  # damage is reported by the shard checks
            if isinstance(meta, dict):
                _note_source(meta, url, sample["__key__"], report)
    return report.same_source


def plot_path(bank: str) -> str:
    """Where `inspect --plot` writes a bank's histogram: beside the bank, never into it (the
    bank folder holds the index only)."""
    return f"{os.path.normpath(bank)}-{HISTOGRAM_PNG}"


def plot_bank_histogram(bank: str) -> str | None:
    """The instances-per-category histogram as PNG beside the bank; None for an empty bank."""
    from .bank import InstanceBank
    from .bank.describe import plot_histogram

    counts = InstanceBank.open(bank).category_counts()
    return plot_histogram(counts, plot_path(bank)) if len(counts) else None


def inspect_categories(path: str) -> dict:
    """A categories file: its schema, and every category's fields present and consistent."""
    doc = formats.read_categories(path)
    problems = []
    for c in doc.get("categories", []):
        missing = [k for k in ("id", "name", "image_count", "instance_count", "scale_mean",
                               "scale_std", "repeat_factor") if k not in c]
        if missing:
            problems.append({"key": str(c.get("id")), "reason": "missing_field", "detail": f"no {missing}"})
        elif c["instance_count"] and (c["scale_mean"] is None or c["scale_std"] is None):
            problems.append({"key": str(c["id"]), "reason": "missing_scale",
                             "detail": f"{c['instance_count']} instances but no measured scale"})
    return {"kind": "categories", "path": path, "dataset": doc.get("dataset"),
            "num_images": doc.get("num_images"), "categories": len(doc.get("categories", [])),
            "problems": problems, "ok": not problems}


# -- the command --------------------------------------------------------------------------------


def register(sub) -> None:
    p = sub.add_parser("inspect", help="check shards, a bank or a categories file: counts, problems")
    p.add_argument("paths", nargs="+", help="shards (brace patterns, globs), one bank folder, or "
                                            "one categories.json")
    p.add_argument("--categories", help="categories.json, for a bank's frequency groups")
    p.add_argument("--plot", action="store_true",
                   help="bank: also write a histogram PNG beside the bank (BANK-"
                        f"{HISTOGRAM_PNG})")
    p.add_argument("--kind", choices=sorted(_KINDS), help="the kind of shard set expected "
                                                          "(default: its most common schema)")
    p.add_argument("--no-decode", action="store_true", help="do not decode payloads (faster)")
    p.add_argument("--show", type=int, default=10, help="problems named per list on the console")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    single = args.paths[0] if len(args.paths) == 1 else None
    if single and os.path.isdir(single):
        report = inspect_bank(single)
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            from .bank import describe_bank

            print(describe_bank(single, category_meta=args.categories))
            if args.plot:
                out = plot_bank_histogram(single)
                print(f"histogram written to {out}" if out else "no histogram: the bank is empty")
            print(_format_problems(report, args.show))
        return errors.EXIT_OK if report["ok"] else errors.EXIT_FAILED
    if single and single.endswith(".json"):
        report = inspect_categories(single)
        print(json.dumps(report, indent=1) if args.json else
              f"categories {single}: {report['categories']} categories over {report['num_images']} "
              f"images ({report['dataset']})\n" + _format_problems(report, args.show))
        return errors.EXIT_OK if report["ok"] else errors.EXIT_FAILED
    report = inspect_shards(_expand(args.paths), args.kind, decode=not args.no_decode)
    print(json.dumps(report.as_dict(), indent=1) if args.json else format_report(report, args.show))
    return errors.EXIT_FAILED if report.has_problems else errors.EXIT_OK


def _expand(patterns: list[str]) -> list[str]:
    """Every name the patterns give; a glob that matches nothing is an error (exit status 2),
    a plain name that does not exist is reported missing."""
    found = []
    for pattern in patterns:
        matched = urls.expand(pattern)
        if not matched:
            raise ConfigError(f"{pattern!r} matches no files")
        found += matched
    return list(dict.fromkeys(found))


def _format_problems(report: dict, show: int) -> str:
    lines = []
    if report.get("skipped"):
        lines.append("  skipped when indexed: " + ", ".join(f"{r} {n}" for r, n in report["skipped"].items())
                     + (f" (list: {report['rejects']})" if report.get("rejects") else ""))
    for p in report["problems"][:show]:
        lines.append(f"  {_one_line(p)}")
    if len(report["problems"]) > show:
        lines.append(f"  ... and {len(report['problems']) - show} more (--json lists them)")
    lines.append(f"  problems: {len(report['problems'])}" if report["problems"] else "  no problems")
    return "\n".join(lines)
