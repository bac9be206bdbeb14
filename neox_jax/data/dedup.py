"""Duplicate documents: exact (hash of normalized text) and near (MinHash over word n-grams + LSH).

Normalization: Unicode NFKC, lower case, whitespace runs collapsed, so copies that differ only in
spacing or case count as exact duplicates. Near duplicates: the estimated Jaccard similarity of the
documents' word n-gram sets is at least `threshold` with some earlier document; candidates come from
banded LSH over the MinHash signatures and are checked on the full signature.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import unicodedata
import zlib
from typing import Iterable, Sequence

import numpy as np

from neox_jax import errors, table
from neox_jax.data.documents import iter_documents

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_NGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd constant: the n-gram hash is a base-M polynomial


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def text_key(text: str) -> bytes:
    """Identity of a document for exact deduplication."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, ngram: int = 5) -> np.ndarray:
    """uint64 hashes of the document's word n-grams (the whole text if it has fewer words), deduplicated."""
    words = normalize(text).split()
    wh = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), np.uint64, len(words))
    if len(wh) == 0:
        return np.zeros(1, np.uint64)
    n = min(ngram, len(wh))
    h = np.zeros(len(wh) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _NGRAM_MULT + wh[k:len(wh) - n + 1 + k] + np.uint64(1)
    return np.unique(h)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijection on uint64 that scrambles all bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class MinHasher:
    """`num_perm` hash functions h_i(x) = mix(x xor s_i); signature = their minima over the n-grams."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        self.seeds = np.random.default_rng(seed).integers(0, 2**63, num_perm, dtype=np.uint64)

    def signature(self, shingle_hashes: np.ndarray, block: int = 2048) -> np.ndarray:
        sig = np.full(len(self.seeds), _MASK, np.uint64)
        for i in range(0, len(shingle_hashes), block):
            part = shingle_hashes[i:i + block, None] ^ self.seeds[None, :]
            np.minimum(sig, _mix(part).min(axis=0), out=sig)
        return sig


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


@dataclasses.dataclass
class ComponentStats:
    docs: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0  # includes exact duplicates

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["exact_rate"] = self.exact_duplicates / max(self.docs, 1)
        d["near_rate"] = self.near_duplicates / max(self.docs, 1)
        return d


def find_duplicates(texts: Iterable[str], ngram: int = 5, num_perm: int = 128, bands: int = 16,
                    threshold: float = 0.8, max_candidates: int = 64) -> Iterable[tuple[bool, bool]]:
    """For each text in order: (is an exact duplicate of an earlier one, is a near duplicate of one)."""
    if num_perm % bands:
        raise errors.InputError(f"num_perm={num_perm} must be a multiple of bands={bands}")
    hasher = MinHasher(num_perm)
    rows = num_perm // bands
    exact_seen: set[bytes] = set()
    buckets: dict[tuple[int, bytes], list[int]] = collections.defaultdict(list)
    signatures: list[np.ndarray] = []
    for text in texts:
        key = text_key(text)
        exact = key in exact_seen
        exact_seen.add(key)
        sig = hasher.signature(shingles(text, ngram))
        doc = len(signatures)
        signatures.append(sig)
        near, checked = exact, set()
        for b in range(bands):
            bucket = buckets[(b, sig[b * rows:(b + 1) * rows].tobytes())]
            for other in bucket[:max_candidates]:
                if near:
                    break
                if other not in checked:
                    checked.add(other)
                    near = estimated_jaccard(sig, signatures[other]) >= threshold
            bucket.append(doc)
        yield exact, near


def dedup_report(inputs: str | Sequence[str], *, ngram: int = 5, num_perm: int = 128, bands: int = 16,
                 threshold: float = 0.8, skip_bad: bool = False) -> dict:
    """Per pile_set_name: documents, exact and near duplicates (of any earlier document) and their rates."""
    docs = list(iter_documents(inputs, skip_bad=skip_bad))
    stats: dict[str, ComponentStats] = collections.defaultdict(ComponentStats)
    total = ComponentStats()
    flags = find_duplicates((d.text for d in docs), ngram, num_perm, bands, threshold)
    for d, (exact, near) in zip(docs, flags):
        for s in (stats[d.component], total):
            s.docs += 1
            s.exact_duplicates += exact
            s.near_duplicates += near
    return {"components": {k: v.as_dict() for k, v in sorted(stats.items())}, "total": total.as_dict(),
            "settings": dict(ngram=ngram, num_perm=num_perm, bands=bands, threshold=threshold)}


_COLUMNS = (table.Column("pile_set_name", "name", align="<", width=24), table.Column("docs", "docs", width=7),
            table.Column("exact dup", "exact_duplicates", width=10), table.Column("rate", "exact_rate", ".2%", width=7),
            table.Column("near dup", "near_duplicates", width=9), table.Column("rate", "near_rate", ".2%", width=7))


def format_report(report: dict) -> str:
    s = report["settings"]
    rows = [{"name": name, **c} for name, c in [*report["components"].items(), ("TOTAL", report["total"])]]
    return (f"near duplicates: estimated Jaccard >= {s['threshold']} over word {s['ngram']}-grams "
            f"(MinHash, {s['num_perm']} hashes, {s['bands']} LSH bands); near includes exact\n"
            + table.render(_COLUMNS, rows))
