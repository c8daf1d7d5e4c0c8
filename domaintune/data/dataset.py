"""The dataset schema every stage reads and writes: split shards, labels, content hashes.

Between stages a dataset is a folder with the Parquet shards of each split
(train.parquet, then train-00001.parquet, ... when a split has more than
SHARD_ROWS rows; the same for validation and test; row groups of ROW_GROUP_ROWS
rows, so a reader can stream them), each with the columns
id (str), text (str), label (str), split (str), and labels.json: the sorted
list of label names seen in train, and hashes.json: per-split SHA-256 content
hashes plus a "dataset" hash (the dataset version later stages record).
Labels stay strings end to end; integer
ids are assigned only inside the model, from labels.json. A multi-label row
holds its labels joined by LABEL_SEPARATOR.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import pandas as pd

from domaintune.core.errors import DataError
from domaintune.core.io import read_json, write_json

if TYPE_CHECKING:
    import pyarrow as pa



SPLITS = ("train", "validation", "test")



COLUMNS = ("id", "text", "label", "split")



# A few large files for DVC to track, not many small ones; row groups bound what a streaming reader holds.
SHARD_ROWS = 2_000_000



ROW_GROUP_ROWS = 100_000



HASH_CHUNK_ROWS = 100_000



Split = Union[pd.DataFrame, "pa.Table"]



_json_string = json.encoder.encode_basestring  # json.dumps(str, ensure_ascii=False)



def split_hash(df: Split) -> str:
    """SHA-256 of a split's canonical rows: (id, text, label) as JSON lines, sorted by id.

    Independent of row order, Parquet version and file layout, so the same
    content always gets the same hash: this is the dataset version. A pyarrow Table
    is hashed without turning it into Python objects all at once (sorted by Arrow:
    UTF-8 byte order is code point order, the order Python sorts str by; stable, as pandas').
    """
    if not isinstance(df, pd.DataFrame):
        return _table_hash(df)
    rows = df.loc[:, ["id", "text", "label"]].astype(str).sort_values("id", kind="stable")
    return json_lines_sha256(zip(rows["id"], rows["text"], rows["label"]))



def _table_hash(table: "pa.Table") -> str:
    import pyarrow.compute as pc

    t = table.select(["id", "text", "label"])
    order = pc.sort_indices(t, sort_keys=[("id", "ascending")]).to_numpy()
    batches = t.to_batches()
    bounds = chunk_bounds(batches)

    def records():
        for start in range(0, len(order), HASH_CHUNK_ROWS):
            part = take_rows(batches, bounds, order[start:start + HASH_CHUNK_ROWS])
            yield from zip(*(part.column(c).to_pylist() for c in ("id", "text", "label")))
    return json_lines_sha256(records())



def take_rows(chunks: list, bounds: np.ndarray, positions: np.ndarray):
    """The rows at `positions` (in that order) of a chunked table or array given as its record batches or
    array chunks (bounds: each chunk's first row, then the total), as one Table or Array. Chunk by chunk:
    Arrow's take on a chunked table or array first copies every chunk into one, which for a whole split's
    texts doubles the memory it needs (and costs a copy of them all per call)."""
    import pyarrow as pa

    positions = np.asarray(positions, dtype=np.int64)
    which = np.searchsorted(bounds, positions, side="right") - 1
    by_chunk = np.argsort(which, kind="stable")
    cuts = np.flatnonzero(np.diff(which[by_chunk])) + 1
    parts = [chunks[which[g[0]]].take(pa.array(positions[g] - bounds[which[g[0]]]))
             for g in np.split(by_chunk, cuts) if len(g)]
    batches = isinstance(chunks[0], pa.RecordBatch) if chunks else True
    if not parts:
        if not batches:
            return pa.array([], type=chunks[0].type)
        return pa.Table.from_batches([], schema=chunks[0].schema) if chunks else pa.table({})
    back = np.empty(len(by_chunk), dtype=np.int64)
    back[by_chunk] = np.arange(len(by_chunk))
    combined = pa.Table.from_batches(parts).combine_chunks() if batches else pa.concat_arrays(parts)
    return combined.take(pa.array(back))



def chunk_bounds(chunks: list) -> np.ndarray:
    """Each chunk's first row, then the total (take_rows' bounds)."""
    return np.cumsum([0] + [len(c) for c in chunks])



def json_lines_sha256(records) -> str:
    """SHA-256 over records of strings, each as the line json.dumps(list(record), ensure_ascii=False) + "\n".

    Built from the string encoder json.dumps itself uses: ~3x faster than one json.dumps per row.
    """
    h = hashlib.sha256()
    for rec in records:
        h.update(("[" + ", ".join(map(_json_string, rec)) + "]\n").encode("utf-8"))
    return h.hexdigest()



def dataset_hashes(splits: dict[str, Split], labels: list[str]) -> dict[str, str]:
    """Per-split content hashes plus one 'dataset' hash over all splits and the label list."""
    out = {name: split_hash(splits[name]) for name in SPLITS}
    whole = hashlib.sha256(json.dumps([out[n] for n in SPLITS] + sorted(labels)).encode()).hexdigest()
    out["dataset"] = whole
    return out



def read_hashes(folder: str | os.PathLike, splits: dict[str, pd.DataFrame], labels: list[str]) -> dict[str, str]:
    """A dataset folder's hashes.json (write_dataset writes it); computed from the splits if it is absent."""
    path = Path(folder) / "hashes.json"
    return read_json(path) if path.exists() else dataset_hashes(splits, labels)



def split_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """The shards of one split in order: NAME.parquet, then NAME-00001.parquet, ..."""
    folder = Path(folder)
    first = folder / f"{name}.parquet"
    more = sorted(p for p in folder.glob(f"{name}-*.parquet") if p.stem[len(name) + 1:].isdigit())
    return ([first] if first.exists() else []) + more



def _as_table(df: Split) -> "pa.Table":
    import pyarrow as pa

    schema = pa.schema([(c, pa.string()) for c in COLUMNS])
    if isinstance(df, pd.DataFrame):
        df = df.loc[:, list(COLUMNS)].astype({c: str for c in COLUMNS}).reset_index(drop=True)
        return pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    return df.select(list(COLUMNS)).cast(schema)



def write_split(folder: str | os.PathLike, name: str, df: Split) -> None:
    """One split as shards of at most SHARD_ROWS rows in row groups of ROW_GROUP_ROWS (an empty
    split is one file with no rows, so every split always has NAME.parquet)."""
    import pyarrow.parquet as pq

    table = _as_table(df)
    for k, start in enumerate(range(0, max(len(table), 1), SHARD_ROWS)):
        path = Path(folder) / (f"{name}.parquet" if k == 0 else f"{name}-{k:05d}.parquet")
        pq.write_table(table.slice(start, SHARD_ROWS), path, row_group_size=ROW_GROUP_ROWS)



def write_dataset(folder: str | os.PathLike, splits: dict[str, Split], labels: list[str]) -> dict[str, str]:
    """Write a dataset folder in the schema above; also hashes.json. Returns the hashes.
    A split may be a DataFrame or a pyarrow Table (streamed out by row group, never made into Python rows)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = {}
    for name in SPLITS:
        df = splits.get(name)
        if df is None:
            df = pd.DataFrame({c: pd.Series(dtype=str) for c in COLUMNS})
        clean[name] = _as_table(df)
        write_split(folder, name, clean[name])
    write_json(folder / "labels.json", sorted(labels))
    hashes = dataset_hashes(clean, labels)
    write_json(folder / "hashes.json", hashes)
    return hashes



def _read_shards(folder: str | os.PathLike, name: str, read, column_names) -> list:
    """Every shard of a split, read by `read`, each checked for the stage-output columns."""
    files = split_files(folder, name)
    if not files:
        raise DataError(Path(folder) / f"{name}.parquet", None, None,
                        "split file missing; run the upstream stage first")
    parts = []
    for p in files:
        part = read(p)
        missing = [c for c in COLUMNS if c not in column_names(part)]
        if missing:
            raise DataError(p, None, missing[0], "column missing from stage output")
        parts.append(part)
    return parts



def read_split_table(folder: str | os.PathLike, name: str) -> "pa.Table":
    """A split's shards as one pyarrow Table (strings stay in Arrow buffers: ~1 byte a character)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [t.select(list(COLUMNS)) for t in _read_shards(folder, name, pq.read_table, lambda t: t.column_names)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]



def read_dataset(folder: str | os.PathLike) -> tuple[dict[str, pd.DataFrame], list[str]]:
    folder = Path(folder)
    splits = {}
    for name in SPLITS:
        parts = _read_shards(folder, name, pd.read_parquet, lambda df: df.columns)
        splits[name] = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    labels = read_json(folder / "labels.json")
    return splits, labels



def first_duplicate(values) -> tuple[int, int] | None:
    """(position of the first value seen before, position of that earlier value) in an Arrow string
    array or list of chunks, or None when all differ. The common all-distinct case costs one hash set
    (pc.unique), not a code per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array(values, type=pa.string())
    distinct = len(pc.unique(values))
    release_memory()  # the hash set
    if distinct == len(values):
        return None
    codes = pd.Series(pc.dictionary_encode(values.combine_chunks()).indices.to_numpy(zero_copy_only=False))
    at = int(np.flatnonzero(codes.duplicated().to_numpy())[0])
    return at, int(np.flatnonzero(codes.to_numpy() == codes.iat[at])[0])



def release_memory() -> None:
    """Hand memory freed since the last call back to the OS: Arrow's allocator (mimalloc) keeps freed
    buffers for reuse, and a streaming stage frees a part's buffers and then allocates the next part's
    in other sizes, so without this its resident size grows with the input it has already let go."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()



def check_splits_kept(stage: str, rows_in: dict[str, int], rows_out: dict[str, int],
                      why: dict[str, str], files: dict[str, str]) -> None:
    """A split that had rows must keep at least one: an empty validation/test split only fails later
    (in evaluate), far from the stage that emptied it. `why`: split -> what removed its rows."""
    for s in SPLITS:
        if rows_in.get(s, 0) and not rows_out.get(s, 0):
            raise DataError(files[s], None, None, f"{stage} would remove all {rows_in[s]} rows of the {s} split "
                            f"({why.get(s) or 'see the removals'}); an empty {s} split is refused")



# ---------------------------------------------------------------- labels
LABEL_SEPARATOR = "|"



def split_labels(value) -> list[str]:
    """The labels of one multi-label cell ("a|b" -> ["a", "b"]), blanks dropped."""
    return [p.strip() for p in str(value).split(LABEL_SEPARATOR) if p.strip()]



def encode_labels(df: pd.DataFrame, labels: Sequence[str], problem_type: str, file: str = "train") -> np.ndarray:
    """Label strings -> int ids [n] (single_label) or a multi-hot float matrix [n, K] (multi_label)."""
    index = {name: i for i, name in enumerate(labels)}
    if problem_type == "single_label":
        out = np.empty(len(df), dtype=np.int64)
        for row, value in enumerate(df["label"].tolist()):
            if value not in index:
                raise DataError(file, row, "label", f"label {value!r} is not in labels.json")
            out[row] = index[value]
        return out
    out = np.zeros((len(df), len(labels)), dtype=np.float32)
    for row, value in enumerate(df["label"].tolist()):
        parts = split_labels(value)
        if not parts:
            raise DataError(file, row, "label", "empty multi-label value")
        for p in parts:
            if p not in index:
                raise DataError(file, row, "label", f"label {p!r} (from {value!r}, split on "
                                f"{LABEL_SEPARATOR!r}) is not in labels.json")
            out[row, index[p]] = 1.0
    return out

