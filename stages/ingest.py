"""Stage ingest: a labelled source -> data/ingested (train/validation/test Parquet + labels + rejected rows).

The source is a CSV/TSV/JSONL/Parquet file, a folder of them, or `hf:<name>`
(see domaintune/sources.py). Splits come from the source itself (per-split
files or `ingest.split_column`) or from a stratified split by `ingest.split`
and `base.seed`. Row-level problems (empty text, missing label, bytes that are
not UTF-8, a label unseen in train, ...) stop the stage with file/row/column
(`on_bad_row: error`) or go to rejected.csv and the metrics (`skip`);
dataset-level problems (a missing column, one class only) always stop it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from domaintune.data import SPLITS, DataError, atomic_output, write_dataset, write_json
from domaintune.params import IngestParams, load_params
from domaintune.sources import SPLIT_ALIASES, RawTable, read_source
from domaintune.stage import run_stage, stage_parser

log = logging.getLogger("domaintune")

REJECTED_COLUMNS = ["file", "row", "field", "reason", "detail", "text"]


@dataclass
class IngestResult:
    splits: dict[str, pd.DataFrame]
    labels: list[str]
    rejected: pd.DataFrame
    rows_read: int
    split_source: str


def _blank(values: pd.Series) -> pd.Series:
    """True where a cell is missing or only whitespace."""
    return values.isna() | values.astype(str).str.strip().eq("")


def _as_text(v):
    # Numbers in a text column are still text to a classifier; containers are not.
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float, np.integer, np.floating)):
        return str(v)
    return None


def _printable(text):
    # rejected.csv stays valid UTF-8: bytes that were not UTF-8 are shown as \xNN escapes.
    if not isinstance(text, str):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _as_label(v):
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)  # a label 3 read as 3.0 (pandas/NaN upcasting) is still "3"
    t = _as_text(v)
    return None if t is None else t.strip()


def _table_rows(t: RawTable, p: IngestParams) -> pd.DataFrame:
    """One table -> rows with id/text/label/split plus the first problem found in each row."""
    cols = list(t.frame.columns)
    need = [p.text_column, p.label_column]
    if p.id_column:
        need.append(p.id_column)
    if p.split_column and t.split is None:
        need.append(p.split_column)
    for c in need:
        if c not in cols:
            raise DataError(t.file, None, c, f"column missing; columns found: {cols}")
    n = len(t.frame)
    out = pd.DataFrame({
        "file": t.file,
        "row": np.asarray(t.rows, dtype=np.int64),
        "text": [_as_text(v) for v in t.frame[p.text_column]],
        "label": [_as_label(v) for v in t.frame[p.label_column]],
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
        hits = [pr for pr in problems if pr[0] is None or pr[0] in used]
        if hits:
            field.iat[i], reason.iat[i], detail.iat[i] = hits[0]
    if p.id_column:
        mark(_blank(out["id"]), p.id_column, "missing_id", lambda i: "id is empty" + line(i))
    raw_text = t.frame[p.text_column]
    mark(out["text"].isna() & raw_text.notna(), p.text_column, "bad_text",
         lambda i: f"text is a {type(raw_text.iat[i]).__name__}, not a string" + line(i))
    mark(_blank(out["text"]), p.text_column, "empty_text", lambda i: "text is empty or whitespace only" + line(i))
    mark(_blank(out["label"]), p.label_column, "missing_label", lambda i: "label is missing" + line(i))
    if p.split_column and t.split is None:
        raw = t.frame[p.split_column]
        mark(out["split"].isna(), p.split_column, "bad_split",
             lambda i: f"split {raw.iat[i]!r} is not one of {sorted(SPLIT_ALIASES)}" + line(i))
    out["field"], out["reason"], out["detail"] = field.to_numpy(), reason.to_numpy(), detail.to_numpy()
    return out


def _rank_key(seed: int, ids: pd.Series) -> list[str]:
    # Order rows inside a class by a hash of (seed, id), not by position: appending
    # rows to the source then moves only a few existing rows between splits.
    return [hashlib.sha256(f"{seed}\0{i}".encode()).hexdigest() for i in ids]


def stratified_split(df: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.Series:
    """Assign each row of `df` to 'train' or one of `fractions` (name -> share of df), per class.

    Each class gives round(n * fraction) rows to each carved split, but always
    keeps at least one row in train (the largest carved count shrinks first).
    So a class too small to stratify (1-2 rows at 15%) lands entirely in train:
    it can still be learned, and validation/test never hold a class train lacks.
    """
    names = [s for s in ("test", "validation") if fractions.get(s, 0) > 0]
    assign = pd.Series("train", index=df.index, dtype=object)
    if not names or df.empty:
        return assign
    work = pd.DataFrame({"label": df["label"].to_numpy(), "key": _rank_key(seed, df["id"])}, index=df.index)
    work = work.sort_values(["label", "key"], kind="stable")
    rank = work.groupby("label", sort=False).cumcount().to_numpy()
    quota = {}
    for label, n in work.groupby("label", sort=False).size().items():
        k = {s: int(np.floor(n * fractions[s] + 0.5)) for s in names}
        while sum(k.values()) > n - 1:
            big = max(names, key=lambda s: (k[s], s == "test"))
            k[big] -= 1
        quota[label] = k
    start = np.zeros(len(work), dtype=np.int64)
    split = np.full(len(work), "train", dtype=object)
    for s in names:
        k = work["label"].map({lab: q[s] for lab, q in quota.items()}).to_numpy(dtype=np.int64)
        split[(rank >= start) & (rank < start + k)] = s
        start = start + k
    assign.loc[work.index] = split
    return assign


def ingest(tables: list[RawTable], p: IngestParams, seed: int) -> IngestResult:
    """Raw tables -> validated, split dataset (pure: no I/O)."""
    frames = [_table_rows(t, p) for t in tables]
    rows = pd.concat(frames, ignore_index=True)
    rows_read = len(rows)
    bad = rows["reason"].notna()
    if p.on_bad_row == "error" and bad.any():
        r = rows[bad].iloc[0]
        raise DataError(r["file"], int(r["row"]), r["field"], r["detail"])
    rejected = rows[bad]
    good = rows[~bad].copy()

    # Ids identify a row for every later stage (dedupe's kept_id, audit's issues): never ambiguous.
    dup = good["id"].duplicated()
    if dup.any():
        r = good[dup].iloc[0]
        first = good[good["id"] == r["id"]].iloc[0]
        raise DataError(r["file"], int(r["row"]), p.id_column or "id",
                        f"id {r['id']!r} already used by {first['file']} row {int(first['row'])}")

    if tables[0].split is not None:
        split_source = "hf" if tables[0].file.startswith("hf:") else "files"
    elif p.split_column:
        split_source = "column"
    else:
        split_source = "stratified"
    present = set(good["split"].dropna()) if split_source != "stratified" else set()
    if split_source != "stratified" and "train" not in present:
        raise DataError(tables[0].file if len(tables) == 1 else str(p.source), None, p.split_column,
                        f"the source names splits {sorted(present)} but no train split")
    # Splits the source lacks are carved out of its train rows, in the ingest.split proportions
    # (e.g. a train/test source gets validation = val/(train+val) of its train rows).
    missing = [s for s in ("validation", "test") if s not in present and p.split[s] > 0]
    if missing:
        pool = good["split"].isna() | good["split"].eq("train")
        total = p.split["train"] + sum(p.split[s] for s in missing)
        fractions = {s: p.split[s] / total for s in missing}
        good.loc[pool, "split"] = stratified_split(good[pool], fractions, seed)
        if split_source != "stratified":
            log.info("source has no %s split: carved from train by ingest.split ratios", "/".join(missing))
    good["split"] = good["split"].fillna("train")

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
        extra = good[unseen].assign(field=p.label_column, reason="unseen_label", detail=detail)
        rejected = pd.concat([rejected, extra], ignore_index=True)
        good = good[~unseen]
    if len(train_labels) < 2:
        raise DataError(tables[0].file if len(tables) == 1 else str(p.source), None, p.label_column,
                        f"only one class ({sorted(train_labels)[0]!r}) in train; a classifier needs at least two")

    splits = {s: good.loc[good["split"].eq(s), ["id", "text", "label", "split"]].reset_index(drop=True)
              for s in SPLITS}
    rejected = rejected.loc[:, REJECTED_COLUMNS].sort_values(["file", "row"], kind="stable").reset_index(drop=True)
    return IngestResult(splits, sorted(train_labels), rejected, rows_read, split_source)


def metrics_of(result: IngestResult) -> dict:
    by_reason = result.rejected["reason"].value_counts().sort_index()
    return {
        "rows_read": result.rows_read,
        "rows": {s: len(result.splits[s]) for s in SPLITS},
        "rejected": len(result.rejected),
        "rejected_by_reason": {str(k): int(v) for k, v in by_reason.items()},
        "labels": len(result.labels),
        "split_source": result.split_source,
    }


def run(args) -> None:
    p, base = load_params(args.params, "ingest", "base")
    # The command line's --source (${ingest.source} in dvc.yaml, so DVC tracks the file) wins.
    p = dataclasses.replace(p, source=args.source)
    result = ingest(read_source(args.source), p, base.seed)
    metrics = metrics_of(result)
    # Nested: the dataset and its metrics land together or not at all.
    with atomic_output(args.out) as tmp, atomic_output(args.metrics) as tmp_metrics:
        hashes = write_dataset(tmp, result.splits, result.labels)
        result.rejected.assign(text=result.rejected["text"].map(_printable)).to_csv(tmp / "rejected.csv", index=False)
        write_json(tmp_metrics, metrics)
    log.info("read %d rows -> train %d / validation %d / test %d, %d rejected, %d labels; dataset %s",
             result.rows_read, *metrics["rows"].values(), metrics["rejected"], metrics["labels"],
             hashes["dataset"][:12])


def main(argv=None) -> int:
    ap = stage_parser("ingest", __doc__.splitlines()[0], out="output dataset folder")
    ap.add_argument("--source", required=True, help="file, folder or hf:<name> (overrides ingest.source)")
    return run_stage("ingest", run, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
