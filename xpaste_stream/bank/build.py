"""Build or update an instance bank from instance shards.

1. Identify every shard (path, size, mtime). Shards the previous bank in `out_dir` indexed with
   the same identity are reused from its columns; only new or changed shards are read.
2. Read those shards with `scan_shard`, one work unit per shard, on any executor (executors.py:
   this process, local processes, Ray); the rest runs once, here.
3. With `min_clip`, drop the X-Paste CLIP filter's rejects: a scored instance is kept when its
   score >= min(min_clip, best score of its category - 1), a global bar relaxed per category so
   no category is emptied. The bar needs every score of a category, hence here and not in
   extract. Instances without a score are kept (and counted).
4. With dedup, mark instances whose image hash equals an earlier kept one of the same category
   ("earlier" = shard order given, then file order).
   Both rules are recomputed over all rows on every build, so a rebuild from scratch and an
   incremental update keep exactly the same instances.
5. Sort rows by (dropped, category, shard, offset): the kept instances of a category form one
   contiguous id range (O(1) draws, reads in file order); dropped rows (filtered or duplicate)
   follow all kept instances, readable but never drawn, and still indexed so an update with
   another bar needs no re-read.
6. Remove the old manifest, write the columns, then the new manifest, then stats.json: a build
   interrupted while writing leaves a folder that is not a bank, never a manifest describing
   columns it does not match.

The bank indexes exactly the shards given: a shard of the previous bank not given is dropped.
Damaged samples are skipped, never fatal (tarscan.py): counted per shard in the manifest and
stats.json, and listed whole in `rejects.jsonl` (errors.py); each build rewrites that list, keeping
the records of reused shards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .. import errors, urls
from ..config import check
from ..executors import ExecutorConfig, PlainJob, for_stage, run_units, start_ray
from ..formats import INSTANCE_SCHEMAS
from ..remote import check_location
from ..shards import resolve_inputs
from . import sources
from .layout import (
    BANK_SCHEMA,
    CATEGORY_FILES,
    COLUMNS,
    HASH_COLUMN,
    MANIFEST,
    STATS,
    BankError,
    bank_bytes,
    column_path,
    read_manifest,
    write_array,
    write_json,
)
from .tarscan import ROW_DTYPE, ShardScan, scan_shard

DEDUP_METHOD = "dhash64-exact-per-category"


def build_index(shards: list[str], out_dir: str, workers: int | None = None, dedup: bool = False,
                progress: bool = True, min_clip: float | None = None,
                executor: ExecutorConfig | None = None) -> dict:
    """Index instance shards into the bank folder `out_dir`; return a summary dict.

    The shards to read are work units on `executor` (default: local, `workers` or 1 worker):
    the bank is the same whichever runs them.

    Rerunning with more shards reads only the new ones. A truncated shard is indexed up to its
    last whole sample and listed under "truncated"; a damaged sample is skipped and listed in
    `rejects.jsonl`; a missing shard, or one that is not an instance shard, raises before work.
    """
    started = time.time()
    executor = for_stage(executor, workers)
    check(executor, "index")
    paths = list(dict.fromkeys(sources.normalise(s) for s in shards))
    if not paths:
        raise BankError("no shards to index")
    for path in paths[:1]:  # a missing bucket or credentials: one clear error before work
        check_location(path, "input shard")
    identities = [sources.identity(p) for p in paths]
    previous = _previous_rows(out_dir, need_hashes=dedup)
    reused = {i: previous[ident["path"]] for i, ident in enumerate(identities)
              if ident["path"] in previous and sources.same_identity(previous[ident["path"]][0], ident)}
    to_read = [i for i in range(len(paths)) if i not in reused]
    if to_read:
        resolve_inputs([paths[i] for i in to_read], schema=INSTANCE_SCHEMAS, stage="index")
        if executor.executor == "ray":
            start_ray(executor.ray_address)
    scans = _scan_all([paths[i] for i in to_read], executor, dedup, progress)
    kept_rejects = _previous_rejects(out_dir, {paths[i] for i in reused})

    table, per_shard, rejects = [], [], []
    for i, ident in enumerate(identities):
        if i in reused:
            entry, rows = reused[i]
            truncated, skipped = entry["truncated"], entry.get("skipped", {})
            rejects += kept_rejects.get(paths[i], [])
        else:
            scan = scans[paths[i]]
            rows = scan.rows
            truncated = None if scan.truncated is None else {"error": scan.truncated,
                                                             "samples": len(rows)}
            skipped = _count(r.reason for r in scan.skipped)
            if truncated:
                rejects.append(errors.Reject("shard", paths[i], None, "truncated_shard", scan.truncated))
            rejects += scan.skipped
        table.append({**ident, "instances": len(rows), "truncated": truncated, "skipped": skipped,
                      **({} if urls.is_remote(ident["path"]) else
                         {"bank_relpath": os.path.relpath(ident["path"], os.path.abspath(out_dir))})})
        per_shard.append(rows)

    rows, shard = _concat(per_shard)
    low_clip = _below_clip_bar(rows, min_clip) if min_clip is not None else np.zeros(len(rows), bool)
    duplicate = np.zeros(len(rows), bool)
    if dedup:
        duplicate[~low_clip] = _find_duplicates(rows[~low_clip], shard[~low_clip])
    dropped = low_clip | duplicate
    order = np.lexsort((rows["jpg_block"], shard, rows["category"], dropped))
    num_kept = int(len(rows) - dropped.sum())
    clip_filter = {"min_clip": None if min_clip is None else float(min_clip), "dropped": int(low_clip.sum()),
                   "unscored_kept": int(np.isnan(rows["clip_score"]).sum())}
    os.makedirs(out_dir, exist_ok=True)
    _remove(os.path.join(out_dir, MANIFEST))  # an interrupted write then leaves no stale manifest
    categories, starts = _write_columns(out_dir, rows[order], shard[order], num_kept, dedup)
    rejects_list = errors.RejectsList(os.path.join(out_dir, errors.REJECTS_SUFFIX))
    for r in rejects:
        rejects_list.add(r)
    rejects_path = rejects_list.close()
    manifest = _manifest(table, len(rows), num_kept, len(categories), dedup, int(duplicate.sum()),
                         clip_filter)
    write_json(os.path.join(out_dir, MANIFEST), manifest)

    failures = _count(r.reason for r in rejects if r.what == "sample")
    summary = {"bank": os.path.abspath(out_dir), "instances": num_kept, "indexed": len(rows),
               "duplicates_dropped": int(duplicate.sum()), "clip_filter": clip_filter,
               "categories": len(categories),
               "shards": len(table), "shards_read": [paths[i] for i in to_read],
               "shards_reused": len(reused),
               "truncated": [{"shard": e["path"], **e["truncated"]} for e in table if e["truncated"]],
               "failed": sum(failures.values()), "failures": failures, "rejects": rejects_path,
               "seconds": round(time.time() - started, 3)}
    per_category = dict(zip(categories.tolist(), np.diff(starts).tolist(), strict=True))
    stats = {**summary, "shards_read": len(to_read), "instances_per_category": per_category}
    write_json(os.path.join(out_dir, STATS), stats)
    summary["bytes_per_instance"] = round(bank_bytes(out_dir) / max(1, len(rows)), 2)
    errors.record(errors.StageOutcome(
        "index", len(rows), summary["failed"], failures, bad_shards=len(summary["truncated"]),
        first=rejects[:100], rejects_path=rejects_path))
    return summary


def _count(reasons) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _previous_rejects(out_dir: str, paths: set[str]) -> dict[str, list[errors.Reject]]:
    """The rejects a previous build recorded for the shards it is reused for, by shard."""
    kept: dict[str, list[errors.Reject]] = {}
    for record in errors.read_rejects(os.path.join(out_dir, errors.REJECTS_SUFFIX)):
        if record.get("source") in paths:
            kept.setdefault(record["source"], []).append(errors.Reject(**record))
    return kept


def _previous_rows(out_dir: str, need_hashes: bool) -> dict[str, tuple[dict, np.ndarray]]:
    """Rows of each shard of an existing bank, in file order, keyed by shard path."""
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
        return {}
    manifest = read_manifest(out_dir)
    has_hashes = manifest["dedup"]["enabled"]
    if need_hashes and not has_hashes:
        return {}
    columns = {name: np.load(column_path(out_dir, name)) for name in COLUMNS}
    if any(len(c) != manifest["num_indexed"] for c in columns.values()):
        return {}  # columns that do not match the manifest: read everything again
    shard = columns.pop("shard")
    rows = np.zeros(len(shard), ROW_DTYPE)
    for name, values in columns.items():
        rows[name] = values
    if has_hashes:
        rows["dhash"] = np.load(column_path(out_dir, HASH_COLUMN))
    order = np.lexsort((rows["jpg_block"], shard))
    bounds = np.searchsorted(shard[order], np.arange(len(manifest["shards"]) + 1))
    return {entry["path"]: (entry, rows[order[bounds[j]:bounds[j + 1]]])
            for j, entry in enumerate(manifest["shards"])}


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


@dataclass
class ScanJob(PlainJob):
    """Reading instance shards as work units, one input shard each (picklable: sent to
    processes and actors); the merge, sort and write of the columns stay in the driver."""

    dedup: bool

    def run(self, context, path: str) -> ShardScan:
        return scan_shard(path, hash_images=self.dedup)


def _scan_all(paths: list[str], executor: ExecutorConfig, dedup: bool,
              progress: bool) -> dict[str, ShardScan]:
    scans = run_units(ScanJob(dedup), paths, executor, stage="index", progress=progress,
                      desc="index shards", unit_name="shard")
    return dict(zip(paths, scans, strict=True))


def _concat(per_shard: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate(per_shard) if per_shard else np.zeros(0, ROW_DTYPE)
    shard = np.repeat(np.arange(len(per_shard), dtype=np.uint32), [len(r) for r in per_shard])
    return rows, shard


def _below_clip_bar(rows: np.ndarray, min_clip: float) -> np.ndarray:
    """True for a scored instance under min(min_clip, best score of its category - 1)."""
    score = rows["clip_score"].astype(np.float32)
    scored = ~np.isnan(score)
    categories, inverse = np.unique(rows["category"], return_inverse=True)
    best = np.full(len(categories), -np.inf, np.float32)
    np.maximum.at(best, inverse[scored], score[scored])
    bar = np.minimum(np.float32(min_clip), best - 1)[inverse]
    return scored & (score < bar)


def _find_duplicates(rows: np.ndarray, shard: np.ndarray) -> np.ndarray:
    """True for an instance whose hash equals that of an earlier instance of its category."""
    position = np.empty(len(rows), np.int64)
    position[np.lexsort((rows["jpg_block"], shard))] = np.arange(len(rows))
    order = np.lexsort((position, rows["dhash"], rows["category"]))
    cat, dhash = rows["category"][order], rows["dhash"][order]
    repeats = np.zeros(len(rows), bool)
    repeats[1:] = (cat[1:] == cat[:-1]) & (dhash[1:] == dhash[:-1])
    duplicate = np.zeros(len(rows), bool)
    duplicate[order[repeats]] = True
    return duplicate


def _write_columns(out_dir: str, rows: np.ndarray, shard: np.ndarray, num_kept: int,
                   dedup: bool) -> tuple[np.ndarray, np.ndarray]:
    write_array(column_path(out_dir, "shard"), shard)
    for name, dtype in COLUMNS.items():
        if name != "shard":
            write_array(column_path(out_dir, name), rows[name].astype(dtype))
    if dedup:
        write_array(column_path(out_dir, HASH_COLUMN), rows["dhash"])
    else:
        _remove(column_path(out_dir, HASH_COLUMN))
    kept_categories = rows["category"][:num_kept]
    categories, first = np.unique(kept_categories, return_index=True)
    starts = np.append(first, num_kept).astype(np.int64)
    write_array(column_path(out_dir, CATEGORY_FILES[0]), categories.astype(np.int32))
    write_array(column_path(out_dir, CATEGORY_FILES[1]), starts)
    return categories, starts


def _manifest(table: list[dict], num_indexed: int, num_kept: int, num_categories: int,
              dedup: bool, num_duplicates: int, clip_filter: dict) -> dict:
    columns = {name: np.dtype(dtype).name for name, dtype in COLUMNS.items()}
    if dedup:
        columns[HASH_COLUMN] = "uint64"
    return {"schema": BANK_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "num_instances": num_kept, "num_indexed": num_indexed,
            "num_duplicates": num_duplicates, "num_categories": num_categories,
            "dedup": {"enabled": dedup, "method": DEDUP_METHOD if dedup else None,
                      "dropped": num_duplicates},
            "clip_filter": clip_filter,
            "block_size": 512, "columns": columns, "shards": table,
            "shard_root": sources.common_folder([e["path"] for e in table]) if table else None,
            "truncated": [e["path"] for e in table if e["truncated"]]}
