"""Deduplication, the dedupe stage's work: data/ingested -> data/deduped + manifest.json (content hashes,
every removal and why).

Rows are compared on their normalised text (domaintune/data/textnorm.py: NFKC,
casefold, whitespace collapsed) through a 128-bit hash of it, in this order:
1. exact duplicates inside a split: the first row (source order) is kept;
2. same text, different labels inside a split: `dedupe.conflict_policy`
   drop (all copies) | majority (keep the majority label's first row; a tie
   drops all) | error;
3. cross-split leaks: a validation text also in train, a test text also in
   train or validation, is removed from validation/test (train is never cut
   to protect an evaluation split);
4. optional near duplicates (MinHash LSH over word shingles, every candidate
   pair verified with the exact Jaccard): inside train between rows with the
   same label (a near copy with another label is a labelling question for
   audit, not redundancy), and as near leaks (any label: a leak is about the
   text): validation rows near a train row, test rows near a train or a
   surviving validation row.
A class left with no train row stops the stage (dedupe.on_empty_class: error) or, with
`drop`, loses its validation/test rows too (reason label_absent_from_train); a split that
had rows and would lose them all always stops it. Both errors give the counts.
The manifest's per-split SHA-256 content hashes are the dataset version every
later stage and model version refers to.

Memory: the texts stay in Arrow buffers (read shard by shard, ~1 byte a character), held once.
Normalisation (Arrow kernels, textnorm._normal_parts) and hashing run CHUNK_ROWS rows a job on a
thread per core, and keep a 128-bit key per row (XXH3-128), factorised to one int64 code; per row the
rules then hold only integer codes (split, label, key: _Rows) and what happens to it (_Marks). The kept
rows are filtered record batch by record batch from the input, whose batches are freed as they go, and
written by row group (domaintune/data/dataset.py); removed.csv is written CHUNK_ROWS rows at a time. The
near-duplicate pass holds 4 bytes a band per row and the shingle sets of the rows with a candidate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.core.errors import DataError
from domaintune.core.io import atomic_output, read_json, write_json
from domaintune.core.params import DedupeParams, as_dict, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import (
    SPLITS,
    check_splits_kept,
    chunk_bounds,
    first_duplicate,
    read_hashes,
    read_split_table,
    release_memory,
    split_files,
    take_rows,
    write_dataset,
)
from domaintune.data.textnorm import (
    band_hashes,
    candidate_pairs,
    key_codes,
    minhash_signatures,
    normalise_arrow,
    shingles,
    text_keys,
)

log = logging.getLogger("domaintune")

REASONS = ("exact_duplicate", "label_conflict", "cross_split_leak", "near_duplicate", "near_leak",
           "label_absent_from_train")
REMOVED_COLUMNS = ["id", "split", "reason", "kept_id", "text", "label"]
CHUNK_ROWS = 100_000  # rows normalised and hashed at a time: bounds the Python strings alive at once
NEAR_CHUNK_ROWS = 20_000  # rows MinHashed at a time (their shingle sets and signatures: ~6 KB a row)
KEEP = -1  # _Marks.why of a kept row; a removed row's is its index in REASONS
THREADS = os.cpu_count() or 1  # threads normalising and hashing texts
_SHINGLE_SEED = int.from_bytes(os.urandom(8), "little")  # per process: inputs cannot be crafted to collide


@dataclass
class DedupeResult:
    tables: dict  # split -> pyarrow Table (id, text, label, split) of the kept rows
    labels: list[str]
    removed_table: "pa.Table"  # REMOVED_COLUMNS (strings), one row per removed row, in split then source order
    rows_in: dict[str, int]

    @property
    def splits(self) -> dict[str, pd.DataFrame]:
        return {s: t.to_pandas() for s, t in self.tables.items()}

    @property
    def removed(self) -> pd.DataFrame:
        return self.removed_table.to_pandas()

    def reason_counts(self, split: str | None = None) -> dict[str, int]:
        """Removed rows per reason (of one split, or of all), largest count first."""
        import pyarrow.compute as pc

        t = self.removed_table
        col = t.column("reason")
        col = col if split is None else col.filter(pc.equal(t.column("split"), split))
        counts = [(c["values"], c["counts"]) for c in pc.value_counts(col).to_pylist()]
        return dict(sorted(counts, key=lambda kv: -kv[1]))


@dataclass
class _Rows:
    """Every input row, in split then source order (position = index into these arrays)."""
    split: np.ndarray  # int8: index into SPLITS
    label: np.ndarray  # int64: code into `names` (equal codes <=> equal label strings)
    key: np.ndarray  # int64: code of the normalised text's XXH3-128 (equal codes <=> equal normal forms)
    names: "pa.Array"  # label strings by code
    starts: np.ndarray  # position of each split's first row (and the total, last)
    ids: "pa.ChunkedArray"
    ids_unique: bool
    texts: "pa.ChunkedArray"

    def row(self, pos: int) -> int:
        """The 1-based row of a position in its own split's file (as error messages name it)."""
        return int(pos - self.starts[self.split[pos]] + 1)

    def label_of(self, pos: int) -> str:
        return self.names[int(self.label[pos])].as_py()

    def ids_at(self, positions) -> list:
        """The ids at some positions, as str (ids stay in Arrow: only reported ones become Python)."""
        return self.take("ids", positions).to_pylist()

    def take(self, column: str, positions) -> "pa.Array":
        """ids or texts at some positions, chunk by chunk (data.take_rows: no copy of the whole column)."""
        chunks = getattr(self, column).chunks
        return take_rows(chunks, chunk_bounds(chunks), positions)


