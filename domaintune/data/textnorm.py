"""Text normalisation and hashing for duplicate detection.

Two texts are "the same" when they are equal after Unicode NFKC (full-width
letters, ligatures, non-breaking spaces fold to their plain forms), case
folding (ß == ss, not just lower()) and collapsing every run of whitespace to
one space with the ends stripped. A 128-bit hash of that normal form (text_keys) is
the row's duplicate key; row_key (SHA-256 of the normal form, hex) is a row's identity across versions
(the champion/challenger comparison). The stored text is never changed: normalisation only decides
what counts as a duplicate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

import hashlib
import os
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


# ---------------------------------------------------------------- vectorised normalisation (Arrow)
# normalise_arrow gives exactly normalise()'s result for every row, computed with Arrow kernels for
# the rows made of "plain" and "compatibility" characters (below) and with _normalise_unicode for
# the others. The classes are built once per process, character by character, from Python's own
# unicodedata (the reference) and the installed Arrow:
# - every character of either class has a normalisation boundary before it: combining class 0, not
#   the second half of a canonical composition nor a Hangul jamo, and the same for the first
#   character of its NFKD. Nothing composes or reorders across it, so NFKC of such a row is the
#   concatenation of its characters' NFKC (UAX #15, section 9), and casefolding is per character;
# - plain: its own NFKC, and Arrow's utf8_lower of it is exactly its casefold (lower() for ASCII),
#   made of plain characters (so the second NFKC changes nothing);
# - compatibility (fullwidth letters, ligatures, no-break spaces, ß, ς...): its full normal form
#   M(c) = NFKC(casefold(NFKC(c))) is made of plain characters that utf8_lower leaves alone. Rows
#   holding the most frequent ones get them replaced by M(c) (replace_substring); a row with any left
#   goes the Python way;
# - whitespace maps to plain whitespace and nothing else does (str.split's set), so the runs
#   collapse alike.
# BMP only: a row with any other character (emoji, combining marks, astral scripts) goes the Python way.
# tests/data/test_textnorm_fast.py compares both paths on generated Unicode text and the example data.
_JAMO = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF))
_CLASSES: dict = {}  # RE2 patterns and the compatibility map, built by _classes()
_REPLACE_PASSES = 4  # at most this many compatibility characters are replaced per chunk ...
_REPLACE_SHARE = 0.05  # ... each present in at least this share of its rows; the rest go the Python way
_SAMPLE_ROWS = 2000


def _re2_class(cps, negate: bool = False) -> str:
    cps, parts, i = sorted(cps), [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:x}}}" + (f"-\\x{{{cps[j]:x}}}" if j > i else ""))
        i = j + 1
    return ("[^" if negate else "[") + "".join(parts) + "]"


def _composition_seconds() -> set[str]:
    seconds = set()
    for cp in range(0x30000):  # beyond: no decompositions (CJK extensions, tags, private use)
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<") and len(d.split()) == 2:
            seconds.add(chr(int(d.split()[1], 16)))
    return seconds


def _classes() -> dict:
    if _CLASSES:
        return _CLASSES
    import pyarrow as pa
    import pyarrow.compute as pc

    seconds = _composition_seconds()
    nfkc = lambda c: unicodedata.normalize("NFKC", c)  # noqa: E731

    def starter(c: str) -> bool:  # combines with nothing before it
        return unicodedata.combining(c) == 0 and c not in seconds and not any(a <= ord(c) <= b for a, b in _JAMO)

    cands = [chr(cp) for cp in range(0x10000) if not 0xD800 <= cp <= 0xDFFF]
    cands = [c for c in cands if c.isascii() or (starter(c) and starter(unicodedata.normalize("NFKD", c)[:1] or c))]
    lowered = dict(zip(cands, pc.utf8_lower(pa.array(cands)).to_pylist()))
    want = {c: c.lower() if c.isascii() else nfkc(nfkc(c).casefold()) for c in cands}
    plain = {c for c in cands if (c.isascii() or nfkc(c) == c) and lowered[c] == want[c]}
    plain = {c for c in plain if all(x in plain and lowered[x] == x for x in want[c])}
    spaces = {c for c in plain if c.isspace()}
    plain = {c for c in plain if all(x in spaces or not x.isspace() for x in want[c])}
    compat = {c: want[c] for c in cands if c not in plain and want[c]
              and all(x in plain and lowered[x] == x and (x in spaces or not x.isspace()) for x in want[c])}
    ws = [ord(c) for c in spaces]
    _CLASSES.update(not_plain=_re2_class(map(ord, plain), negate=True),
                    not_fast=_re2_class([ord(c) for c in plain] + [ord(c) for c in compat], negate=True),
                    compat=compat, space_run=_re2_class(ws) + "+",
                    space_odd=(f"^{_re2_class(ws)}|{_re2_class(ws)}$|{_re2_class(ws)}{{2}}|"
                               f"{_re2_class([cp for cp in ws if cp != 0x20])}"))
    return _CLASSES


def _non_ascii_counts(arr) -> dict[str, int]:
    """Occurrences of each non-ASCII BMP character in a string array (numpy over its UTF-8 buffer)."""
    import pyarrow as pa

    if not len(arr):
        return {}
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset:arr.offset + len(arr) + 1]
    buf = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    two = np.flatnonzero((buf & 0xE0) == 0xC0)
    three = np.flatnonzero((buf & 0xF0) == 0xE0)
    cps = np.concatenate([((buf[two].astype(np.int32) & 0x1F) << 6) | (buf[two + 1] & 0x3F),
                          ((buf[three].astype(np.int32) & 0x0F) << 12) | ((buf[three + 1].astype(np.int32) & 0x3F) << 6)
                          | (buf[three + 2] & 0x3F)])
    values, counts = np.unique(cps, return_counts=True)
    return {chr(v): int(n) for v, n in zip(values.tolist(), counts.tolist())}


def _python_way(arr):
    import pyarrow as pa

    return pa.array([_normalise_unicode(t) for t in arr.to_pylist()], type=pa.string())


def _fold_compat(sub, cls: dict):
    """Rows holding compatibility characters (and no others): the frequent ones replaced by their
    normal form, and which rows still hold one (those go the Python way)."""
    import pyarrow.compute as pc

    sample = sub.slice(0, _SAMPLE_ROWS)  # which ones are frequent: counted on the first rows only
    present = sorted(((n, c) for c, n in _non_ascii_counts(sample).items() if c in cls["compat"]), reverse=True)
    for n, c in present[:_REPLACE_PASSES]:
        if n >= _REPLACE_SHARE * len(sample):
            sub = pc.replace_substring(sub, c, cls["compat"][c])
    return sub, pc.match_substring_regex(sub, cls["not_plain"]).to_numpy(zero_copy_only=False)


def _normal_parts(texts):
    """normalise() of every row of an Arrow string array, as (positions, normal forms) parts; a later part
    overrides an earlier one at the same positions. Rows of plain characters are lowered, rows with
    compatibility characters folded first, other rows go the Python way; rows whose whitespace is not
    already single spaces between words get it collapsed (a part of their own, overriding)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cls = _classes()
    hits = lambda arr, pattern: pc.match_substring_regex(arr, pattern).to_numpy(zero_copy_only=False)  # noqa: E731
    special = hits(texts, cls["not_plain"])
    lowered = []  # (positions, rows made of plain characters)
    if special.all():
        spec, sidx = texts, np.arange(len(texts))
    else:
        lowered.append((np.flatnonzero(~special), texts.filter(pa.array(~special)) if special.any() else texts))
        spec, sidx = texts.filter(pa.array(special)), np.flatnonzero(special)
    if len(sidx):
        slow = hits(spec, cls["not_fast"])
        if slow.any():
            yield sidx[slow], _python_way(spec.filter(pa.array(slow)))
        if not slow.all():
            compat = spec.filter(pa.array(~slow)) if slow.any() else spec
            folded, left = _fold_compat(compat, cls)
            cidx = sidx[~slow]
            if left.any():
                yield cidx[left], _python_way(compat.filter(pa.array(left)))
                folded, cidx = folded.filter(pa.array(~left)), cidx[~left]
            lowered.append((cidx, folded))
    for pos, part in lowered:
        low = pc.utf8_lower(part)
        yield pos, low
        odd = hits(low, cls["space_odd"])
        if odd.any():
            collapsed = pc.replace_substring_regex(low.filter(pa.array(odd)), cls["space_run"], " ")
            yield pos[odd], pc.utf8_trim(collapsed, " ")


