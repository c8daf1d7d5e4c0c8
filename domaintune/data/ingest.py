"""Ingest, the ingest stage's work: a labelled source -> data/ingested (train/validation/test Parquet, labels,
rejected rows).

The source is a CSV/TSV/JSONL/Parquet file, a folder of them, or `hf:<name>`
(see domaintune/data/sources.py). Splits come from the source itself (per-split
files or `ingest.split_column`) or from a hash split by `ingest.split` and
`base.seed` (hash_split: a row's split depends on its id alone, so appending rows
moves none). Row-level problems (empty text, missing label, bytes that are
not UTF-8, a label unseen in train, ...) stop the stage with file/row/column
(`on_bad_row: error`) or go to rejected.csv and the metrics (`skip`);
dataset-level problems (a missing column, one class only, a validation/test split
that would be empty) always stop it. For every file, the metrics give data records
read = rows kept + rows rejected (and how many rows span several lines).

Labels, one rule for every format: a label is a string. Text formats keep it as
written, stripped (CSV/TSV cells and JSONL numbers alike: 1, 1.0 and 01 are three
classes); typed numbers (Parquet, hub datasets) become decimal digits, an integral
float its integer (3.0 -> "3"), booleans true/false. A label is missing when it is
null/NaN, blank, or one of `ingest.missing_labels` (default NaN, nan, NA, N/A, n/a,
null, NULL, None), in every format; a list or struct is a bad label.
A source with its own splits but no validation/test split gets it carved from its
train rows by `ingest.split` (a warning and `carved_splits` in the metrics), or stops
the stage with `ingest.missing_split: error`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from domaintune.core.errors import DataError, ParamsError, missing_column
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import FEEDBACK_DEFAULT, IngestParams
from domaintune.core.stage import StageIO
from domaintune.data.dataset import SPLITS, chunk_bounds, first_duplicate, release_memory, take_rows, write_dataset
from domaintune.data.sources import SPLIT_ALIASES, RawTable, iter_parts, read_delimited, read_source

log = logging.getLogger("domaintune")

REJECTED_COLUMNS = ["file", "row", "field", "reason", "detail", "text"]


@dataclass
class IngestResult:
    tables: dict  # split -> pyarrow Table (id, text, label, split)
    labels: list[str]
    rejected: pd.DataFrame
    rows_read: int
    split_source: str
    files: dict = dataclasses.field(default_factory=dict)  # file -> records, kept, rejected
    carved: list = dataclasses.field(default_factory=list)  # splits carved from the source's train rows
    feedback_rows: int = 0  # rows kept from ingest.feedback

    @property
    def splits(self) -> dict[str, pd.DataFrame]:
        return {s: t.to_pandas() for s, t in self.tables.items()}


def _blank(values: pd.Series) -> pd.Series:
    """True where a cell is missing or only whitespace."""
    return values.isna() | values.astype(str).str.strip().eq("")


def _as_text(v):
    """A cell as text, one rule for every format: strings as they are; typed numbers (JSON numbers
    already arrive as written, Parquet/hub numbers do not) as decimal digits, an integral float as
    an integer (3.0 -> "3": pandas/Arrow turn an integer column with gaps into floats), others by
    Python's shortest repr (0.5 -> "0.5"); booleans as true/false; NaN -> missing (None);
    containers (lists, structs) -> not text (None, reported as a bad cell)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if np.isnan(f):
            return None
        return str(int(f)) if f.is_integer() and abs(f) < 2**63 else repr(f)
    return None


def _kind(v) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return "a list"
    if isinstance(v, dict):
        return "a struct (mapping)"
    return f"a {type(v).__name__}"


def _printable(text):
    # rejected.csv stays valid UTF-8: bytes that were not UTF-8 are shown as \xNN escapes.
    if not isinstance(text, str):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _as_label(v, missing: frozenset = frozenset()):
    """A label cell -> its label string, or None when missing (see _as_text and ingest.missing_labels)."""
    t = _as_text(v)
    if t is None:
        return None
    t = t.strip()
    return None if t in missing else t


