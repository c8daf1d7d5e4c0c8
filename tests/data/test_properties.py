"""Property-based tests (hypothesis) of the readers and of dedupe: for any generated table, every row is
kept or rejected/removed with a reason, and every kept text comes back byte for byte."""
from __future__ import annotations

import json

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domaintune.core.errors import DataError
from domaintune.core.params import DedupeParams, IngestParams
from domaintune.data.dataset import SPLITS
from domaintune.data.dedupe import REASONS, dedupe
from domaintune.data.ingest import ingest
from domaintune.data.sources import parse_delimited, read_delimited, read_jsonl, read_source

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])
# Characters that break naive readers: quotes, both delimiters, every line break, unicode, controls.
HOSTILE = st.sampled_from(list('"",\t\n\r ;|\\\'') + ["\r\n", "é", "😀", "\u2028", "\x00", "\ufeff", "ß"])
TEXT = st.lists(st.one_of(HOSTILE, st.text(min_size=1, max_size=4)), max_size=12).map("".join)


def rfc_field(v: str, delim: str) -> str:
    """RFC 4180 writer: quote a field holding the delimiter, a quote or a line break."""
    if any(c in v for c in (delim, '"', "\n", "\r")) or v == "":
        return '"' + v.replace('"', '""') + '"'
    return v


@SETTINGS
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=15), delim=st.sampled_from([",", "\t"]),
       eol=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_rfc_quoted_tables_round_trip_exactly(tmp_path, rows, delim, eol, bom):
    path = tmp_path / ("t.csv" if delim == "," else "t.tsv")
    body = eol.join(delim.join(rfc_field(v, delim) for v in row) for row in [("text", "label")] + rows) + eol
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))
    table = read_delimited(path, delim)
    assert table.bad == {}
    assert list(table.frame.columns) == ["text", "label"]
    assert [tuple(r) for r in table.frame.itertuples(index=False)] == rows
    assert table.rows == list(range(1, len(rows) + 1))


# A field as people type it in a spreadsheet-less TSV: never quoted by a writer, quotes anywhere but at
# the start, or a leading "word" followed by more text ("urgent" please help).
PLAIN = st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), min_size=1, max_size=20)
TYPED = st.one_of(PLAIN.filter(lambda t: not t.startswith('"')),
                  st.tuples(st.text(st.characters(blacklist_characters='\t\n\r"', blacklist_categories=("Cs",)),
                                    max_size=6), PLAIN.filter(lambda t: t[0] not in '\t"'))
                  .map(lambda p: f'"{p[0]}"{p[1]}'))


@SETTINGS
@given(texts=st.lists(TYPED, min_size=1, max_size=20))
def test_unquoted_tsv_keeps_every_quote_and_never_merges_or_splits_rows(tmp_path, texts):
    texts = [t for t in texts if t.strip("\ufeff")]  # a BOM-only or blank line is not a record
    path = tmp_path / "t.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\tx\n" for t in texts), encoding="utf-8")
    table = read_delimited(path, "\t")
    assert table.bad == {}
    assert table.frame["text"].tolist() == texts
    assert table.lines == list(range(2, len(texts) + 2))  # one record per line


@SETTINGS
@given(garbage=st.lists(st.tuples(TEXT, st.sampled_from(["a", "b", ""])), max_size=10))
def test_any_delimited_file_every_record_is_kept_or_rejected_with_a_reason(tmp_path, garbage):
    clean = [f"clean row {i},{'ab'[i % 2]}" for i in range(4)]
    lines = ["text,label"] + clean + [f"{t},{lab}" for t, lab in garbage]
    path = tmp_path / "g.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    raw = path.read_bytes().decode("utf-8", "surrogateescape")  # no universal newlines: "\r" stays
    parsed = list(parse_delimited(raw, ","))[1:]
    records, multiline = len(parsed), sum(r.last_line > r.line for r in parsed)
    p = IngestParams(source=str(path), on_bad_row="skip", split={"train": 1.0, "validation": 0.0, "test": 0.0})
    res = ingest(read_source(str(path)), p, 0)
    kept = res.splits["train"]
    assert res.rows_read == records
    assert res.files == {str(path): {"records": records, "kept": len(kept), "rejected": len(res.rejected),
                                     "multiline_rows": multiline}}
    assert res.rejected["reason"].notna().all() and res.rejected["detail"].str.len().gt(0).all()
    for text in kept["text"]:  # kept text is what the file holds (unescaped only inside a quoted field)
        assert text in raw or text.replace('"', '""') in raw
    assert set(kept["id"]) | set(f"g:{r}" for r in res.rejected["row"]) == {f"g:{i}" for i in range(1, records + 1)}


