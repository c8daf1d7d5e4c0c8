"""Writes the hostile input corpus next to this file (run it to regenerate; the files are committed).

Each file is small and hand-made to break one promise of the ingest stage (or of `predict` / `monitor`, which
read inputs with the same readers); tests/data/test_hostile_inputs.py holds the expected outcome of each ingest
case, tests/predict/test_predict.py and tests/pipelines/test_cli.py those of predict and monitor. Binary and
environment-dependent cases (Parquet, symlinks, huge fields, JSON nested 50,000 deep) are generated inside the
test instead.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(n: int, labels=("billing", "login"), start: int = 1) -> list[tuple[str, str]]:
    return [(f"ticket number {i} about {labels[i % len(labels)]}", labels[i % len(labels)])
            for i in range(start, start + n)]


def csv_bytes(lines: list[str], sep: str = ",", eol: str = "\n") -> bytes:
    return eol.join(lines).encode() + eol.encode()


QUOTE_OPENS_FIELD = [  # (text as the user typed it, label); every text must come back exactly
    ('"urgent" please help', "billing"),
    ('he said "hi" twice', "login"),
    ('5" screen cracked on arrival', "billing"),
    ('"refund" "now"', "login"),
    ('"" empty quotes first', "billing"),
    ('ends with a quote"', "login"),
    ('"a" b "c', "billing"),
    ("it's fine", "login"),
    ('"urgent" call me back', "billing"),
    ('no quotes at all', "login"),
    ('"why" is my card blocked', "billing"),
    ('"login" fails "again"', "login"),
]


def main() -> None:
    files: dict[str, bytes] = {}
    body = ["text\tlabel"] + [f"{t}\t{lab}" for t, lab in QUOTE_OPENS_FIELD]
    files["quote_opens_field.tsv"] = csv_bytes(body)
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in rows(8)]
    lines[3] = '"never closed, billing'
    files["unbalanced_quote.csv"] = csv_bytes(lines)
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in rows(8)]
    lines[2] = '"starts on this line,billing'
    lines[3] = 'and closes here" with more text,login'
    files["quote_closed_on_a_later_line.csv"] = csv_bytes(lines)
    files["empty.csv"] = b""
    files["header_only.csv"] = b"text,label\n"
    files["bom_crlf.csv"] = b"\xef\xbb\xbf" + csv_bytes(["text,label"] + [f"{t},{lab}" for t, lab in rows(12)], eol="\r\n")
    files["wrong_delimiter.csv"] = csv_bytes(["text\tlabel"] + [f"{t}\t{lab}" for t, lab in rows(6)])
    data = csv_bytes(["text,label"] + [f"{t},{lab}" for t, lab in rows(6)])
    files["bad_utf8_text.csv"] = data.replace(b"ticket number 2 ", b"ticket nu\xffmber 2 ")
    data = csv_bytes(["text\tlabel"] + [f"{t}\t{lab}" for t, lab in rows(6)])
    files["bad_utf8_label.tsv"] = data.replace(b"about login\tlogin", b"about login\tlog\xc3\x28in", 1)
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in rows(12)]
    lines[2] = '"first line\nsecond line, with a comma",login'
    lines[5] = '"a ""quoted"" word\r\nover CRLF",billing'
    files["embedded_newlines.csv"] = csv_bytes(lines)
    lines = ["ticket_id,text,label"] + [f"T{i},{t},{lab}" for i, (t, lab) in enumerate(rows(6), start=1)]
    lines[4] = "T2,a different ticket reusing an id,login"
    files["duplicate_ids.csv"] = csv_bytes(lines)
    files["one_class.csv"] = csv_bytes(["text,label"] + [f"{t},billing" for t, _ in rows(6)])
    lines = ["text,label,part"] + [f"{t},{lab},train" for t, lab in rows(10)]
    lines.append("my warranty claim,warranty,test")
    lines.append("another login question,login,test")
    files["label_only_in_test.csv"] = csv_bytes(lines)
    jl = [json.dumps({"text": t, "label": lab}) for t, lab in rows(6)]
    jl[2] = '{"text": "broken", oops}'
    files["malformed_middle.jsonl"] = ("\n".join(jl) + "\n").encode()
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in rows(6)]
    lines[4] = "one,too,many"
    files["extra_field.csv"] = csv_bytes(lines)
    # every spelling of "no label": blank, NaN, null, N/A, None (and their JSON/Parquet forms in the test)
    lines = ["text,label"] + [f"{t},{lab}" for t, lab in rows(12)]
    for k, spelling in zip((2, 4, 6, 8, 10), ("", "NaN", "null", "N/A", "None")):
        lines[k] = f"row {k} has no label,{spelling}"
    files["missing_labels.csv"] = csv_bytes(lines)
    jl = [json.dumps({"text": t, "label": lab}) for t, lab in rows(12)]
    for k, spelling in zip((1, 3, 5, 7, 9), ('""', "NaN", "null", '"N/A"', '"None"')):
        jl[k] = f'{{"text": "row {k + 1} has no label", "label": {spelling}}}'
    files["missing_labels.jsonl"] = ("\n".join(jl) + "\n").encode()
    lines = ["text,label"] + [f"numeric label text {i} {lab}," + lab for i, lab in
                              enumerate(["1", "1.0", "01"] * 4)]
    files["numeric_labels.csv"] = csv_bytes(lines)
    jl = [f'{{"text": "numeric label text {i}", "label": {lab}}}' for i, lab in enumerate(["1", "1.0", "2"] * 4)]
    files["numeric_labels.jsonl"] = ("\n".join(jl) + "\n").encode()
    files["one_row_per_class.csv"] = csv_bytes(["text,label"] + [f"{t},{lab}" for t, lab in rows(2)])
    clean = "\n".join(["text,label"] + [f"{t},{lab}" for t, lab in rows(6)]) + "\n"
    files["utf16.csv"] = clean.encode("utf-16")
    files["old_mac_line_ends.csv"] = clean.replace("\n", "\r").encode()
    files["batch_bad_utf8.txt"] = b"first text\nsecond \xfe text\r\nthird text\n"
    # predict / monitor / ingest: every line end a lone CR (30 texts): refused as a whole, like old_mac_line_ends.csv
    files["old_mac_line_ends.txt"] = "".join(f"{t}\r" for t, _ in rows(30)).encode()
    # a JSON "\ud800" escape (half a UTF-16 pair, not a character) in the text of row 10 of 12
    jl = [json.dumps({"id": f"s{i}", "text": t, "label": lab}) for i, (t, lab) in enumerate(rows(12), start=1)]
    jl[9] = '{"id": "s10", "text": "half a pair \\ud800 here", "label": "login"}'
    files["lone_surrogate.jsonl"] = ("\n".join(jl) + "\n").encode()
    # ids: a string, null, missing, empty, a number, a 5,000-digit number (kept as written), true (not an id)
    ids = ['"a"', "null", None, '""', "7", "1" + "0" * 4999, "true"]
    jl = [(f'{{"id": {i}, ' if i is not None else "{") + f'"text": "ticket number {k} about billing"}}'
          for k, i in enumerate(ids, start=1)]
    files["ids.jsonl"] = ("\n".join(jl) + "\n").encode()
    # generation conversations (ingest.messages_column: messages) in CSV and JSONL: rows 1-8 good; then a number
    # of 5,000 digits in a message, a lone surrogate in a content, a lone surrogate in a role
    def conv(k: int) -> list[dict]:
        return [{"role": "user", "content": f"question {k} about my parcel"},
                {"role": "assistant", "content": f"answer {k}: it ships today"}]
    good = [json.dumps(conv(k)) for k in range(1, 9)]
    hostile = ['[{"role": "user", "content": "q", "n": 1' + "0" * 4999 + '}, {"role": "assistant", "content": "a"}]',
               '[{"role": "user", "content": "q \\ud800"}, {"role": "assistant", "content": "a"}]',
               '[{"role": "\\udfff", "content": "q"}, {"role": "assistant", "content": "a"}]']
    cells = good + hostile
    files["messages_hostile.csv"] = csv_bytes(["id,messages"] + [f'c{k},"{c.replace(chr(34), chr(34) * 2)}"'
                                                                 for k, c in enumerate(cells, start=1)])
    files["messages_hostile.jsonl"] = ("".join(f'{{"id": "c{k}", "messages": {c}}}\n'
                                               for k, c in enumerate(cells, start=1))).encode()
    for name, data in files.items():
        (HERE / name).write_bytes(data)


if __name__ == "__main__":
    main()