def _needed_columns(t: RawTable, p: IngestParams) -> list[str]:
    """The columns ingest uses from `t`; a DataError names the first one it lacks."""
    cols = list(t.frame.columns)
    need = [p.text_column, p.label_column]
    if p.id_column:
        need.append(p.id_column)
    if p.split_column and t.split is None:
        need.append(p.split_column)
    for c in need:
        if c not in cols:
            hint = ""
            if len(cols) == 1 and (seps := [d for d in ("\t", ";", ",", "|") if d in str(cols[0])]):
                hint = f" (one column whose name holds {seps[0]!r}: is the file delimited by {seps[0]!r}?)"
            raise missing_column(t.file, c, cols, hint)
    return need


def _table_rows(t: RawTable, p: IngestParams) -> pd.DataFrame:
    """One table -> rows with id/text/label/split plus the first problem found in each row."""
    need = _needed_columns(t, p)
    n = len(t.frame)
    missing = frozenset(p.missing_labels)
    out = pd.DataFrame({
        "file": t.file,
        "row": np.asarray(t.rows, dtype=np.int64),
        "text": [_as_text(v) for v in t.frame[p.text_column]],
        "label": [_as_label(v, missing) for v in t.frame[p.label_column]],
    })
    if p.id_column:
        out["id"] = [_as_label(v) for v in t.frame[p.id_column]]
    else:
        out["id"] = [f"{t.stem}:{r}" for r in t.rows]
    if t.split is not None:
        out["split"] = t.split
    elif p.split_column:
        out["split"] = [SPLIT_ALIASES.get(str(v).strip().lower()) if v is not None else None
                        for v in t.frame[p.split_column]]
    else:
        out["split"] = None
    field = pd.Series([None] * n, dtype=object)
    reason = pd.Series([None] * n, dtype=object)
    detail = pd.Series([None] * n, dtype=object)
    line = (lambda i: f" (line {t.lines[i]})") if t.lines else (lambda i: "")

    def mark(mask: pd.Series, col: str, why: str, msg) -> None:
        mask = mask.to_numpy() & reason.isna().to_numpy()
        for i in np.flatnonzero(mask):
            field.iat[i], reason.iat[i], detail.iat[i] = col, why, msg(i)

    # Order = priority when a row has several problems: the earliest is what gets reported.
    # Problems found while reading count only in the columns we use (or for the whole row).
    used = set(need)
    for i, problems in t.bad.items():
        hits = [pr for pr in problems if pr[0] is None or pr[0] in used or pr[1] == "malformed_row"]
        if hits:
            field.iat[i], reason.iat[i], detail.iat[i] = hits[0]
    for col, values in (("text", out["text"]), ("label", out["label"])) + ((("id", out["id"]),) if p.id_column else ()):
        name = {"text": p.text_column, "label": p.label_column, "id": p.id_column}[col]
        size = values.map(lambda v: len(v) if isinstance(v, str) else 0)
        mark(size > p.max_chars, name, "too_long",
             lambda i, size=size: f"{size.iat[i]:,} characters, more than ingest.max_chars ({p.max_chars:,})" + line(i))
    if p.id_column:
        mark(_blank(out["id"]), p.id_column, "missing_id", lambda i: "id is empty" + line(i))
    raw_text, raw_label = t.frame[p.text_column], t.frame[p.label_column]
    mark(out["text"].isna() & raw_text.map(lambda v: v is not None).astype(bool), p.text_column, "bad_text",
         lambda i: f"text is {_kind(raw_text.iat[i])}, not a string" + line(i))
    mark(_blank(out["text"]), p.text_column, "empty_text", lambda i: "text is empty or whitespace only" + line(i))
    is_container = raw_label.map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).astype(bool)
    mark(is_container, p.label_column, "bad_label",
         lambda i: f"label is {_kind(raw_label.iat[i])}, not a string" + line(i))
    mark(_blank(out["label"]), p.label_column, "missing_label",
         lambda i: f"label is missing ({raw_label.iat[i]!r}; blank, null and ingest.missing_labels mean no label)"
         + line(i))
    if p.split_column and t.split is None:
        raw = t.frame[p.split_column]
        mark(out["split"].isna(), p.split_column, "bad_split",
             lambda i: f"split {raw.iat[i]!r} is not one of {sorted(SPLIT_ALIASES)}" + line(i))
    out["field"], out["reason"], out["detail"] = field.to_numpy(), reason.to_numpy(), detail.to_numpy()
    return out


