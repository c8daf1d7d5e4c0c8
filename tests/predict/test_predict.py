"""`domaintune predict`: every input format, JSONL/CSV output, bad rows, streaming in chunks, --variant, --version."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _fake_pipeline import BIN, make_fake_repo, set_params, sh, workspace
from evalkit import LABELS, make_model, make_split

from domaintune.predict import batch as bp

REPO = Path(__file__).resolve().parents[2]
TEXTS = make_split("test", 3)["text"].tolist()  # 9 texts


@pytest.fixture(scope="module")
def export(tiny_bert, tmp_path_factory):
    from domaintune.export import artifacts
    from domaintune.modeling.encoders import load_classifier

    root = tmp_path_factory.mktemp("predict")
    ft = make_model(tiny_bert, root / "ft", seed=7)
    model, tok, meta = load_classifier(ft)
    meta = {**{k: v for k, v in meta.items() if k not in ("adapter", "num_labels", "hidden_size")},
            "temperature": 2.0, "base_encoder": None}
    out = root / "export"
    artifacts.write_float32(model, tok, out, meta)
    artifacts.write_onnx(out, model, tok, meta)
    return root, ft, out


def cli(*argv) -> int:
    from pipelines.cli import build_parser

    argv = [str(a) for a in argv]
    if "--id-column" not in argv and "--repo" not in argv:  # these files' ids are in "id"; the repo's is ticket_id
        argv += ["--id-column", "id"]
    args = build_parser().parse_args(["predict", *argv])
    return args.fn(args)


def write_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"t{i}" for i in range(len(TEXTS))]
    df = pd.DataFrame({"id": ids, "text": TEXTS})
    paths = {"csv": folder / "in.csv", "tsv": folder / "in.tsv", "jsonl": folder / "in.jsonl",
             "parquet": folder / "in.parquet", "txt": folder / "in.txt"}
    df.to_csv(paths["csv"], index=False)
    df.to_csv(paths["tsv"], index=False, sep="\t")
    paths["jsonl"].write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, TEXTS)))
    df.to_parquet(paths["parquet"], index=False)
    paths["txt"].write_text("\n".join(TEXTS) + "\n")
    return paths


def read_out(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{**r, "confidence": float(r["confidence"]), "top_k": json.loads(r["top_k"])} for r in rows]
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "txt"])
def test_every_input_format(export, tmp_path, fmt, capsys):
    from domaintune.predict.predictor import Predictor

    _, _, out = export
    src = write_inputs(tmp_path)[fmt]
    dest = tmp_path / ("out.csv" if fmt in ("tsv", "parquet") else "out.jsonl")
    assert cli(src, "--model", out, "--out", dest, "--top-k", 2) == 0
    rows = read_out(dest)
    p = Predictor.load(out)
    probs = p.predict_proba(TEXTS)
    assert [r["text"] for r in rows] == TEXTS
    assert [r["id"] for r in rows] == ([str(i + 1) for i in range(9)] if fmt == "txt" else [f"t{i}" for i in range(9)])
    assert [r["label"] for r in rows] == p.predict(TEXTS)
    np.testing.assert_allclose([r["confidence"] for r in rows], probs.max(axis=1), atol=1e-6)
    for r, row in zip(rows, probs):
        assert len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"]
        assert r["top_k"][1]["confidence"] == pytest.approx(np.sort(row)[-2], abs=1e-6)
    assert "9 of 9 rows predicted" in capsys.readouterr().err


def test_stdout_jsonl_and_onnx_variant_in_a_real_process(export, tmp_path):
    _, _, out = export
    src = write_inputs(tmp_path)["txt"]
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", str(src), "--model", str(out),
                        "--variant", "onnx"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["text"] for x in rows] == TEXTS and set(rows[0]) == {"id", "text", "label", "confidence", "top_k"}
    assert len(rows[0]["top_k"]) == 3 and all(x["label"] in LABELS for x in rows)
    # Not a terminal: plain progress lines, no bar.
    assert "predict: 9/9 rows (100%)" in r.stderr and "\r" not in r.stderr


BAD = [  # (format, file content, expected row, field, problem)
    ("csv", "id,text\na,fine text\nb,\nc,more\n", 2, "text", "empty text"),
    ("csv", "id,text\na,fine text\nb,x,extra\n", 2, None, "has 3 fields, the header has 2"),
    ("jsonl", '{"id": 1, "text": "ok"}\n{"id": 2, "text": [5]}\n', 2, "text", "not text: list"),
    ("jsonl", '{"id": 1, "text": "ok"}\n\n{"id": 2, "txt": "x"}\n', 3, "text", "missing"),
    ("jsonl", '{"id": 1, "text": "ok"}\n{"id": 2,\n', 2, None, "invalid JSON"),
]


@pytest.mark.parametrize("fmt, content, row, field, problem", BAD)
def test_bad_row_stops_with_file_row_field_and_writes_nothing(export, tmp_path, capsys, fmt, content, row, field,
                                                              problem):
    _, _, out = export
    src = tmp_path / f"bad.{fmt}"
    src.write_text(content)
    dest = tmp_path / "out.jsonl"
    assert cli(src, "--model", out, "--out", dest) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src}: row {row}" in err[0] and problem in err[0]
    assert (f"field {field!r}" in err[0]) == (field is not None)
    assert not dest.exists() and not list(tmp_path.glob(".out.jsonl.tmp-*"))


def test_bad_rows_skipped_are_each_listed_and_counted(export, tmp_path, capsys):
    _, _, out = export
    src = tmp_path / "mixed.csv"
    src.write_bytes(b"id,text\na,refund please\nb,\nc,bad \xff byte\n\nd,password reset\n")
    dest = tmp_path / "out.csv"
    assert cli(src, "--model", out, "--out", dest, "--on-bad-row", "skip") == 0
    assert [r["id"] for r in read_out(dest)] == ["a", "d"]
    err = capsys.readouterr().err
    assert f"skipped {src}: row 2: field 'text': empty text" in err
    assert f"skipped {src}: row 3: field 'text': bytes that are not UTF-8" in err
    assert "2 of 4 rows predicted, 2 bad rows skipped in" in err  # a blank line is no CSV record (as in ingest)


def test_parquet_without_the_text_column_and_unknown_formats(export, tmp_path, capsys):
    _, _, out = export
    pd.DataFrame({"body": ["x"]}).to_parquet(tmp_path / "a.parquet")
    assert cli(tmp_path / "a.parquet", "--model", out) == 2
    assert "field 'text': column missing; columns found" in capsys.readouterr().err
    (tmp_path / "a.xlsx").write_text("x")
    assert cli(tmp_path / "a.xlsx", "--model", out) == 2
    assert "unknown input format '.xlsx'" in capsys.readouterr().err
    src = write_inputs(tmp_path)["txt"]
    assert cli(src, "--model", out, "--out", tmp_path / "o.txt") == 2
    assert "unknown output format '.txt'" in capsys.readouterr().err
    assert cli(src, "--model", tmp_path / "nomodel") == 2
    assert "model.json: no exported model here" in capsys.readouterr().err


def test_streams_in_chunks(export, tmp_path):
    """The file is read and predicted `chunk` rows at a time: no call ever sees more."""
    from domaintune.predict.predictor import Predictor

    _, _, out = export
    p = Predictor.load(out)
    sizes = []
    real = p.predict_proba
    p.predict_proba = lambda texts: sizes.append(len(texts)) or real(texts)
    src = tmp_path / "many.txt"
    src.write_text("".join(f"ticket {i} about a refund\n" for i in range(23)))
    with open(tmp_path / "o.jsonl", "w") as f:
        res = bp.predict_file(p, src, f, "jsonl", chunk=5, progress_stream=open("/dev/null", "w"))
    assert sizes == [5, 5, 5, 5, 3] and res["predicted"] == 23
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 23


def test_version_predicts_with_a_published_model_without_touching_the_workspace(export, tmp_path):
    from domaintune.predict.predictor import Predictor
    from domaintune.registry import versions

    _, ft, _ = export
    root = make_fake_repo(tmp_path / "proj", classifier=ft)
    sh(root, str(BIN / "dvc"), "repro", "-q")
    v1, _ = versions.publish(root, "first", stage="prod")  # T = epochs / 3 = 1.0
    set_params(root, {"finetune.epochs": 6})  # the workspace's export now has T = 2.0
    sh(root, "git", "commit", "-qam", "epochs 6")
    sh(root, str(BIN / "dvc"), "repro", "-q")
    before = workspace(root)
    src = write_inputs(tmp_path / "in")["jsonl"]
    assert cli(src, "--version", v1.version, "--repo", root, "--out", tmp_path / "v1.jsonl") == 0
    assert cli(src, "--model", root / "models/export", "--out", tmp_path / "ws.jsonl") == 0
    v1_rows, ws_rows = read_out(tmp_path / "v1.jsonl"), read_out(tmp_path / "ws.jsonl")
    released = Predictor.load(root / ".domaintune/releases" / v1.tag / "models/export")
    assert released.temperature == 1.0 and Predictor.load(root / "models/export").temperature == 2.0
    np.testing.assert_allclose([r["confidence"] for r in v1_rows], released.predict_proba(TEXTS).max(1), atol=1e-6)
    assert [r["confidence"] for r in v1_rows] != [r["confidence"] for r in ws_rows]
    log = "reports/predictions/predict.jsonl"  # the one file predict adds: its prediction log, under --repo
    after = workspace(root)
    logged = [json.loads(x) for x in after.pop(log).decode().splitlines()]
    after.pop(log + ".lock")  # its writers' lock
    assert after == before
    assert [r["version"] for r in logged] == [v1.version] * len(TEXTS)
    import hashlib  # the project's id column is ticket_id: these rows are numbered, keyed by the file's hash
    sha = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    assert [r["id"] for r in logged] == [f"{sha}:{i + 1}" for i in range(len(TEXTS))]
    assert cli(src, "--version", "v9.9.9", "--repo", root) == 2


# ---------------------------------------------------------------- --out never deletes what it did not write

HOSTILE = REPO / "tests" / "hostile"


def test_out_that_is_a_foreign_folder_or_overlaps_the_input_is_refused_before_anything_is_read(tmp_path, capsys):
    """Exit 2, one line, nothing touched, and before the input is read or a model is looked for (--model names
    no folder, and the input would itself be an error: UTF-16)."""
    src = tmp_path / "two.txt"
    src.write_bytes("first\nsecond\n".encode("utf-16"))
    spark = tmp_path / "spark_out.csv"  # an existing folder of part files
    spark.mkdir()
    (spark / "part-00000.csv").write_text("id,text\n1,a\n")
    batch = tmp_path / "batch.jsonl"  # a folder whose input file sits inside --out
    batch.mkdir()
    (batch / "input.txt").write_text("first\nsecond\n")
    model = tmp_path / "models" / "export"
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        (src, spark, f"{spark}: --out: an existing folder that domaintune did not write (it has no .domaintune-output "
                     "file); refusing to replace it: move it away or choose another output path"),
        (batch / "input.txt", batch, f"--out {batch} contains the input file {batch / 'input.txt'}; --out must not be, "
                                     "contain or sit inside a path predict reads (writing it would replace or alter "
                                     "that path)"),
        (src, src.with_suffix(".txt"), f"--out {src} is the input file {src}; --out must not be"),
        (src, model / "predictions.jsonl", f"--out {model / 'predictions.jsonl'} is inside the input --model {model}"),
    ]
    for inp, out, expected in cases:
        assert cli(inp, "--model", model, "--out", out) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"domaintune predict: error: {expected}"), err
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- hostile inputs: the readers of ingest and monitor

def test_a_lone_surrogate_is_a_bad_row_found_before_anything_is_written(export, tmp_path, capsys):
    """Row 10 of 12 holds a JSON "\\ud800" escape: with chunks of 4, today's reader wrote 8 rows to stdout, then
    raised TypeError in the tokenizer, and --on-bad-row skip did not skip it."""
    _, _, out = export
    src = HOSTILE / "lone_surrogate.jsonl"
    assert cli(src, "--model", out, "--chunk-size", 4) == 2
    got = capsys.readouterr()
    assert got.out == ""  # found by the first pass: nothing was written, even to stdout
    assert got.err.splitlines() == [f"domaintune predict: error: {src}: row 10: field 'text': holds a lone surrogate "
                                    "\\ud800 at character 12 (a JSON \\u escape of half a UTF-16 pair: not a character, "
                                    "it cannot be written as UTF-8)"]
    assert cli(src, "--model", out, "--chunk-size", 4, "--on-bad-row", "skip") == 0
    got = capsys.readouterr()
    assert [json.loads(line)["id"] for line in got.out.splitlines()] == [f"s{i}" for i in range(1, 13) if i != 10]
    assert f"skipped {src}: row 10: field 'text': holds a lone surrogate" in got.err
    assert "11 of 12 rows predicted, 1 bad rows skipped" in got.err


def test_ids_null_missing_or_empty_are_the_row_number_and_numbers_stay_as_written(export, tmp_path, capsys):
    _, _, out = export
    src = HOSTILE / "ids.jsonl"
    dest = tmp_path / "ids.jsonl"
    assert cli(src, "--model", out, "--out", dest) == 2  # row 7's id is true: not an id
    assert capsys.readouterr().err.splitlines() == [f"domaintune predict: error: {src}: row 7: field 'id': not a "
                                                    "string or number: bool True"]
    assert not dest.exists()
    assert cli(src, "--model", out, "--out", dest, "--on-bad-row", "skip") == 0
    assert [r["id"] for r in read_out(dest)] == ["a", "2", "3", "4", "7", "1" + "0" * 4999]


def test_a_cell_over_csv_s_field_limit_a_cr_only_file_and_deep_json(export, tmp_path, capsys):
    _, _, out = export
    big = tmp_path / "big.csv"  # Python's csv module refuses fields over 131,072 characters; ingest takes 1,000,000
    big.write_text("id,text\na," + "refund " * 30_000 + "\nb,password reset\n")
    assert cli(big, "--model", out, "--out", tmp_path / "big.jsonl") == 0
    assert [r["id"] for r in read_out(tmp_path / "big.jsonl")] == ["a", "b"]
    capsys.readouterr()
    mac = HOSTILE / "old_mac_line_ends.txt"  # 30 texts, lone CR line ends: refused as in CSV (and monitor, ingest)
    assert cli(mac, "--model", out) == 2
    got = capsys.readouterr()
    assert got.out == "" and got.err.splitlines() == [
        f"domaintune predict: error: {mac}: lines end with a lone carriage return (old Mac style); save the file with "
        "\\n or \\r\\n line ends"]
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n{"text": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    assert cli(deep, "--model", out, "--on-bad-row", "skip") == 0
    got = capsys.readouterr()
    assert len(got.out.splitlines()) == 1
    assert f"skipped {deep}: row 2: invalid JSON: nested deeper than" in got.err


def test_ids_default_to_the_projects_id_column_and_row_numbers_are_announced(export, tmp_path, capsys):
    """The project's ingest.id_column (ticket_id) is predict's default id column; a file without it gets row
    numbers, said in one line on stderr."""
    model = export[2]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("ingest:\n  id_column: ticket_id\n")
    src = tmp_path / "t.csv"
    pd.DataFrame({"ticket_id": ["A-7", "B-9"], "text": TEXTS[:2]}).to_csv(src, index=False)
    out = tmp_path / "p.jsonl"
    assert cli(src, "--model", model, "--out", out, "--repo", repo) == 0
    assert [r["id"] for r in read_out(out)] == ["A-7", "B-9"]
    assert "row numbers" not in capsys.readouterr().err
    plain = tmp_path / "plain.csv"
    pd.DataFrame({"text": TEXTS[:2]}).to_csv(plain, index=False)
    assert cli(plain, "--model", model, "--out", tmp_path / "q.jsonl", "--repo", repo) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "row numbers" in ln]
    assert len(lines) == 1 and "'ticket_id'" in lines[0] and str(plain) in lines[0]
    assert [r["id"] for r in read_out(tmp_path / "q.jsonl")] == ["1", "2"]


def test_predictions_are_logged_under_row_ids_with_the_version_and_the_input_hash(export, tmp_path):
    """predict logs every classifier prediction (default reports/predictions/predict.jsonl under --repo): the row's
    id, or <input sha256[:12]>:<row> for a row numbered for want of one, the model version, the calibrated
    probabilities; --prediction-log none logs nothing."""
    import hashlib

    from domaintune.predict.predictor import Predictor

    model = export[2]
    repo = tmp_path / "repo"
    repo.mkdir()
    paths = write_inputs(tmp_path / "in")
    assert cli(paths["csv"], "--model", model, "--out", tmp_path / "o.jsonl", "--repo", repo) == 0
    assert cli(paths["txt"], "--model", model, "--out", tmp_path / "o2.jsonl", "--repo", repo) == 0
    log = repo / "reports" / "predictions" / "predict.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    probs = Predictor.load(model).predict_proba(TEXTS)
    sha = {k: hashlib.sha256(paths[k].read_bytes()).hexdigest() for k in ("csv", "txt")}
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(9)] + [f"{sha['txt'][:12]}:{i + 1}" for i in range(9)]
    assert [r["input_sha256"] for r in rows] == [sha["csv"]] * 9 + [sha["txt"]] * 9
    assert {r["version"] for r in rows} == {f"dir:{model.resolve()}"} and {r["role"] for r in rows} == {"predict"}
    for r, p in zip(rows, np.vstack([probs, probs])):
        assert np.allclose(list(r["probabilities"].values()), p, atol=1e-5) and "text" not in r
    assert [r["label"] for r in rows[:9]] == [x["label"] for x in read_out(tmp_path / "o.jsonl")]
    assert cli(paths["csv"], "--model", model, "--out", tmp_path / "o3.jsonl", "--repo", repo,
               "--prediction-log", "none") == 0
    assert len(log.read_text().splitlines()) == 18


def test_a_missing_column_reads_the_same_in_ingest_predict_and_monitor(tmp_path):
    """One wording for one error, whichever command reads the file."""
    from domaintune.core.errors import DataError
    from domaintune.core.params import IngestParams
    from domaintune.data.ingest import ingest
    from domaintune.data.sources import read_source
    from domaintune.monitor.monitoring import read_batch
    from domaintune.predict.batch import scan_file

    src = tmp_path / "b.csv"
    pd.DataFrame({"body": ["a b", "c d"], "label": ["x", "y"]}).to_csv(src, index=False)
    messages = []
    for read in (lambda: ingest(read_source(str(src)), IngestParams(source=str(src)), 0),
                 lambda: scan_file(src, "text", "id", "error"), lambda: read_batch(src, "text")):
        with pytest.raises(DataError) as exc:
            read()
        messages.append(str(exc.value))
    assert messages == [f"{src}: field 'text': column missing; columns found: ['body', 'label']"] * 3


MIXED = ["", "x " * 300, "Émoji 🙂 and ÜNICODE", *TEXTS, "ok", " ".join(TEXTS)]  # short, over-long, in between


@pytest.mark.parametrize("variant", ["float32", "onnx"])
def test_token_budget_batches_give_the_fixed_count_answers_in_request_order(export, variant, monkeypatch):
    """Predictor with a token budget: the same calibrated probabilities (1e-5) in request order as by count, every
    model call within the budget but a lone over-long text (max_length 32 > budget 40 / 2), at most batch_size texts."""
    from domaintune.predict.predictor import Predictor

    _, _, out = export
    texts = [MIXED[i] for i in np.random.default_rng(0).permutation(len(MIXED))]
    by_count = Predictor.load(out, variant=variant, batch_size=64, max_batch_tokens=None).predict_proba(texts)
    one_by_one = np.vstack([Predictor.load(out, variant=variant).predict_proba([t]) for t in texts[:4]])
    budget = Predictor.load(out, variant=variant, batch_size=4, max_batch_tokens=40)
    shapes = []
    if variant == "float32":
        budget.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                               with_kwargs=True)
    else:
        run = budget.runner.session.run
        monkeypatch.setattr(budget.runner, "session", type("S", (), {
            "run": staticmethod(lambda names, feed: shapes.append(feed["input_ids"].shape) or run(names, feed))}))
    probs = budget.predict_proba(texts)
    np.testing.assert_allclose(probs, by_count, atol=1e-5)
    np.testing.assert_allclose(probs[:4], one_by_one, atol=1e-5)
    assert sum(n for n, _ in shapes) == len(texts) and len(shapes) > len(texts) // 4
    assert all(n <= 4 and (n * width <= 40 or n == 1) for n, width in shapes), shapes
    assert (1, 32) in shapes  # the over-long texts ran alone


def test_max_batch_tokens_on_the_command_line(export, tmp_path, capsys):
    _, _, out = export
    paths = write_inputs(tmp_path / "in")
    assert cli(paths["csv"], "--model", out, "--out", tmp_path / "a.jsonl", "--prediction-log", "none") == 0
    assert cli(paths["csv"], "--model", out, "--out", tmp_path / "b.jsonl", "--prediction-log", "none",
               "--batch-size", "3", "--max-batch-tokens", "20") == 0
    a, b = read_out(tmp_path / "a.jsonl"), read_out(tmp_path / "b.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] == [f"t{i}" for i in range(len(TEXTS))]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([r["confidence"] for r in a], [r["confidence"] for r in b], atol=1e-5)
    capsys.readouterr()
    assert cli(paths["csv"], "--model", out, "--max-batch-tokens", "0") == 2
    assert "--max-batch-tokens must be >= 1" in capsys.readouterr().err


def test_predict_defaults_to_auto_and_logs_the_variant_that_answered(export, tmp_path, capsys):
    """`domaintune predict` without --variant runs the export's recorded fastest passing variant (here onnx, by a
    hand-written speed record), says which on stderr and in every prediction log line; --variant float32 still
    runs float32. Before: predict ran float32 unless told otherwise, and the log did not name the variant."""
    import shutil

    from domaintune.core.io import write_json
    from domaintune.predict.predictor import Predictor

    model = tmp_path / "export"
    shutil.copytree(export[2], model)
    write_json(model / "export_report.json", {"speed": {"variants": {
        "float32": {"texts_per_s": 100.0, "passed_gates": True}, "onnx": {"texts_per_s": 250.0, "passed_gates": True}}}})
    repo = tmp_path / "repo"
    repo.mkdir()
    src = write_inputs(tmp_path / "in")["csv"]
    capsys.readouterr()
    assert cli(src, "--model", model, "--out", tmp_path / "a.jsonl", "--repo", repo) == 0
    assert "(variant: onnx (auto: fastest passing, 250 texts/s measured at export))" in capsys.readouterr().err
    onnx = Predictor.load(model, variant="onnx").predict_proba(TEXTS)
    np.testing.assert_allclose([r["confidence"] for r in read_out(tmp_path / "a.jsonl")], onnx.max(1), atol=1e-6)
    assert cli(src, "--model", model, "--out", tmp_path / "b.jsonl", "--repo", repo, "--variant", "float32") == 0
    float32 = Predictor.load(model).predict_proba(TEXTS)
    np.testing.assert_allclose([r["confidence"] for r in read_out(tmp_path / "b.jsonl")], float32.max(1), atol=1e-6)
    rows = [json.loads(x) for x in (repo / "reports/predictions/predict.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["onnx"] * 9 + ["float32"] * 9


def test_an_export_that_abstains_answers_the_abstention_label_in_an_abstained_column(export, tmp_path, capsys):
    """evaluate.abstain in the export: predict writes `abstained` (CSV and JSONL) and the abstention label on
    exactly the rows Predictor abstains on; the model's own ranking stays in top_k."""
    import shutil

    from evalkit import OOS_TEXTS, add_abstention

    from domaintune.predict.predictor import Predictor

    _, _, out = export
    folder = tmp_path / "export"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("onnx"))
    train = make_split("train", 6)
    add_abstention(folder, train["text"].tolist(), train["label"].tolist(), TEXTS, method="energy", recall=0.8,
                   label="not_mine")
    texts = TEXTS + OOS_TEXTS
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": [f"t{i}" for i in range(len(texts))], "text": texts}).to_csv(src, index=False)
    p = Predictor.load(folder)
    probs, abstained = p.predict_with_abstention(texts)
    assert 0 < abstained.sum() < len(texts)
    for dest in (tmp_path / "out.csv", tmp_path / "out.jsonl"):
        assert cli(src, "--model", folder, "--out", dest) == 0
        rows = read_out(dest)
        got = [r["abstained"] in (True, "True") for r in rows]
        assert got == abstained.tolist()
        assert [r["label"] for r in rows] == p.labels_with_abstention(probs, abstained)
        assert all(r["label"] == "not_mine" for r, a in zip(rows, got) if a)
        assert all(r["top_k"][0]["label"] in LABELS for r in rows)
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == [*bp.CLASSIFIER_COLUMNS, "abstained"]