@dataclass
class _Marks:
    """What happens to each row: why[pos] is KEEP or an index into REASONS, keeper[pos] the position of the
    row it duplicates (-1: none, e.g. a label conflict dropped with every copy)."""
    why: np.ndarray
    keeper: np.ndarray

    @classmethod
    def of(cls, n: int) -> "_Marks":
        return cls(np.full(n, KEEP, dtype=np.int8), np.full(n, -1, dtype=np.int64))

    def mark(self, positions, reason: str, keepers=-1) -> None:
        self.why[positions] = REASONS.index(reason)
        self.keeper[positions] = keepers

    @property
    def alive(self) -> np.ndarray:
        return self.why == KEEP


def _label_codes(labels) -> tuple["pa.Array", np.ndarray]:
    """(label strings by code, int64 code of every row): equal codes <=> equal labels."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(labels):
        return pa.array([], pa.string()), np.empty(0, dtype=np.int64)
    coded = pc.dictionary_encode(labels)
    if len({tuple(b and b.address for b in c.dictionary.buffers()) for c in coded.chunks}) > 1:  # not one dictionary
        coded = coded.unify_dictionaries()
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in coded.chunks]).astype(np.int64)
    return coded.chunk(0).dictionary, codes


def _stack(tables: dict) -> _Rows:
    """The rows of all splits as integer codes (split, label, key), plus the texts and ids in Arrow.
    The keys are made CHUNK_ROWS rows a job on a thread per core (Arrow's kernels release the GIL, so
    chunks normalise side by side), next to the id check and the label codes."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.compute as pc

    sizes = [len(tables[s]) for s in SPLITS]
    ids = pa.chunked_array([c for s in SPLITS for c in tables[s].column("id").chunks], type=pa.string())
    labels = pa.chunked_array([c for s in SPLITS for c in tables[s].column("label").chunks], type=pa.string())
    jobs = [tables[s].column("text").slice(start, CHUNK_ROWS)
            for s in SPLITS for start in range(0, len(tables[s]), CHUNK_ROWS)]
    if jobs:
        normalise_arrow(jobs[0].slice(0, 1))  # builds textnorm's character classes once, before the threads
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs) + 2, THREADS))) as pool:
        unique = pool.submit(lambda: len(pc.unique(ids)) == len(ids))
        coded = pool.submit(_label_codes, labels)
        keys = list(pool.map(text_keys, jobs))
        (names, label), unique = coded.result(), unique.result()
    release_memory()  # the id hash set and the normalisers' buffers
    return _Rows(split=np.repeat(np.arange(len(SPLITS), dtype=np.int8), sizes), label=label,
                 key=key_codes(np.concatenate(keys)) if keys else np.empty(0, dtype=np.int64), names=names,
                 starts=np.cumsum([0] + sizes), ids=ids, ids_unique=unique,
                 texts=pa.chunked_array([c for s in SPLITS for c in tables[s].column("text").chunks], type=pa.string()))