SPLIT_METHOD = "hash"  # metrics/ingest.json's split_method: how ingest gives a row its split (below)


def _hash_unit(seed: int, ids) -> np.ndarray:
    """Each id's point in [0, 1): the first 64 bits of sha256(seed, id), scaled. A function of the row alone."""
    sha = hashlib.sha256
    raw = b"".join([sha(f"{seed}\0{i}".encode("utf-8", "surrogatepass")).digest()[:8] for i in ids])
    return np.frombuffer(raw, dtype=">u8").astype(np.float64) / 2.0**64


def hash_split(df: pd.DataFrame, fractions: dict[str, float], seed: int, rescue: bool = True) -> pd.Series:
    """Assign each row of `df` (columns id, label) to 'train' or one of `fractions` (name -> share of df).

    Sticky: a row's split is a function of its own id and the seed. u = sha256(seed, id) as a number in
    [0, 1); u < test share -> test, then the next validation share -> validation, else train. Appending
    rows to the source (or removing others) moves no existing row between splits, so a row a model was
    tested on stays a test row for the next version; the realised shares are the params' up to binomial
    noise (each row is one draw), per class too.

    Two rescues for data too small for the rule, and they are the only way a row can move:
    - a class none of whose rows falls in train (at 70/15/15: a one-row class 30% of the time, a
      two-row class 9%, five rows 0.2%) gets its row with the largest u (the nearest to train) put in
      train, so validation/test never hold a class train lacks;
    - then a split with a positive share that got no row at all (a few dozen rows or fewer) takes the
      train row with the smallest u among the classes that keep another train row (none such: it stays
      empty, and ingest refuses the source).
    A row's split differs from its hash's only while it is rescued, so between two versions of a source
    a row moves only if one of them rescued it (e.g. a rescued row goes back once its class gains a train
    row of its own). Without one- or two-row classes and with more than a few dozen rows, nothing is
    rescued and nothing moves.
    rescue=False skips both (rows split next to others that hold their classes and splits).
    """
    names = [s for s in ("test", "validation") if fractions.get(s, 0) > 0]
    assign = pd.Series("train", index=df.index, dtype=object)
    if not names or df.empty:
        return assign
    u = _hash_unit(seed, df["id"])
    split = np.full(len(df), "train", dtype=object)
    edge = 0.0
    for s in names:  # test first, then validation
        split[(u >= edge) & (u < edge + fractions[s])] = s
        edge += fractions[s]
    if not rescue:  # rows split next to others that hold their classes (feedback rows of a source with splits)
        assign[:] = split
        return assign
    labels = df["label"].to_numpy()
    work = pd.DataFrame({"label": labels, "u": u, "train": split == "train"})
    has_train = work.groupby("label", sort=False)["train"].transform("any").to_numpy()
    if not has_train.all():
        rescue = work[~has_train].groupby("label", sort=False)["u"].idxmax().to_numpy()
        split[rescue] = "train"
    for s in names:
        if (split == s).any():
            continue
        train = split == "train"
        spare = train & (pd.Series(train).groupby(labels).transform("sum").to_numpy() >= 2)
        if spare.any():
            split[np.flatnonzero(spare)[np.argmin(u[spare])]] = s
    assign[:] = split
    return assign


def _source_name(tables: list[RawTable], p: IngestParams) -> str:
    return tables[0].file if len(tables) == 1 else str(p.source)


