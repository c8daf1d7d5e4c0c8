"""Text normalisation and hashing for duplicate detection.

Two texts are "the same" when they are equal after Unicode NFKC (full-width
letters, ligatures, non-breaking spaces fold to their plain forms), case
folding (ß == ss, not just lower()) and collapsing every run of whitespace to
one space with the ends stripped. The SHA-256 of that normal form is the row's
duplicate key. The stored text is never changed: normalisation only decides
what counts as a duplicate.
"""
from __future__ import annotations

import hashlib
import unicodedata
from typing import Iterable, Sequence

import numpy as np


def _normalise_unicode(text: str) -> str:
    # Casefolding can leave a string that is no longer NFKC (e.g. 'ǰ' -> 'ǰ'), hence
    # NFKC(casefold(NFKC(x))) as in Unicode's NFKC_Casefold. str.split() with no argument
    # splits on every Unicode whitespace run and drops the ends.
    nfkc = unicodedata.normalize
    composed = nfkc("NFKC", text)
    folded = composed.casefold()
    if folded != composed:
        folded = nfkc("NFKC", folded)
    return " ".join(folded.split())


def normalise(text: str) -> str:
    # ASCII is already NFKC and its casefold is lower(): skip the Unicode tables for it.
    if text.isascii():
        return " ".join(text.lower().split())
    return _normalise_unicode(text)


def normalise_all(texts: Iterable[str]) -> list[str]:
    # normalise() inlined: over a million rows the per-row call costs as much as the work.
    uni = _normalise_unicode
    return [" ".join(t.lower().split()) if t.isascii() else uni(t) for t in texts]


def sha256_all(norm: Iterable[str]) -> list[bytes]:
    """Raw 32-byte SHA-256 digests: the duplicate keys (hex would double their size)."""
    sha = hashlib.sha256
    return [sha(t.encode("utf-8", "surrogatepass")).digest() for t in norm]


def shingles(norm: str, size: int) -> set[bytes]:
    """Word n-grams of a normalised text; a text shorter than `size` words is one shingle."""
    words = norm.split(" ")
    if len(words) <= size:
        return {norm.encode("utf-8", "surrogatepass")}
    return {" ".join(words[i:i + size]).encode("utf-8", "surrogatepass") for i in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _minhash_template(num_perm: int, seed: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed)


def minhash_signatures(shingle_sets: Sequence[set[bytes]], num_perm: int, seed: int,
                       chunk: int = 1 << 16) -> np.ndarray:
    """(rows, num_perm) uint32 MinHash signatures, equal to datasketch's MinHash.update_batch
    (affine32 scheme: SHA-1 -> fmix -> a*h + b mod 2^32, min), computed for all rows at once.

    datasketch builds one sketch per Python call (~0.5 ms a row); here every shingle is
    hashed once and permuted in numpy, `chunk` shingles at a time to bound memory.
    """
    from datasketch.minhash import _fmix  # the exact pre-mix datasketch applies

    a, b = _minhash_template(num_perm, seed).permutations
    n = len(shingle_sets)
    counts = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=n)
    if n and counts.min() == 0:
        raise ValueError("every row needs at least one shingle")
    sha1 = hashlib.sha1
    hv = np.frombuffer(b"".join(sha1(x).digest()[:4] for s in shingle_sets for x in s), dtype="<u4")
    hv = _fmix(hv.astype(np.uint32), 32)
    ends = np.cumsum(counts)
    starts = ends - counts
    sig = np.empty((n, num_perm), dtype=np.uint32)
    row = 0
    while row < n:
        stop = max(int(np.searchsorted(ends, starts[row] + chunk, side="right")), row + 1)
        seg = hv[starts[row]:ends[stop - 1], None]
        phv = seg * a[None, :] + b[None, :]  # uint32 arithmetic wraps: mod 2^32, as datasketch
        sig[row:stop] = np.minimum.reduceat(phv, starts[row:stop] - starts[row], axis=0)
        row = stop
    return sig


def minhashes(signatures: np.ndarray, num_perm: int, seed: int) -> list:
    """datasketch MinHash objects over precomputed signatures (what MinHashLSH indexes)."""
    template = _minhash_template(num_perm, seed)
    out = []
    for sig in signatures:
        m = template.copy()
        m.hashvalues = sig
        out.append(m)
    return out


def digest_keys(norm: Sequence[str]) -> np.ndarray:
    """(rows, 2) uint64: the first 128 bits of each normal form's SHA-256 (sha256_all), the compact
    duplicate key a streaming dedupe keeps per row (16 bytes instead of a 65-byte bytes object)."""
    sha = hashlib.sha256
    raw = b"".join([sha(t.encode("utf-8", "surrogatepass")).digest()[:16] for t in norm])
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)


def key_codes(keys: np.ndarray) -> np.ndarray:
    """Dense int64 codes for (rows, 2) uint64 keys: equal codes <=> equal 128-bit keys.

    Factorised on the first 64 bits (a hash table over integers); a code whose rows differ in
    the second 64 bits (a 64-bit collision, ~3e-6 at 10M rows) makes it factorise the pairs.
    """
    import pandas as pd

    codes, uniques = pd.factorize(keys[:, 0])
    rep = np.zeros(len(uniques), dtype=np.uint64)
    rep[codes] = keys[:, 1]
    if (rep[codes] != keys[:, 1]).any():
        codes = pd.MultiIndex.from_arrays([keys[:, 0], keys[:, 1]]).factorize()[0]
    return codes.astype(np.int64, copy=False)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint32: a 32-bit hash of each LSH band (`rows` consecutive signature values, bands laid
    out as datasketch's MinHashLSH lays them). Rows with equal bands get equal hashes; unequal bands
    collide with p ~ 2^-32, which only adds a candidate pair (every pair is checked by exact Jaccard)."""
    n = len(signatures)
    s = signatures[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.full((n, bands), 0x9E3779B97F4A7C15, dtype=np.uint64)
    for k in range(rows):  # murmur3's 64-bit finaliser over the running state
        h ^= s[:, :, k]
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(32)).astype(np.uint32)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """(pairs, 2) int64 row pairs (a < b, each once) sharing at least one band hash: the LSH candidates."""
    found = []
    for k in range(keys.shape[1]):
        col = keys[:, k]
        order = np.argsort(col, kind="stable")
        srt = col[order]
        starts = np.flatnonzero(np.r_[True, srt[1:] != srt[:-1]])
        sizes = np.diff(np.r_[starts, len(srt)])
        two = starts[sizes == 2]  # the common case, without a Python loop
        found.append(np.sort(np.stack([order[two], order[two + 1]], axis=1), axis=1))
        for g in np.flatnonzero(sizes > 2):
            members = np.sort(order[starts[g]:starts[g] + sizes[g]])
            a, b = np.triu_indices(len(members), k=1)
            found.append(np.stack([members[a], members[b]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)