def _check_ids_unique(rows: _Rows, files: dict[str, str]) -> None:
    """kept_id in removed.csv must point at exactly one row."""
    dup = None if rows.ids_unique else first_duplicate(rows.ids)
    if dup is not None:
        at = dup[0]
        raise DataError(files[SPLITS[rows.split[at]]], rows.row(at), "id",
                        f"id {rows.ids[at].as_py()!r} appears more than once in the dataset")


def _exact_within_split(rows: _Rows, marks: _Marks, policy: str, files: dict[str, str]) -> None:
    """Mark rows removed as exact duplicates or label conflicts inside their split."""
    skey = pd.Series(rows.key * len(SPLITS) + rows.split)  # one int64 per (split, normalised text)
    in_group = np.flatnonzero(skey.duplicated(keep=False).to_numpy())  # only rows with a copy need grouping
    if not len(in_group):
        return
    g = pd.DataFrame({"g": skey.to_numpy()[in_group], "label": rows.label[in_group]}, index=in_group)
    nlab = g.groupby("g", sort=False)["label"].transform("nunique").to_numpy()

    same = g[nlab == 1]
    first = same.index.to_series().groupby(same["g"].to_numpy(), sort=False).transform("first").to_numpy()
    later = same.index.to_numpy() != first
    marks.mark(same.index[later], "exact_duplicate", first[later])

    conf = g[nlab > 1]
    if conf.empty:
        return
    if policy == "error":
        grp = conf[conf["g"] == conf["g"].iloc[0]]
        a = grp.index[0]
        b = grp.index[np.flatnonzero(grp["label"].to_numpy() != grp["label"].iloc[0])[0]]
        ida, idb = rows.ids_at([a, b])
        raise DataError(files[SPLITS[rows.split[b]]], rows.row(b), "label",
                        f"id {idb!r} has label {rows.label_of(b)!r} but id {ida!r} (row {rows.row(a)}) has the "
                        f"same normalised text with label {rows.label_of(a)!r} (dedupe.conflict_policy: error)")
    if policy == "drop":
        marks.mark(conf.index, "label_conflict")
        return
    # majority: count each label per group; a unique top count wins, a tie drops the group.
    counts = conf.groupby(["g", "label"], sort=False).size().rename("n").reset_index()
    top = counts.groupby("g", sort=False)["n"].transform("max")
    winners = counts[counts["n"] == top]
    winners = winners[winners.groupby("g", sort=False)["label"].transform("size") == 1]
    winner = pd.Series(winners["label"].to_numpy(), index=winners["g"].to_numpy())
    c = conf.assign(winner=winner.reindex(conf["g"].to_numpy()).to_numpy())
    tie = c["winner"].isna().to_numpy()
    marks.mark(c.index[tie], "label_conflict")
    win = c[~tie]
    is_winner = (win["label"] == win["winner"]).to_numpy()
    keeper = pd.Series(win.index[is_winner], index=win["g"].to_numpy()[is_winner])
    keeper = keeper[~keeper.index.duplicated()].reindex(win["g"].to_numpy()).to_numpy()
    drop = win.index.to_numpy() != keeper
    marks.mark(win.index[drop & is_winner], "exact_duplicate", keeper[drop & is_winner])
    marks.mark(win.index[drop & ~is_winner], "label_conflict", keeper[drop & ~is_winner])