def _one_array(texts) -> "pa.Array":
    """A (chunked) string array as one array (a chunk of its own when it has one)."""
    import pyarrow as pa

    if isinstance(texts, pa.ChunkedArray):
        return texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    return texts


def normalise_arrow(texts) -> "pa.Array":
    """normalise() of every string in an Arrow string array (no nulls), as an Arrow string array."""
    import pyarrow as pa

    texts = _one_array(texts)
    parts, source, offset = [], np.zeros(len(texts), dtype=np.int64), 0
    for pos, part in _normal_parts(texts):
        source[pos] = offset + np.arange(len(pos))
        parts.append(part.cast(pa.string()))
        offset += len(pos)
    if not parts:
        return pa.array([], type=pa.string())
    return pa.concat_arrays(parts).take(pa.array(source))


_XXH3_SEED = int.from_bytes(os.urandom(8), "little")  # per process: inputs cannot be crafted to collide


def text_keys(texts) -> np.ndarray:
    """(rows, 2) uint64 duplicate keys of an Arrow string array: the XXH3-128 of each text's normal form
    (normalise_arrow's, hashed part by part as _normal_parts makes them), seeded per process. Only equality
    of keys is used (a collision, p ~ n^2/2^129, would merge two texts): any 128-bit hash decides the same
    rows, and XXH3 hashes a million texts ~4x faster than SHA-256 here (measured, bench/scale.py's rows)."""
    import pyarrow as pa
    import xxhash

    texts = _one_array(texts)
    digest, seed = xxhash.xxh3_128_digest, _XXH3_SEED
    keys = np.empty((len(texts), 2), dtype=np.uint64)
    for pos, part in _normal_parts(texts):
        raw = b"".join([digest(t, seed) for t in part.cast(pa.binary()).to_pylist()])
        keys[pos] = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    return keys


def sha256_all(norm: Iterable[str]) -> list[bytes]:
    """Raw 32-byte SHA-256 digests: the duplicate keys (hex would double their size)."""
    sha = hashlib.sha256
    return [sha(t.encode("utf-8", "surrogatepass")).digest() for t in norm]


def row_key(text: str) -> str:
    """A row's identity across dataset versions: the SHA-256 (hex) of its normal form (normalise). Texts
    dedupe calls exact duplicates get the same key; unlike dedupe's per-process XXH3 keys (text_keys) it
    is the same in every process, so a version record can pin its rows by it."""
    return hashlib.sha256(normalise(text).encode("utf-8", "surrogatepass")).hexdigest()


def row_keys(texts: Iterable[str]) -> list[str]:
    """row_key of every text."""
    return [d.hex() for d in sha256_all(normalise_all(texts))]


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