def _assign_splits(good: pd.DataFrame, ids, tables: list[RawTable], p: IngestParams,
                   seed: int, fb: np.ndarray) -> tuple[str, list[str]]:
    """Fill good["split"] in place; returns (where the splits came from, splits carved from train). `fb`: the
    feedback rows, split by the sticky rule whatever the source does (with the source's rows when ingest
    splits those too)."""
    if tables[0].split is not None:
        split_source = "hf" if tables[0].file.startswith("hf:") else "files"
    elif p.split_column:
        split_source = "column"
    else:
        split_source = "hash"
    present = set(good.loc[~fb, "split"].dropna()) if split_source != "hash" else set()
    if split_source != "hash" and "train" not in present:
        raise DataError(_source_name(tables, p), None, p.split_column,
                        f"the source names splits {sorted(present)} but no train split")
    # Splits the source lacks are carved out of its train rows, in the ingest.split proportions
    # (e.g. a train/test source gets validation = val/(train+val) of its train rows).
    missing = [s for s in ("validation", "test") if s not in present and p.split[s] > 0]
    carved = missing if split_source != "hash" else []
    if carved and p.missing_split == "error":
        raise DataError(_source_name(tables, p), None, p.split_column,
                        f"the source has its own splits {sorted(present)} but no {'/'.join(carved)} split; "
                        "add it, or set ingest.missing_split: carve to take it from train by ingest.split")
    if split_source != "hash" and fb.any():  # the source's own splits hold its classes: no rescue here
        shares = {s: p.split[s] for s in ("validation", "test")}
        rows = good[fb].assign(id=_ids_at(ids, np.flatnonzero(fb)))
        good.loc[fb, "split"] = hash_split(rows, shares, seed, rescue=False).to_numpy()
    if missing:
        pool = good["split"].isna() | (good["split"].eq("train") & ~fb)
        total = p.split["train"] + sum(p.split[s] for s in missing)
        fractions = {s: p.split[s] / total for s in missing}
        pooled = good[pool].assign(id=_ids_at(ids, np.flatnonzero(pool.to_numpy())))  # ids as str only here
        good.loc[pool, "split"] = hash_split(pooled, fractions, seed)
    if carved:
        log.warning("source has no %s split: carved from its train rows by ingest.split (ingest.missing_split: "
                    "carve)", "/".join(carved))
    good["split"] = good["split"].fillna("train")
    return split_source, carved