def _cross_split(rows: _Rows, marks: _Marks) -> None:
    """Remove validation texts found in train, and test texts found in train or validation."""
    alive = marks.alive
    ref = np.flatnonzero(alive & (rows.split == 0))
    for k in (1, 2):  # validation, test
        owner = pd.Series(ref, index=rows.key[ref])  # key -> first row holding it
        owner = owner[~owner.index.duplicated()]
        cand = np.flatnonzero(alive & (rows.split == k))
        hit = cand[pd.Index(owner.index).get_indexer(rows.key[cand]) >= 0]
        marks.mark(hit, "cross_split_leak", owner.reindex(rows.key[hit]).to_numpy())
        alive[hit] = False
        ref = np.concatenate([ref, np.flatnonzero(alive & (rows.split == k))])


def _lsh_shape(p: DedupeParams) -> tuple[int, int]:
    """LSH bands and rows per band. LSH is only a candidate filter: banded at the target threshold
    (128 perms) it never even compares 60% of the pairs at J=0.80 and 15% at J=0.88. Band lower,
    weighted against misses (128 perms, threshold 0.8: 21 bands of 6 rows, a pair at J=0.80 is
    missed with p=0.002), and let the exact Jaccard decide. datasketch's MinHashLSH picks (b, r)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=max(0.5, p.jaccard_threshold - 0.15), num_perm=p.num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def _shingle_hashes(rows: _Rows, positions: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's word-shingle set as 64-bit hashes (XXH3-64, seeded per process), flat, with each row's
    start (and the total) in `starts`: ~8 bytes a shingle, where a Python set of bytes takes ~100."""
    import xxhash

    digest, seed = xxhash.xxh3_64_intdigest, _SHINGLE_SEED
    flat, counts = [], np.empty(len(positions), dtype=np.int64)
    for start in range(0, len(positions), CHUNK_ROWS):
        part = positions[start:start + CHUNK_ROWS]
        norm = normalise_arrow(rows.take("texts", part)).to_pylist()
        for k, n in enumerate(norm, start):
            hs = [digest(x, seed) for x in shingles(n, size)]
            counts[k] = len(hs)
            flat.append(np.array(hs, dtype=np.uint64))
    hashes = np.concatenate(flat) if flat else np.empty(0, dtype=np.uint64)
    return hashes, np.concatenate([[0], np.cumsum(counts)])


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions starts[k] .. starts[k] + lengths[k] - 1 for every k, concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lengths - starts, lengths)


def _pair_jaccard(pairs: np.ndarray, hashes: np.ndarray, starts: np.ndarray, batch: int = 1 << 18) -> np.ndarray:
    """The exact Jaccard of the shingle sets of each pair of rows (indices into `starts`), `batch` pairs at a
    time: both rows' shingles tagged with the pair, sorted, and a shingle seen twice in a pair is shared.
    (Hashed shingles: two different shingles of one pair share a 64-bit hash with p ~ 1e-17.)"""
    lengths = np.diff(starts)
    out = np.empty(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), batch):
        a, b = pairs[lo:lo + batch, 0], pairs[lo:lo + batch, 1]
        la, lb = lengths[a], lengths[b]
        tag = np.concatenate([np.repeat(np.arange(len(a)), la), np.repeat(np.arange(len(b)), lb)])
        val = np.concatenate([hashes[_ranges(starts[a], la)], hashes[_ranges(starts[b], lb)]])
        order = np.lexsort((val, tag))
        tag, val = tag[order], val[order]
        same = (tag[1:] == tag[:-1]) & (val[1:] == val[:-1])
        shared = np.bincount(tag[1:][same], minlength=len(a))
        out[lo:lo + batch] = shared / (la + lb - shared)
    return out


def _near_candidates(rows: _Rows, order: np.ndarray, p: DedupeParams, seed: int) -> np.ndarray:
    """(pairs, 2) positions (a < b) sharing an LSH band. Signatures are made NEAR_CHUNK_ROWS rows at a time and
    only their band hashes kept (4 bytes a band), so memory is ~bands*4 bytes a row, not a sketch."""
    bands, per_band = _lsh_shape(p)
    keys = np.empty((len(order), bands), dtype=np.uint32)
    for start in range(0, len(order), NEAR_CHUNK_ROWS):
        part = order[start:start + NEAR_CHUNK_ROWS]
        norm = normalise_arrow(rows.take("texts", part)).to_pylist()
        sets = [shingles(n, p.shingle_size) for n in norm]
        sig = minhash_signatures(sets, p.num_perm, seed)
        keys[start:start + len(part)] = band_hashes(sig, bands, per_band)
    return order[candidate_pairs(keys)]


