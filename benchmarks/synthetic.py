"""Synthetic instance shards for the benchmarks: millions of instances in seconds, in the
current format.

Each sample's components and JSON come from `formats.instance_sample` (so a schema change, such
as `mask.png` -> `mask.lz4`, reaches the benchmarks by itself); only the tar framing is written
here, as plain ustar (what `ShardWriter` produces), because building a million samples through
tarfile takes minutes. `check_instance_shard` reads a shard back through the project's readers.
A few distinct tiny instances are repeated with distinct keys and categories.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np

from xpaste_stream import formats, shards

TAR_BLOCK = 512


def _header_template() -> bytearray:
    h = bytearray(TAR_BLOCK)
    h[100:108] = b"0000444\0"          # mode
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[136:148] = b"00000000000\0"       # mtime
    h[156:157] = b"0"                   # regular file
    h[257:265] = b"ustar\x0000"
    return h


_TEMPLATE = _header_template()


def ustar_member(name: bytes, data: bytes) -> bytes:
    """Header + data + padding of one tar member, as tarfile writes it in USTAR format."""
    h = bytearray(_TEMPLATE)
    h[0:len(name)] = name
    h[124:136] = b"%011o\0" % len(data)
    h[148:156] = b"        "
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + data + bytes(-len(data) % TAR_BLOCK)


def instance_templates(count: int = 4, side: int = 8, quality: int = 50) -> list[tuple[dict, dict]]:
    """`count` distinct tiny instances as (payload components without json, json fields)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        alpha = np.where(rng.random((side, side)) < 0.8, 255, 0).astype(np.uint8)
        s = formats.instance_sample("x", rng.integers(0, 256, (side, side, 3), np.uint8), alpha,
                                    category_id=0, category="x", clip_score=30.0, source_key="x",
                                    generator="bench", segmenter="bench", jpeg_quality=quality)
        meta = json.loads(s["json"])
        out.append(({k: v for k, v in s.items() if k not in ("__key__", "json")}, meta))
    return out


def write_instance_shard(task: tuple[str, int, np.ndarray]) -> str:
    """Write one shard: instance `first + i` has key b{first+i:09d} and category categories[i]."""
    path, first, categories = task
    templates = instance_templates()
    parts, lines, at = [], [], 0
    for i, c in enumerate(categories.tolist(), start=first):
        key = b"b%09d" % i
        payloads, meta = templates[i % len(templates)]
        meta = {**meta, "category_id": c, "category": f"cat{c}", "source_key": key.decode()}
        entries = []
        for component, data in [*payloads.items(), ("json", formats.json_bytes(meta))]:
            name = key + b"." + component.encode()
            parts.append(ustar_member(name, data))
            entries.append(f"{component} {at + TAR_BLOCK} {len(data)} {name.decode()}")
            at += len(parts[-1])
        lines.append(" ".join(entries))
    parts.append(bytes(2 * TAR_BLOCK))  # end-of-archive marker
    tmp = path + ".tmp"        # the DALI index beside it, as the project's writer makes one
    with open(tmp, "w") as f:
        f.write(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    os.replace(tmp, shards.dali_index_path(path))
    with open(tmp, "wb") as f:
        f.write(b"".join(parts))
    os.replace(tmp, path)
    return path


def write_instance_shards(folder: str, categories: np.ndarray, per_shard: int, workers: int,
                          first_shard: int = 0, first_instance: int = 0) -> list[str]:
    """Shards inst-NNNNNN.tar of `per_shard` instances, instance i of category categories[i]."""
    os.makedirs(folder, exist_ok=True)
    tasks = [(os.path.join(folder, f"inst-{first_shard + k:06d}.tar"), first_instance + start,
              categories[start:start + per_shard])
             for k, start in enumerate(range(0, len(categories), per_shard))]
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            paths = pool.map(write_instance_shard, tasks, chunksize=8)
    else:
        paths = [write_instance_shard(t) for t in tasks]
    check_instance_shard(paths[0], tasks[0][2])
    return paths


def check_instance_shard(path: str, categories: np.ndarray) -> None:
    """The synthetic shard reads back as valid instance samples through the project's reader."""
    samples = list(shards.iter_tar(path))
    if list(shards.iter_indexed(path) or []) != samples:
        raise AssertionError(f"{path}: its DALI index does not read back the samples of the tar")
    if len(samples) != len(categories):
        raise AssertionError(f"{path}: {len(samples)} samples read back, {len(categories)} written")
    for sample, c in zip(samples, categories, strict=True):
        meta = formats.read_instance_meta(sample)
        if meta["category_id"] != c or set(sample) != {"__key__", "__url__", "json",
                                                       *formats.INSTANCE_COMPONENTS}:
            raise AssertionError(f"{path}: {sample['__key__']} reads back as {sorted(sample)}, "
                                 f"category {meta['category_id']} (wrote {c})")
        component, data = formats.instance_mask(sample)
        formats.decode_alpha(data, component, meta["width"], meta["height"])


def longtail_categories(n: int, num_categories: int, seed: int = 1, exponent: float = 0.9) -> np.ndarray:
    """n category ids in 1..num_categories, Zipf-like (long-tailed like LVIS)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_categories + 1) ** exponent
    return rng.choice(np.arange(1, num_categories + 1), size=n, p=weights / weights.sum())


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown cpu"
