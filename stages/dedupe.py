"""Stage dedupe: data/ingested -> data/deduped + manifest.json (content hashes, every removal and why).

Rows are compared on their normalised text (domaintune/textnorm.py: NFKC,
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

Memory: the texts stay in Arrow buffers (read shard by shard, ~1 byte a character);
normalisation (Arrow kernels, textnorm.normalise_arrow) and hashing run CHUNK_ROWS rows at a
time and keep a 128-bit key per row (XXH3-128), factorised to one int64 code, so the exact
pass holds per row only that code, the id, the label and its position. Outputs are
written by row group (domaintune/data.py). The near-duplicate pass holds the
shingle sets of the rows that survive the exact pass.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.data import (SPLITS, DataError, atomic_output, check_splits_kept, emptied_classes, read_hashes,
                             read_json, read_split_table, split_files, write_dataset, write_json)
from domaintune.params import DedupeParams, as_dict, load_params
from domaintune.stage import run_stage, stage_parser
from domaintune.textnorm import (band_hashes, candidate_pairs, jaccard, key_codes, minhash_signatures, normalise_arrow,
                                 shingles, text_keys)

log = logging.getLogger("domaintune")

REASONS = ("exact_duplicate", "label_conflict", "cross_split_leak", "near_duplicate", "near_leak",
           "label_absent_from_train")
REMOVED_COLUMNS = ["id", "split", "reason", "kept_id", "text", "label"]
CHUNK_ROWS = 100_000  # rows normalised and hashed at a time: bounds the Python strings alive at once


@dataclass
class DedupeResult:
    tables: dict  # split -> pyarrow Table (id, text, label, split) of the kept rows
    labels: list[str]
    removed: pd.DataFrame
    rows_in: dict[str, int]

    @property
    def splits(self) -> dict[str, pd.DataFrame]:
        return {s: t.to_pandas() for s, t in self.tables.items()}


def _as_tables(splits: dict[str, pd.DataFrame]) -> dict:
    import pyarrow as pa

    schema = pa.schema([(c, pa.string()) for c in ("id", "text", "label")])
    return {s: pa.Table.from_pandas(splits[s].loc[:, ["id", "text", "label"]].astype(str).reset_index(drop=True),
                                    schema=schema, preserve_index=False) for s in SPLITS}


def _chunk_keys(text) -> np.ndarray:
    """Keys of a chunk of texts: normalised with Arrow kernels (textnorm.normalise_arrow, exactly
    normalise()'s result) and hashed to 128 bits (textnorm.text_keys)."""
    return text_keys(text)


def _stack(tables: dict) -> tuple[pd.DataFrame, "pa.ChunkedArray", "pa.ChunkedArray"]:
    """One frame over all splits (label, split, row, key: int64 code of the normalised text's
    XXH3-128), in split then source order, and the texts and ids in the same order (Arrow, not Python)."""
    import pyarrow as pa

    parts, keys = [], []
    for s in SPLITS:
        t = tables[s]
        label = t.column("label").dictionary_encode().to_pandas().astype(object)  # one str object per label
        parts.append(pd.DataFrame({"label": label,
                                   "split": s, "row": np.arange(1, len(t) + 1)}))
        text = t.column("text")
        for start in range(0, len(t), CHUNK_ROWS):
            keys.append(_chunk_keys(text.slice(start, CHUNK_ROWS)))
    rows = pd.concat(parts, ignore_index=True)
    rows["key"] = key_codes(np.concatenate(keys)) if keys else np.empty(0, dtype=np.int64)
    # one int64 per (split, key): what "the same text in the same split" compares
    rows["skey"] = rows["key"].to_numpy() * len(SPLITS) + np.repeat(np.arange(len(SPLITS)), [len(tables[s]) for s in SPLITS])
    texts = pa.chunked_array([c for s in SPLITS for c in tables[s].column("text").chunks], type=pa.string())
    ids = pa.chunked_array([c for s in SPLITS for c in tables[s].column("id").chunks], type=pa.string())
    return rows, texts, ids


def _ids_at(ids, positions) -> list:
    """The ids at some row positions, as str (ids stay in Arrow: only reported ones become Python)."""
    import pyarrow as pa

    return ids.take(pa.array(np.asarray(positions, dtype=np.int64))).to_pylist()


def _exact_within_split(rows: pd.DataFrame, ids, policy: str, files: dict[str, str]) -> tuple[pd.Series, pd.Series]:
    """Reason and kept_id for rows removed as exact duplicates or label conflicts (None = keep)."""
    reason = pd.Series(None, index=rows.index, dtype=object)
    kept = pd.Series("", index=rows.index, dtype=object)
    grp = ["split", "key"]
    in_group = rows["skey"].duplicated(keep=False)  # only rows that have a copy need any grouping
    if not in_group.any():
        return reason, kept
    g = rows.loc[in_group, grp + ["label", "row"]]
    g["id"] = _ids_at(ids, np.flatnonzero(in_group.to_numpy()))
    nlab = g.groupby(grp, sort=False)["label"].transform("nunique")

    same = g[nlab == 1]
    first = same.groupby(grp, sort=False)["id"].transform("first")
    later = same.index[same["id"].to_numpy() != first.to_numpy()]
    reason[later] = "exact_duplicate"
    kept[later] = first[later]

    conf = g[nlab > 1]
    if conf.empty:
        return reason, kept
    if policy == "error":
        split, key = conf.iloc[0][grp]
        grp_rows = conf[(conf["split"] == split) & (conf["key"] == key)]
        a = grp_rows.iloc[0]
        b = grp_rows[grp_rows["label"] != a["label"]].iloc[0]
        raise DataError(files[split], int(b["row"]), "label",
                        f"id {b['id']!r} has label {b['label']!r} but id {a['id']!r} (row {int(a['row'])}) has the "
                        f"same normalised text with label {a['label']!r} (dedupe.conflict_policy: error)")
    if policy == "drop":
        reason[conf.index] = "label_conflict"
        return reason, kept
    # majority: count each label per group; a unique top count wins, a tie drops the group.
    counts = conf.groupby(grp + ["label"], sort=False).size().rename("n").reset_index()
    top = counts.groupby(grp, sort=False)["n"].transform("max")
    winners = counts[counts["n"] == top]
    n_winners = winners.groupby(grp, sort=False)["label"].transform("size")
    winners = winners[n_winners == 1].loc[:, grp + ["label"]].rename(columns={"label": "winner"})
    c = conf.rename_axis("pos").reset_index().merge(winners, on=grp, how="left").set_index("pos")
    tie = c["winner"].isna()
    reason[c.index[tie]] = "label_conflict"
    win = c[~tie]
    is_winner = win["label"] == win["winner"]
    keeper_of_group = win[is_winner].groupby(grp, sort=False)["id"].first().rename("keeper")
    k = win.join(keeper_of_group, on=grp)["keeper"]
    drop = win.index[(win["id"] != k).to_numpy()]
    reason[drop] = np.where(is_winner[drop].to_numpy(), "exact_duplicate", "label_conflict")
    kept[drop] = k[drop]
    return reason, kept


def _cross_split(rows: pd.DataFrame, ids, alive: np.ndarray, reason: pd.Series, kept: pd.Series) -> None:
    """Remove validation texts found in train, and test texts found in train or validation."""
    cols = rows.loc[:, ["key"]]  # only what is compared: no copies of the other columns (rows: RangeIndex)
    split = rows["split"].to_numpy()
    ref = cols[alive & (split == "train")]
    for s in ("validation", "test"):
        owner = pd.Series(ref.index.to_numpy(), index=ref["key"].to_numpy())  # key -> first row holding it
        owner = owner[~owner.index.duplicated()]
        in_s = split == s
        cand = cols[alive & in_s]
        hit = cand["key"].isin(owner.index)
        idx = cand.index[hit.to_numpy()]
        reason[idx] = "cross_split_leak"
        kept[idx] = _ids_at(ids, owner.reindex(cand.loc[idx, "key"]).to_numpy())
        alive[idx] = False
        ref = pd.concat([ref, cols[alive & in_s]])


def _lsh_shape(p: DedupeParams) -> tuple[int, int]:
    """LSH bands and rows per band. LSH is only a candidate filter: banded at the target threshold
    (128 perms) it never even compares 60% of the pairs at J=0.80 and 15% at J=0.88. Band lower,
    weighted against misses (128 perms, threshold 0.8: 21 bands of 6 rows, a pair at J=0.80 is
    missed with p=0.002), and let the exact Jaccard decide. datasketch's MinHashLSH picks (b, r)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=max(0.5, p.jaccard_threshold - 0.15), num_perm=p.num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def _shingle_sets(texts, positions, size: int) -> dict[int, set]:
    import pyarrow as pa

    sets = {}
    for start in range(0, len(positions), CHUNK_ROWS):
        part = positions[start:start + CHUNK_ROWS]
        norm = normalise_arrow(texts.take(pa.array(part, type=pa.int64()))).to_pylist()
        sets.update((i, shingles(n, size)) for i, n in zip(part, norm))
    return sets


def _near_candidates(texts, order: np.ndarray, p: DedupeParams, seed: int) -> dict[int, list[int]]:
    """Row -> rows sharing an LSH band with it. Signatures are made CHUNK_ROWS rows at a time and
    only their band hashes kept (4 bytes a band), so memory is ~bands*4 bytes a row, not a sketch."""
    bands, per_band = _lsh_shape(p)
    keys = np.empty((len(order), bands), dtype=np.uint32)
    for start in range(0, len(order), CHUNK_ROWS):
        part = order[start:start + CHUNK_ROWS].tolist()
        sets = _shingle_sets(texts, part, p.shingle_size)
        sig = minhash_signatures([sets[i] for i in part], p.num_perm, seed)
        keys[start:start + len(part)] = band_hashes(sig, bands, per_band)
    pairs = order[candidate_pairs(keys)]
    del keys
    cands: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        cands.setdefault(a, []).append(b)
        cands.setdefault(b, []).append(a)
    return cands


def _near(rows: pd.DataFrame, texts, ids, alive: np.ndarray, reason: pd.Series, kept: pd.Series,
          p: DedupeParams, seed: int) -> None:
    """MinHash LSH candidates, verified with the exact Jaccard: near duplicates in train, near leaks out of eval.
    Only rows with a candidate get their shingle set built (for the exact Jaccard)."""
    order = np.flatnonzero(alive)  # RangeIndex: label == position
    labels, split = rows["label"].to_numpy(), rows["split"].to_numpy()
    cands = _near_candidates(texts, order, p, seed)
    sets = _shingle_sets(texts, sorted(cands), p.shingle_size)
    thr = p.jaccard_threshold
    indexed = np.zeros(len(alive), dtype=bool)  # what the LSH index holds at each step
    train = [int(i) for i in order if split[i] == "train"]
    indexed[train] = True
    # Greedy in source order: a row removes the later rows it nearly duplicates;
    # a removed row never removes others, so the result does not depend on candidate order.
    for i in train:
        if not alive[i]:
            continue
        for j in cands.get(i, ()):
            if j > i and indexed[j] and alive[j] and labels[j] == labels[i] and jaccard(sets[i], sets[j]) >= thr:
                alive[j] = False
                reason[j], kept[j] = "near_duplicate", ids[i].as_py()
    indexed[train] = alive[train]
    # Validation is checked against train; test against train and the surviving validation.
    for s in ("validation", "test"):
        members = [int(i) for i in order if split[i] == s]
        for i in members:
            best = None
            for j in cands.get(i, ()):
                if not indexed[j]:
                    continue
                score = jaccard(sets[i], sets[j])
                if score >= thr and (best is None or (score, -j) > best[0]):
                    best = ((score, -j), j)
            if best is not None:
                alive[i] = False
                reason[i], kept[i] = "near_leak", ids[best[1]].as_py()
        indexed[members] = alive[members]


def dedupe(splits: dict[str, pd.DataFrame], p: DedupeParams, seed: int,
           files: dict[str, str] | None = None, task: str = "classification") -> DedupeResult:
    """Pure core over the three split frames; `files` only names the inputs in error messages."""
    return dedupe_tables(_as_tables(splits), p, seed, files, task)


def dedupe_tables(tables: dict, p: DedupeParams, seed: int, files: dict[str, str] | None = None,
                  task: str = "classification") -> DedupeResult:
    """The core over the three splits as pyarrow Tables (id, text, label as strings).
    For base.task generation the key is the prompt (text) and the label is the response: different
    responses to one prompt are conflicts (removed.csv lists them, by dedupe.conflict_policy), and
    there are no classes to keep."""
    import pyarrow as pa
    import pyarrow.compute as pc

    files = files or {s: f"{s}.parquet" for s in SPLITS}
    rows, texts, ids = _stack(tables)
    # kept_id in removed.csv must point at exactly one row
    codes = pc.dictionary_encode(pa.concat_arrays(ids.chunks) if ids.num_chunks else pa.array([], pa.string()))
    dup = pd.Series(codes.indices.to_numpy(zero_copy_only=False)).duplicated().to_numpy()
    if dup.any():
        at = int(np.flatnonzero(dup)[0])
        r = rows.iloc[at]
        raise DataError(files[r["split"]], int(r["row"]), "id",
                        f"id {ids[at].as_py()!r} appears more than once in the dataset")
    del codes, dup
    reason, kept = _exact_within_split(rows, ids, p.conflict_policy, files)
    alive = reason.isna().to_numpy().copy()
    _cross_split(rows, ids, alive, reason, kept)
    if p.near_duplicates and alive.any():
        _near(rows, texts, ids, alive, reason, kept, p, seed)

    train_labels = _empty_classes(rows, alive, reason, p, files) if task != "generation" else set()
    gone = np.flatnonzero(~alive)
    removed = rows.loc[~alive].assign(id=_ids_at(ids, gone), reason=reason[~alive], kept_id=kept[~alive],
                                      text=texts.take(pa.array(gone, type=pa.int64())).to_pandas().to_numpy())
    removed = removed.loc[:, REMOVED_COLUMNS]
    out, start = {}, 0
    for s in SPLITS:
        t = tables[s].select(["id", "text", "label"])
        keep = alive[start:start + len(t)]
        start += len(t)
        t = t.filter(pa.array(keep, type=pa.bool_()))
        name = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(t), dtype=np.int8)), pa.array([s]))
        out[s] = t.append_column("split", name.cast(pa.string()))
    rows_in = {s: len(tables[s]) for s in SPLITS}
    why = {s: ", ".join(f"{k} {v}" for k, v in removed.loc[removed["split"] == s, "reason"].value_counts().items())
           for s in SPLITS}
    check_splits_kept("dedupe", rows_in, {s: len(df) for s, df in out.items()}, why, files)
    return DedupeResult(out, sorted(train_labels), removed.reset_index(drop=True), rows_in)


def _empty_classes(rows: pd.DataFrame, alive: np.ndarray, reason: pd.Series, p: DedupeParams,
                   files: dict[str, str]) -> set[str]:
    """Classes dedupe leaves with no train row (e.g. all their rows were conflicts): stop, or with
    dedupe.on_empty_class: drop, remove their evaluation rows too (label_absent_from_train): a
    model cannot predict a class it never saw. Returns the train labels left."""
    is_train = rows["split"].eq("train").to_numpy()
    train_labels = set(rows.loc[alive & is_train, "label"])
    orphan = alive & ~rows["label"].isin(train_labels).to_numpy()
    gone = emptied_classes(rows.loc[is_train, "label"], rows.loc[alive])
    if p.on_empty_class == "error" and (gone or orphan.any()):
        lab = gone[0] if gone else rows.loc[orphan, "label"].iloc[0]
        mine = rows["label"].eq(lab).to_numpy()
        counts = {s: int((mine & rows["split"].eq(s).to_numpy()).sum()) for s in SPLITS}
        why = reason[mine & is_train].value_counts().to_dict()
        raise DataError(files["train"], None, "label",
                        f"dedupe would leave class {lab!r} with no train rows (rows in: {counts}; train rows removed: "
                        f"{why or 'none: no train rows'}); set dedupe.on_empty_class: drop to drop it from every split")
    reason[orphan] = "label_absent_from_train"
    alive &= ~orphan
    if len(train_labels) < 2:
        raise DataError(files["train"], None, "label", f"dedupe would leave {len(train_labels)} class(es) in train "
                        f"({sorted(train_labels)}); a classifier needs at least two")
    return train_labels


def manifest_of(result: DedupeResult, hashes: dict, input_hashes: dict, p: DedupeParams, seed: int,
                in_dir: str) -> dict:
    per = {}
    for s in SPLITS:
        r = result.removed.loc[result.removed["split"] == s, "reason"].value_counts()
        per[s] = {"rows_in": result.rows_in[s], "rows_out": len(result.tables[s]), "sha256": hashes[s],
                  "removed": {k: int(r.get(k, 0)) for k in REASONS if r.get(k, 0)}}
    return {
        "dataset_sha256": hashes["dataset"],
        "splits": per,
        "labels": result.labels,
        "removed_total": len(result.removed),
        "input": {"path": in_dir, "sha256": input_hashes},
        "params": {**as_dict(p), "seed": seed},
        "normalisation": "Unicode NFKC, casefold, whitespace runs -> one space, stripped; XXH3-128 of UTF-8",
    }


def metrics_of(result: DedupeResult) -> dict:
    counts = result.removed["reason"].value_counts()
    return {
        "removed": {k: int(counts.get(k, 0)) for k in REASONS},
        "removed_total": len(result.removed),
        "rows_in": sum(result.rows_in.values()),
        "rows_out": {s: len(result.tables[s]) for s in SPLITS},
    }


def run(args) -> None:
    p, base = load_params(args.params, "dedupe", "base")
    in_dir = Path(args.in_dir)
    tables = {s: read_split_table(in_dir, s) for s in SPLITS}
    labels = read_json(in_dir / "labels.json")
    files = {s: str(split_files(in_dir, s)[0]) for s in SPLITS}
    result = dedupe_tables(tables, p, base.seed, files, base.task)
    input_hashes = read_hashes(in_dir, tables, labels)
    del tables
    metrics = metrics_of(result)
    # Nested: the dataset and its metrics land together or not at all.
    with atomic_output(args.out) as tmp, atomic_output(args.metrics) as tmp_metrics:
        hashes = write_dataset(tmp, result.tables, result.labels)
        write_json(tmp / "manifest.json", manifest_of(result, hashes, input_hashes, p, base.seed, str(in_dir)))
        result.removed.to_csv(tmp / "removed.csv", index=False)
        write_json(tmp_metrics, metrics)
    log.info("removed %d rows (%s); out train %d / validation %d / test %d; dataset %s",
             metrics["removed_total"], ", ".join(f"{k} {v}" for k, v in metrics["removed"].items() if v),
             *metrics["rows_out"].values(), hashes["dataset"][:12])


def main(argv=None) -> int:
    ap = stage_parser("dedupe", __doc__.splitlines()[0], inp="input dataset folder (ingest output)",
                      out="output dataset folder")
    return run_stage("dedupe", run, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