def _near_graph(rows: _Rows, order: np.ndarray, p: DedupeParams, seed: int):
    """Every candidate pair with its exact Jaccard, both ways, grouped by row: neighbours[at[r]:at[r + 1]]
    and their scores for each row r (a position) that has a candidate; `cand` lists those rows."""
    pairs = _near_candidates(rows, order, p, seed)
    cand = np.unique(pairs)
    hashes, starts = _shingle_hashes(rows, cand, p.shingle_size)
    score = _pair_jaccard(np.searchsorted(cand, pairs), hashes, starts)
    del hashes, starts
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    by_src = np.argsort(src, kind="stable")
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])[by_src]
    at = np.searchsorted(src[by_src], np.r_[cand, np.iinfo(np.int64).max])
    return cand, at, dst, np.concatenate([score, score])[by_src]


def _near(rows: _Rows, marks: _Marks, p: DedupeParams, seed: int) -> None:
    """MinHash LSH candidates, verified with the exact Jaccard: near duplicates in train, near leaks out of eval.
    Only rows with a candidate get their shingles hashed (for the exact Jaccard), and every pair's Jaccard is
    computed at once (_near_graph), before the greedy pass below uses them."""
    alive = marks.alive
    order = np.flatnonzero(alive)
    labels, split = rows.label, rows.split
    cand, at, dst, score = _near_graph(rows, order, p, seed)
    thr = p.jaccard_threshold
    indexed = np.zeros(len(alive), dtype=bool)  # what the LSH index holds at each step
    indexed[order[split[order] == 0]] = True

    def neighbours(k: int):
        return zip(dst[at[k]:at[k + 1]].tolist(), score[at[k]:at[k + 1]].tolist())
    # Greedy in source order: a row removes the later rows it nearly duplicates;
    # a removed row never removes others, so the result does not depend on candidate order.
    for k in np.flatnonzero(split[cand] == 0).tolist():
        i = int(cand[k])
        if not alive[i]:
            continue
        for j, sc in neighbours(k):
            if j > i and indexed[j] and alive[j] and labels[j] == labels[i] and sc >= thr:
                alive[j] = False
                marks.mark(j, "near_duplicate", i)
    train = order[split[order] == 0]
    indexed[train] = alive[train]
    # Validation is checked against train; test against train and the surviving validation.
    for s in (1, 2):
        for k in np.flatnonzero(split[cand] == s).tolist():
            i, best = int(cand[k]), None
            for j, sc in neighbours(k):
                if indexed[j] and sc >= thr and (best is None or (sc, -j) > best[0]):
                    best = ((sc, -j), j)
            if best is not None:
                alive[i] = False
                marks.mark(i, "near_leak", best[1])
        members = order[split[order] == s]
        indexed[members] = alive[members]


def dedupe(splits: dict[str, pd.DataFrame], p: DedupeParams, seed: int,
           files: dict[str, str] | None = None, classes: bool = True) -> DedupeResult:
    """Pure core over the three split frames; `files` only names the inputs in error messages."""
    import pyarrow as pa

    schema = pa.schema([(c, pa.string()) for c in ("id", "text", "label")])
    tables = {s: pa.Table.from_pandas(splits[s].loc[:, ["id", "text", "label"]].astype(str).reset_index(drop=True),
                                      schema=schema, preserve_index=False) for s in SPLITS}
    return dedupe_tables(tables, p, seed, files, classes)


