"""Cleaning preprocessors, switched on per source; each counts the records it changed or removed.

Per record (in this order): Unicode normalisation, control-character removal, whitespace cleanup, length
filters. Across the sources of a stage (``data.dedup_across_sources``): exact deduplication, then
near-duplicate removal by MinHash LSH over character shingles, verified with the exact Jaccard similarity so
only true near-duplicates go. The first occurrence (in source order, then record order) is kept.
"""

from __future__ import annotations

import collections
import re
import unicodedata
import zlib

import numpy as np

_KEEP_CONTROL = {"\t", "\n"}
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _map_strings(rec: dict, fn) -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, str):
            out[k] = fn(v)
        elif isinstance(v, list):
            out[k] = [fn(x) if isinstance(x, str) else x for x in v]
        else:
            out[k] = v
    return out


def strip_control(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch for ch in text if ch in _KEEP_CONTROL or unicodedata.category(ch) not in ("Cc", "Cs"))


def clean_whitespace(text: str) -> str:
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def record_text(rec: dict) -> str:
    """All the text of a record, in a fixed field order (what length filters and dedup look at)."""
    parts = [rec[k] for k in ("text", "prompt", "response") if k in rec]
    parts += rec.get("responses", [])
    return "\x1f".join(parts)


def clean_records(records: list[dict], opts, counts: collections.Counter) -> list[dict]:
    """The per-record cleaning steps switched on in ``opts`` (a source's ``clean`` section)."""
    steps = []
    if opts.unicode:
        steps.append(("unicode_normalised", lambda s: unicodedata.normalize(opts.unicode, s)))
    if opts.control_chars:
        steps.append(("control_chars_removed", strip_control))
    if opts.whitespace:
        steps.append(("whitespace_cleaned", clean_whitespace))
    for reason, fn in steps:
        new = []
        for rec in records:
            out = _map_strings(rec, fn)
            counts[reason] += out != rec
            new.append(out)
        records = new
    if opts.min_chars or opts.max_chars:
        kept = []
        for rec in records:
            n = len(record_text(rec))
            if opts.min_chars and n < opts.min_chars:
                counts["dropped_shorter_than_min_chars"] += 1
            elif opts.max_chars and n > opts.max_chars:
                counts["dropped_longer_than_max_chars"] += 1
            else:
                kept.append(rec)
        records = kept
    empty = [r for r in records if not any(record_text(r).split("\x1f"))]
    if empty:
        counts["dropped_empty"] += len(empty)
        records = [r for r in records if any(record_text(r).split("\x1f"))]
    return records


# ----------------------------------------------------------------------------------------------------
# MinHash

_PRIME = (1 << 31) - 1


def shingles(text: str, n: int) -> set[str]:
    text = " ".join(text.lower().split())
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


def minhash(sh: set[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[num_perm] MinHash signature: min over shingles of (a * crc32(shingle) + b) mod p."""
    x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in sh), np.uint64, len(sh)) % _PRIME
    return ((a[:, None] * x[None, :] + b[:, None]) % _PRIME).min(axis=1)


def jaccard(x: set, y: set) -> float:
    return len(x & y) / max(1, len(x | y))


def deduplicate(per_source: dict[str, list[dict]], opts: dict, data_cfg, counts) -> None:
    """Exact and near-duplicate removal in place, over all sources that switch it on (or each alone)."""
    groups = [list(per_source)] if data_cfg.dedup_across_sources else [[n] for n in per_source]
    nd = data_cfg.near_dup
    if nd.num_perm % nd.bands:
        raise ValueError(f"data.near_dup.num_perm={nd.num_perm} must be a multiple of bands={nd.bands}")
    rng = np.random.default_rng(1234)  # fixed: the same signatures on every host and run
    a = rng.integers(1, _PRIME, nd.num_perm, dtype=np.uint64)
    b = rng.integers(0, _PRIME, nd.num_perm, dtype=np.uint64)
    rows = nd.num_perm // nd.bands
    for group in groups:
        seen: set[str] = set()
        buckets: dict[tuple, list[set]] = collections.defaultdict(list)
        for name in group:
            o = opts[name]
            if not (o.dedup or o.near_dup):
                continue
            kept = []
            for rec in per_source[name]:
                text = record_text(rec)
                if o.dedup:
                    if text in seen:
                        counts[name]["dedup_exact_removed"] += 1
                        continue
                    seen.add(text)
                if o.near_dup:
                    sh = shingles(text, nd.ngram)
                    sig = minhash(sh, a, b)
                    keys = [(i, sig[i * rows : (i + 1) * rows].tobytes()) for i in range(nd.bands)]
                    if any(jaccard(sh, other) >= nd.threshold for k in keys for other in buckets.get(k, ())):
                        counts[name]["dedup_near_removed"] += 1
                        continue
                    for k in keys:
                        buckets[k].append(sh)
                kept.append(rec)
            per_source[name] = kept