def _file_counts(read: dict[str, int], good: pd.DataFrame, rejected: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per file: data records read = rows kept + rows rejected (checked: a mismatch is a bug)."""
    kept, rej = (df.groupby("file", sort=False).size() for df in (good, rejected))
    out = {}
    for f, n in read.items():
        k, r = int(kept.get(f, 0)), int(rej.get(f, 0))
        if k + r != n:
            raise RuntimeError(f"ingest lost rows of {f}: read {n}, kept {k}, rejected {r}")
        out[str(f)] = {"records": int(n), "kept": k, "rejected": r}
    return out


INGEST_CHUNK = 200_000  # rows checked at a time: bounds the Python objects alive besides the kept ids/labels
CANON_LABELS = 65_536  # labels held as one string each (see _check_chunks); beyond, they are not classes


def _check_chunks(tables: list[RawTable], p: IngestParams, feedback: list[RawTable] = ()):
    """Every row checked, CHUNK rows at a time (a streamed Parquet table is read that way too). Returns
    the kept rows' file/row/label/split (pandas), their texts and ids (lists of Arrow chunks, one per part,
    not Python), the rejected rows and the data records read per file. on_bad_row error stops at the first
    bad row, in source order. Each label is kept as one Python string for the whole run (the first seen):
    a part's own copies would each pin one of Python's memory arenas for as long as the run lasts.
    `feedback` tables are read with their own columns (feedback_view)."""
    import pyarrow as pa

    views = [(t, p) for t in tables] + [(t, feedback_view(p)) for t in feedback]
    for t, p in views:  # a missing column anywhere stops the stage before any row is judged
        _needed_columns(t, p)
    kept, texts, ids, rejected, read, canon = [], [], [], [], {}, {}
    for t, p in views:
        read.setdefault(t.file, 0)  # a feedback file may have no rows yet
        for part in iter_parts(t, INGEST_CHUNK):
            rows = _table_rows(part, p)
            read[t.file] = read.get(t.file, 0) + len(rows)
            bad = rows["reason"].notna()
            if p.on_bad_row == "error" and bad.any():
                r = rows[bad].iloc[0]
                raise DataError(r["file"], int(r["row"]), r["field"], r["detail"])
            rejected.append(rows[bad])
            good = rows[~bad]
            texts.append(pa.array(good["text"].tolist(), type=pa.string()))
            ids.append(pa.array(good["id"].tolist(), type=pa.string()))
            label = good["label"].tolist()
            if len(canon) < CANON_LABELS:  # classes, not free text (a generation task's responses)
                label = [canon.setdefault(v, v) for v in label]
            label = np.array(label, dtype=object)
            kept.append(pd.DataFrame({"file": t.file, "row": good["row"].to_numpy(), "label": label,
                                      "split": good["split"].to_numpy()}))
            del rows, good, bad, part
            release_memory()
    return pd.concat(kept, ignore_index=True), texts, ids, pd.concat(rejected, ignore_index=True), read


FEEDBACK_COLUMNS = ("id", "text", "label")  # the header of ingest.feedback (what `domaintune feedback` writes)


def feedback_view(p: IngestParams) -> IngestParams:
    """The params a feedback file is checked with: its own columns id,text,label (the source's may differ),
    no split column (its rows get splits by the sticky rule), the source's other rules."""
    return dataclasses.replace(p, id_column="id", text_column="text", label_column="label", split_column=None)


def _has_rows(path: Path) -> bool:
    """Whether a feedback CSV holds anything past its header line."""
    with path.open("rb") as fh:
        fh.readline()
        return any(line.strip() for line in fh)


def read_feedback(path: str) -> list[RawTable]:
    """ingest.feedback: the CSV `domaintune feedback` appends to (header id,text,label; header-only = no rows
    yet), read by the project's CSV reader. A missing file is an error naming the param."""
    where = Path(path)
    if not where.exists():
        raise DataError(where, None, None, "file not found; ingest.feedback names it (create it with the header "
                                           "'id,text,label', or set ingest.feedback: null)")
    if not where.is_file():
        raise DataError(where, None, None, "ingest.feedback names a folder, not a CSV file")
    return [read_delimited(where, ",", stream=True, empty_ok=True)]


def _filter_chunks(chunks: list, keep: np.ndarray) -> list:
    """The rows of a list of Arrow chunks where `keep` is true, chunk by chunk; the input list is emptied as it
    goes, so at most one chunk is held twice."""
    import pyarrow as pa

    out, start = [], 0
    while chunks:
        c = chunks.pop(0)
        out.append(c.filter(pa.array(keep[start:start + len(c)], type=pa.bool_())))
        start += len(c)
    return out


def _split_tables(good: pd.DataFrame, texts: list, ids: list) -> dict:
    """The three split tables; `texts` and `ids` (lists of chunks aligned with good's rows) are emptied as
    they are cut, chunk by chunk, so the texts are never held twice."""
    import pyarrow as pa

    label, split = good["label"].to_numpy(), good["split"].to_numpy()
    cut = {s: {"id": [], "text": []} for s in SPLITS}
    start = 0
    while texts:
        t, i = texts.pop(0), ids.pop(0)
        here = split[start:start + len(t)]
        for s in SPLITS:
            keep = pa.array(here == s)
            cut[s]["text"].append(t.filter(keep))
            cut[s]["id"].append(i.filter(keep))
        start += len(t)
        del t, i
        release_memory()
    out = {}
    for s in SPLITS:
        mask = split == s
        out[s] = pa.table({"id": pa.chunked_array(cut[s]["id"], type=pa.string()),
                           "text": pa.chunked_array(cut[s]["text"], type=pa.string()),
                           "label": pa.array(label[mask], type=pa.string()),
                           "split": pa.array(split[mask], type=pa.string())})
    return out


def _ids_at(ids: list, positions) -> list:
    return take_rows(ids, chunk_bounds(ids), positions).to_pylist()


def ingest(tables: list[RawTable], p: IngestParams, seed: int, classes: bool = True,
           feedback: list[RawTable] = ()) -> IngestResult:
    """Raw tables -> validated, split dataset (pure: no I/O). classes=False (prompt -> response data): `p`
    names the prompt as text_column and the response as label_column (IngestParams.for_prompts), a response
    is no class (no label set, split at random). `feedback`: the ingest.feedback tables (read_feedback), checked
    like the source and split by the sticky rule; duplicates of other rows are dedupe's business.
    Rows are checked in chunks and the kept texts and ids held in Arrow (see _check_chunks)."""
    import pyarrow as pa

    good, texts, ids, rejected, read = _check_chunks(tables, p, feedback)
    feedback_files = {t.file for t in feedback}
    for t in tables:  # known once read (a streamed CSV finds them as it goes)
        if t.multiline:  # legal (RFC 4180 quoted line breaks), but a person should know lines != rows
            log.info("%s: %d rows span several lines (quoted line breaks), the first is row %d (line %d)",
                     t.file, len(t.multiline), t.multiline[0], t.multiline_lines[0])
    rows_read = sum(read.values())

    # Ids identify a row for every later stage (dedupe's kept_id, audit's issues): never ambiguous.
    # (a hash set over the ids in Arrow: data.first_duplicate)
    dup = first_duplicate(ids)
    if dup is not None:
        r, first = good.iloc[dup[0]], good.iloc[dup[1]]
        hint = "" if p.id_column or r["file"] in feedback_files else (
            " (ids are <file stem>:<row>: give the files different names, or set ingest.id_column)")
        used = f"already used by {first['file']} row {int(first['row'])}{hint}"
        field = "id" if r["file"] in feedback_files else p.id_column or "id"
        raise DataError(r["file"], int(r["row"]), field, f"id {_ids_at(ids, [dup[0]])[0]!r} {used}")

    if not classes:  # a response is no class: split at random (seeded), keep no label set
        responses, good["label"] = good["label"], ""
    fb = good["file"].isin(feedback_files).to_numpy()
    split_source, carved = _assign_splits(good, ids, tables, p, seed, fb)
    if not classes:
        good["label"] = responses
        return _generation_result(good, texts, ids, rejected, read, rows_read, split_source, carved, tables)
    train_labels = set(good.loc[good["split"].eq("train"), "label"])
    if not train_labels:
        raise DataError(str(p.source), None, p.label_column, "no usable rows in train")
    unseen = good["split"].ne("train") & ~good["label"].isin(train_labels)
    if unseen.any():
        shown = sorted(train_labels)[:20]
        detail = [f"label {lab!r} ({s}) never appears in train; train labels: {shown}"
                  for lab, s in zip(good.loc[unseen, "label"], good.loc[unseen, "split"])]
        if p.on_bad_row == "error":
            r = good[unseen].iloc[0]
            raise DataError(r["file"], int(r["row"]), p.label_column, detail[0])
        text = pa.chunked_array(texts, type=pa.string()).filter(pa.array(unseen.to_numpy())).to_pylist()
        extra = good[unseen].assign(text=text, field=p.label_column, reason="unseen_label", detail=detail)
        rejected = pd.concat([rejected, extra], ignore_index=True)
        texts, ids = _filter_chunks(texts, ~unseen.to_numpy()), _filter_chunks(ids, ~unseen.to_numpy())
        good = good[~unseen]
    if len(train_labels) < 2:
        raise DataError(_source_name(tables, p), None, p.label_column,
                        f"only one class ({sorted(train_labels)[0]!r}) in train; a classifier needs at least two")

    splits = _split_tables(good, texts, ids)
    counts = {s: len(df) for s, df in splits.items()}
    for s in ("validation", "test"):
        if not counts[s] and (p.split[s] > 0 or split_source != "hash"):
            raise DataError(_source_name(tables, p), None, None,
                            f"the {s} split would be empty (rows: {counts}, rejected: {len(rejected)}): too few "
                            f"rows per class for ingest.split ({' / '.join(f'{k} {p.split[k]}' for k in SPLITS)}; each "
                            "class keeps one row in train); add "
                            f"rows, or set ingest.split.{s}: 0 to go without")
    files = _file_counts(read, good, rejected)
    for t in [*tables, *feedback]:
        files[t.file]["multiline_rows"] = len(t.multiline)
    rejected = rejected.loc[:, REJECTED_COLUMNS].sort_values(["file", "row"], kind="stable").reset_index(drop=True)
    return IngestResult(splits, sorted(train_labels), rejected, rows_read, split_source, files, carved,
                        int(good["file"].isin(feedback_files).sum()))


def _generation_result(good, texts, ids, rejected, read, rows_read, split_source, carved, tables) -> IngestResult:
    splits = _split_tables(good, texts, ids)
    if not len(splits["train"]):
        raise DataError(tables[0].file, None, None, "no usable rows in train")
    files = _file_counts(read, good, rejected)
    rejected = rejected.loc[:, REJECTED_COLUMNS].sort_values(["file", "row"], kind="stable").reset_index(drop=True)
    return IngestResult(splits, [], rejected, rows_read, split_source, files, carved)


def metrics_of(result: IngestResult) -> dict:
    by_reason = result.rejected["reason"].value_counts().sort_index()
    return {
        "rows_read": result.rows_read,
        "rows": {s: len(result.tables[s]) for s in SPLITS},
        "rejected": len(result.rejected),
        "rejected_by_reason": {str(k): int(v) for k, v in by_reason.items()},
        "labels": len(result.labels),
        "split_source": result.split_source,
        "split_method": SPLIT_METHOD,  # rows ingest splits (all, or those carved from train): hash_split
        "carved_splits": result.carved,
        "feedback_rows": result.feedback_rows,  # rows kept from ingest.feedback (counted in rows and files too)
        # per file: data records read = rows kept + rows rejected
        "files": result.files,
    }


def _rejected_csv(rejected: pd.DataFrame) -> pd.DataFrame:
    # A too_long cell is shown by its start: rejected.csv must stay a file a person can open.
    def show(text, reason):
        text = _printable(text)
        if reason == "too_long" and isinstance(text, str) and len(text) > 200:
            return f"{text[:200]}... ({len(text):,} characters)"
        return text
    return rejected.assign(text=[show(t, r) for t, r in zip(rejected["text"], rejected["reason"])])


def ingest_stage(io: StageIO, p: IngestParams, seed: int, classes: bool = True,
                 prepare: Callable[[RawTable], None] | None = None,
                 report: Callable[[dict], dict] | None = None) -> None:
    """The ingest stage for a task: read io.source (Parquet part by part; whole tables when `prepare`
    rewrites them, e.g. chat columns), check and split, write the dataset and its metrics together.
    `report(split tables)` adds the task's own metrics (a classifier's text lengths in tokens)."""
    tables = read_source(io.source, stream=prepare is None)
    for t in tables if prepare else ():
        prepare(t)
    # The default file holds no labels until `domaintune feedback` writes it: absent or header-only there means
    # none yet (not read, not listed); a path the user named must exist.
    default = p.feedback == FEEDBACK_DEFAULT
    named = p.feedback and not (default and not (Path(p.feedback).is_file() and _has_rows(Path(p.feedback))))
    feedback = read_feedback(p.feedback) if named else []
    if feedback and not classes:  # the shipped default names a header-only file: nothing to refuse
        if _has_rows(Path(p.feedback)):
            raise ParamsError("params.yaml: ingest.feedback: feedback labels (id,text,label) are for base.task "
                              "classification; set it to null for prompt -> response data")
        feedback = []
    result = ingest(tables, p, seed, classes, feedback)
    metrics = metrics_of(result)
    if report is not None:
        metrics.update(report(result.tables))
    # Nested: the dataset and its metrics land together or not at all.
    with atomic_output(io.out) as tmp, atomic_output(io.metrics) as tmp_metrics:
        hashes = write_dataset(tmp, result.tables, result.labels)
        _rejected_csv(result.rejected).to_csv(tmp / "rejected.csv", index=False)
        write_json(tmp_metrics, metrics)
    log.info("read %d rows -> train %d / validation %d / test %d, %d rejected, %d labels; dataset %s",
             result.rows_read, *metrics["rows"].values(), metrics["rejected"], metrics["labels"],
             hashes["dataset"][:12])