def dedupe_tables(tables: dict, p: DedupeParams, seed: int, files: dict[str, str] | None = None,
                  classes: bool = True, consume: bool = False) -> DedupeResult:
    """The core over the three splits as pyarrow Tables (id, text, label as strings).
    With classes=False (prompt -> response rows) the key is the prompt and the label the response: different
    responses to one prompt are conflicts (removed.csv lists them, by dedupe.conflict_policy), and
    there are no classes to keep. Per row it holds integer codes only (_Rows); the kept rows come out
    as Arrow tables filtered from the inputs, split by split. consume: `tables` is emptied as its splits
    are filtered (the caller gives them up), so the input and the output are never both whole in memory."""
    files = files or {s: f"{s}.parquet" for s in SPLITS}
    rows = _stack(tables)
    _check_ids_unique(rows, files)
    marks = _Marks.of(len(rows.key))
    _exact_within_split(rows, marks, p.conflict_policy, files)
    _cross_split(rows, marks)
    if p.near_duplicates and marks.alive.any():
        _near(rows, marks, p, seed)
    train_labels = _empty_classes(rows, marks, p, files) if classes else []
    removed = _removed_table(rows, marks)
    del rows
    alive, out, start = marks.alive, {}, 0
    rows_in = {s: len(tables[s]) for s in SPLITS}
    for s in SPLITS:
        out[s] = _kept(tables.pop(s) if consume else tables[s], alive[start:start + rows_in[s]], s)
        start += rows_in[s]
    result = DedupeResult(out, train_labels, removed, rows_in)
    why = {s: ", ".join(f"{k} {v}" for k, v in result.reason_counts(s).items()) for s in SPLITS}
    check_splits_kept("dedupe", rows_in, {s: len(t) for s, t in out.items()}, why, files)
    return result


def _kept(table, keep: np.ndarray, split: str):
    """A split's kept rows (id, text, label, split), filtered record batch by record batch. When the caller
    hands the table over (dedupe_tables(consume=True)), each input batch is freed once filtered, so the kept
    rows never sit in memory beside the whole input."""
    import pyarrow as pa

    schema = pa.schema([(c, pa.string()) for c in ("id", "text", "label")])
    batches = table.select(["id", "text", "label"]).cast(schema).to_batches()
    del table
    out, start = [], 0
    while batches:
        b = batches.pop(0)
        out.append(b.filter(pa.array(keep[start:start + b.num_rows], type=pa.bool_())))
        start += b.num_rows
        del b
        release_memory()
    t = pa.Table.from_batches(out, schema=schema)
    name = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(t), dtype=np.int8)), pa.array([split]))
    return t.append_column("split", name.cast(pa.string()))