@SETTINGS
@given(rows=st.lists(st.tuples(st.text(max_size=20).filter(lambda t: t.strip() != ""),
                               st.one_of(st.text(min_size=1, max_size=5), st.integers(), st.floats(allow_nan=False),
                                         st.none())), min_size=1, max_size=15), ascii_only=st.booleans())
def test_jsonl_texts_round_trip_and_labels_follow_one_rule(tmp_path, rows, ascii_only):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": lab}, ensure_ascii=ascii_only) for t, lab in rows) + "\n",
                    encoding="utf-8", errors="surrogatepass")
    table = read_jsonl(path)
    has_surrogate = [any(0xD800 <= ord(c) <= 0xDFFF for c in t) for t, _ in rows]
    got = table.frame["text"].tolist()
    for (text, _), back, odd in zip(rows, got, has_surrogate):
        if not odd:
            assert back == text
    # numbers stay exactly as json.dumps wrote them: the label rule of text formats
    labels = table.frame["label"].tolist()
    for (_, lab), back in zip(rows, labels):
        if isinstance(lab, (int, float)) and not isinstance(lab, bool):
            assert back == json.dumps(lab)


# ---------------------------------------------------------------- dedupe

WORDS = st.sampled_from(["refund", "Refund", "card", "ＣＡＲＤ", "  ", "\t", "ß", "ss", "parcel", "late", "\u00a0"])
DTEXT = st.lists(WORDS, min_size=1, max_size=6).map(" ".join).filter(lambda t: t.strip() != "")
ROW = st.tuples(DTEXT, st.sampled_from(["x", "y", "z"]))


@SETTINGS
@given(train=st.lists(ROW, min_size=1, max_size=25), validation=st.lists(ROW, max_size=8),
       test=st.lists(ROW, max_size=8), near=st.booleans(), policy=st.sampled_from(["drop", "majority"]))
def test_dedupe_every_row_is_kept_or_removed_with_a_reason_and_kept_texts_are_untouched(train, validation, test,
                                                                                      near, policy):
    splits = {s: pd.DataFrame([{"id": f"{s}{i}", "text": t, "label": lab, "split": s} for i, (t, lab) in enumerate(rows)],
                              columns=["id", "text", "label", "split"])
              for s, rows in zip(SPLITS, (train, validation, test))}
    p = DedupeParams(near_duplicates=near, conflict_policy=policy, on_empty_class="drop")
    try:
        res = dedupe(splits, p, 0)
    except DataError as exc:  # only the documented refusals: an emptied split, fewer than two classes
        assert "an empty" in str(exc) or "a classifier needs at least two" in str(exc)
        return
    kept = pd.concat(res.splits.values(), ignore_index=True)
    before = pd.concat(splits.values(), ignore_index=True).set_index("id")
    assert len(kept) + len(res.removed) == len(before)
    assert set(kept["id"]).isdisjoint(res.removed["id"]) and set(kept["id"]) | set(res.removed["id"]) == set(before.index)
    assert res.removed["reason"].isin(REASONS).all()
    for rid, text, label, split in kept[["id", "text", "label", "split"]].itertuples(index=False):
        assert (text, label, split) == tuple(before.loc[rid, ["text", "label", "split"]])
    for kid in res.removed["kept_id"]:
        assert kid == "" or kid in set(kept["id"]) or kid in set(res.removed["id"])
    assert set(res.labels) == set(res.splits["train"]["label"])
    assert set(kept["label"]) <= set(res.labels)