def _removed_table(rows: _Rows, marks: _Marks):
    """One row per removed row (REMOVED_COLUMNS), in split then source order; all in Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    gone = ~marks.alive
    mask = pa.array(gone)
    keeper = marks.keeper[gone]
    valid = keeper >= 0
    slot = np.cumsum(valid) - 1  # keeper's place among the valid ones
    kept_id = (rows.take("ids", keeper[valid]).take(pa.array(slot, mask=~valid)) if valid.any()
               else pa.nulls(len(keeper), pa.string()))

    def names(values, codes):
        return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(values, pa.string())).cast(pa.string())
    return pa.table({"id": rows.ids.filter(mask), "split": names(SPLITS, rows.split[gone]),
                     "reason": names(REASONS, marks.why[gone]), "kept_id": pc.fill_null(kept_id, ""),
                     "text": rows.texts.filter(mask), "label": rows.names.take(pa.array(rows.label[gone]))})


def _empty_classes(rows: _Rows, marks: _Marks, p: DedupeParams, files: dict[str, str]) -> list[str]:
    """Classes dedupe leaves with no train row (e.g. all their rows were conflicts): stop, or with
    dedupe.on_empty_class: drop, remove their evaluation rows too (label_absent_from_train): a
    model cannot predict a class it never saw. Returns the train labels left, sorted."""
    alive, is_train = marks.alive, rows.split == 0
    left = np.unique(rows.label[alive & is_train])
    orphan = alive & ~np.isin(rows.label, left)
    gone = sorted(rows.names.take(np.setdiff1d(np.unique(rows.label[is_train]), left)).to_pylist())
    if p.on_empty_class == "error" and (gone or orphan.any()):
        lab = gone[0] if gone else rows.label_of(int(np.flatnonzero(orphan)[0]))
        mine = rows.label == rows.names.index(lab).as_py()
        counts = {s: int((mine & (rows.split == k)).sum()) for k, s in enumerate(SPLITS)}
        why = pd.Series(np.asarray(REASONS, dtype=object)[marks.why[mine & is_train & ~alive]]).value_counts().to_dict()
        raise DataError(files["train"], None, "label",
                        f"dedupe would leave class {lab!r} with no train rows (rows in: {counts}; train rows removed: "
                        f"{why or 'none: no train rows'}); set dedupe.on_empty_class: drop to drop it from every split")
    marks.mark(np.flatnonzero(orphan), "label_absent_from_train")
    train_labels = sorted(rows.names.take(left).to_pylist())
    if len(train_labels) < 2:
        raise DataError(files["train"], None, "label", f"dedupe would leave {len(train_labels)} class(es) in train "
                        f"({train_labels}); a classifier needs at least two")
    return train_labels


def manifest_of(result: DedupeResult, hashes: dict, input_hashes: dict, p: DedupeParams, seed: int,
                in_dir: str) -> dict:
    per = {}
    for s in SPLITS:
        r = result.reason_counts(s)
        per[s] = {"rows_in": result.rows_in[s], "rows_out": len(result.tables[s]), "sha256": hashes[s],
                  "removed": {k: r[k] for k in REASONS if r.get(k, 0)}}
    return {
        "dataset_sha256": hashes["dataset"],
        "splits": per,
        "labels": result.labels,
        "removed_total": len(result.removed_table),
        "input": {"path": in_dir, "sha256": input_hashes},
        "params": {**as_dict(p), "seed": seed},
        "normalisation": "Unicode NFKC, casefold, whitespace runs -> one space, stripped; XXH3-128 of UTF-8",
    }


def metrics_of(result: DedupeResult) -> dict:
    counts = result.reason_counts()
    return {
        "removed": {k: counts.get(k, 0) for k in REASONS},
        "removed_total": len(result.removed_table),
        "rows_in": sum(result.rows_in.values()),
        "rows_out": {s: len(result.tables[s]) for s in SPLITS},
    }


def write_removed_csv(table, path: Path, rows: int = CHUNK_ROWS) -> None:
    """removed.csv, `rows` rows at a time: the same bytes as one pandas to_csv of the whole table, without
    every removed text as a Python string at once."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for start in range(0, max(len(table), 1), rows):
            table.slice(start, rows).to_pandas().loc[:, REMOVED_COLUMNS].to_csv(fh, index=False, header=start == 0)


def dedupe_stage(io: StageIO, classes: bool = True, keep_labels: bool = False) -> None:
    """The dedupe stage for a task (classes=False: prompt -> response rows, no label set to keep whole;
    keep_labels: labels.json passes through as it is, e.g. token_classification's tag set)."""
    p, base = load_params(io.params, "dedupe", "base")
    in_dir = Path(io.in_dir)
    tables = {s: read_split_table(in_dir, s) for s in SPLITS}
    labels = read_json(in_dir / "labels.json")
    files = {s: str(split_files(in_dir, s)[0]) for s in SPLITS}
    input_hashes = read_hashes(in_dir, tables, labels)
    result = dedupe_tables(tables, p, base.seed, files, classes, consume=True)
    metrics = metrics_of(result)
    # Nested: the dataset and its metrics land together or not at all.
    with atomic_output(io.out) as tmp, atomic_output(io.metrics) as tmp_metrics:
        hashes = write_dataset(tmp, result.tables, labels if keep_labels else result.labels)
        write_json(tmp / "manifest.json", manifest_of(result, hashes, input_hashes, p, base.seed, str(in_dir)))
        write_removed_csv(result.removed_table, tmp / "removed.csv")
        write_json(tmp_metrics, metrics)
    log.info("removed %d rows (%s); out train %d / validation %d / test %d; dataset %s",
             metrics["removed_total"], ", ".join(f"{k} {v}" for k, v in metrics["removed"].items() if v),
             *metrics["rows_out"].values(), hashes["dataset"][:12])
