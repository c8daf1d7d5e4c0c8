"""`domaintune predict`: calibrated predictions for a file of texts, from the workspace's export or a version's;
on a generation export, a generated response per row.

    domaintune predict tickets.csv --out predictions.jsonl [--variant onnx-int8] [--top-k 3]
    domaintune predict tickets.parquet --version v1.2.0 --out predictions.csv
    domaintune predict prompts.jsonl --model models/export --max-new-tokens 64 --out responses.jsonl

The export is opened by domaintune.tasks.load_predictor, the one loader `serve` and `monitor` use too.

The library work (streamed reading, bad-row checks, output) is domaintune/predict/batch.py;
`--version` materialises the version's models/export from the DVC cache or remote into
.domaintune/releases/ (domaintune/registry/release.py), md5-verified, without touching the workspace.

A classifier's predictions are also logged (domaintune/predict/log.py; --prediction-log, default
reports/predictions/predict.jsonl under --repo, next to serve's log, where `domaintune feedback` looks;
'none' turns it off) under the version that made them: --version's name, "workspace" for the project's
models/export, "dir:<folder>" for another --model folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from domaintune.core.device import MAX_BATCH_TOKENS
from domaintune.core.errors import DataError, StageError
from domaintune.core.io import atomic_output
from domaintune.core.params import project_id_column
from domaintune.core.stage import check_apart
from domaintune.export.variants import REQUESTS as EXPORT_VARIANTS  # the one list, and auto
from domaintune.export.variants import variant_arg
from domaintune.predict.log import BACKUPS, LOG_TEXT, MAX_BYTES, PredictionLog, file_sha256
from domaintune.registry import release
from domaintune.registry.plumbing import RegistryError
from domaintune.tasks import export_task, load_predictor

EPILOG = """examples:
  domaintune predict new_tickets.csv --out predictions.jsonl
  domaintune predict texts.txt --variant onnx-int8 --top-k 5 > predictions.jsonl
  domaintune predict batch.parquet --version v1.2.0 --out predictions.csv --on-bad-row skip
  domaintune predict prompts.csv --out responses.jsonl          # a generation export: id, text, response
  domaintune predict prompts.txt --temperature 0.7 --seed 1 --stop "###"
  domaintune predict tickets.csv --out p.jsonl --prediction-log none   # do not log the predictions
"""
PREDICTION_LOG = "reports/predictions/predict.jsonl"  # --prediction-log's default, under --repo
GENERATION_FLAGS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")
RULES = {"max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
         "temperature": (lambda v: v >= 0, "must be >= 0 (0: greedy)"),
         "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
         "stop": (all, "must be a non-empty text")}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="predict labels (or generate responses) for a CSV/TSV/JSONL/Parquet/TXT file",
                       description="Calibrated predictions (label, confidence, top-k) for every row of a file, "
                                   "streamed in chunks; on a generation export, a generated response per row.",
                       epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="file of texts: .csv, .tsv, .jsonl, .parquet, or .txt (one text per line)")
    p.add_argument("--out", default=None, help="output file, .jsonl or .csv (default: JSONL on stdout)")
    p.add_argument("--variant", default="auto", type=variant_arg, choices=list(EXPORT_VARIANTS),
                   help="exported variant to run (default: auto, the fastest that passed its gates as the export "
                        "stage measured them, float32 for an export without that record; 'float' is accepted for "
                        "float32)")
    p.add_argument("--version", default=None,
                   help="a published version (e.g. v1.2.0) instead of --model, fetched from the DVC cache/remote "
                        "(default: none, use --model)")
    p.add_argument("--model", default="models/export", help="export folder (default: models/export)")
    p.add_argument("--top-k", type=int, default=3, help="labels with confidences per row (default: 3)")
    p.add_argument("--text-column", default="text", help="column/field holding the text (default: text)")
    p.add_argument("--id-column", default=None,
                   help="column/field holding the row id (default: params.yaml's ingest.id_column, else id); "
                        "a file without it gets row numbers as ids, said in one line on stderr")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                   help="error: stop at the first bad row, writing nothing; skip: list bad rows on stderr and "
                        "predict the rest (default: error)")
    p.add_argument("--chunk-size", type=int, default=1024, help="rows read and predicted at a time (default: 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="the most texts per model call (default: 64)")
    p.add_argument("--max-batch-tokens", type=int, default=MAX_BATCH_TOKENS, metavar="TOKENS",
                   help="token budget of one model call: texts run sorted by token length, (longest text) x (texts) "
                        f"<= it, a longer text alone; answers stay in file order (default: {MAX_BATCH_TOKENS})")
    p.add_argument("--repo", default=".", help="project root, for --version and the prediction log (default: .)")
    p.add_argument("--prediction-log", default=PREDICTION_LOG, metavar="FILE",
                   help="JSONL every classifier prediction is logged to (id, version, calibrated probabilities), "
                        f"for `domaintune feedback`; relative to --repo; 'none': off (default: {PREDICTION_LOG})")
    p.add_argument("--log-text", default="hash", choices=LOG_TEXT,
                   help="how the prediction log stores each text: its SHA-256, the text, or neither (default: hash)")
    p.add_argument("--prediction-log-mb", type=float, default=MAX_BYTES / (1 << 20), metavar="MB",
                   help=f"the prediction log is rotated before it passes this size (default: {MAX_BYTES >> 20})")
    p.add_argument("--prediction-log-files", type=int, default=BACKUPS, metavar="N",
                   help=f"rotated prediction log files kept (default: {BACKUPS})")
    g = p.add_argument_group("generation exports (defaults: the export's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per row at most")
    g.add_argument("--temperature", type=float, default=None, help="0: greedy; above 0: sampled")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop a response at this text, which is cut off (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (default: none)")
    p.set_defaults(fn=cmd_predict)
    return p


def _model_folder(args) -> Path:
    if args.version is None:
        return Path(args.model)
    rel = release.materialise(Path(args.repo), args.version)
    print(f"predict: {rel.tag} ({rel.files} files verified) at {rel.path}", file=sys.stderr)
    return rel.path


def generation_options(args, task: str, folder: Path) -> dict | None:
    """The generate() options of the command line (None for a classifier export, which takes none)."""
    given = {k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) is not None}
    if task != "generation":
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise DataError(folder, None, None, f"{flag} is for a generation export; this is a {task} export")
        return None
    for key, value in given.items():
        if key in RULES and not RULES[key][0](value):
            raise DataError("command line", None, None, f"--{key.replace('_', '-')} {value!r}: {RULES[key][1]}")
    return given


def check_output(args) -> None:
    """--out, before anything is read or a model loads (core.stage.check_apart, the stages' check): not the
    input file, not inside it, not a folder holding it, not in the --model folder, and not an existing folder
    domaintune did not write (atomic_output would replace it); the prediction log likewise, and not --out."""
    paths = {"file": args.input, **({"--model": args.model} if args.version is None else {})}
    if args.out:
        check_apart({**paths, "--out": args.out}, ["--out"], ["--out"], how="--out must not be, contain or sit "
                    "inside a path predict reads (writing it would replace or alter that path)")
    log = prediction_log_path(args)
    if log is not None:
        check_apart({**paths, **({"--out": args.out} if args.out else {}), "--prediction-log": str(log)},
                    ["--prediction-log"], how="the prediction log must not be, contain or sit inside a path predict "
                    "reads or writes (writing it would alter that path)")


def prediction_log_path(args) -> Path | None:
    """--prediction-log: 'none' (off), else the file, relative to --repo."""
    value = getattr(args, "prediction_log", "none")
    return None if value.strip().lower() == "none" else Path(args.repo) / value


def model_version(args, folder: Path) -> str:
    """The name the prediction log gives the model (module doc)."""
    if args.version is not None:
        return args.version
    if folder.resolve() == (Path(args.repo) / "models" / "export").resolve():
        return "workspace"
    return f"dir:{folder.resolve()}"


def id_column(args) -> str:
    """--id-column, else the project's own ingest.id_column (params.yaml in --repo), else "id"."""
    return args.id_column or project_id_column(Path(args.repo) / "params.yaml")


def run(args) -> dict:
    # lazy: loads numpy
    from domaintune.modeling.encoders import set_threads

    # lazy: loads numpy, pandas
    from domaintune.predict import batch as bp

    src, out = Path(args.input), Path(args.out) if args.out else None
    check_output(args)
    bp.input_format(src)
    fmt = bp.output_format(out)
    if args.top_k < 1 or args.chunk_size < 1 or args.batch_size < 1 or args.max_batch_tokens < 1:
        raise DataError("command line", None, None,
                        "--top-k, --chunk-size, --batch-size and --max-batch-tokens must be >= 1")
    folder = _model_folder(args)
    if not folder.is_dir():
        raise DataError(folder / "model.json", None, None, "no exported model here; run the export stage "
                        "(`dvc repro export`) or give --model / --version")
    generation = generation_options(args, export_task(folder), folder)  # a folder that is no export stops here
    set_threads()
    budget = {"max_batch_tokens": args.max_batch_tokens} if generation is None else {}  # a causal LM: by count
    predictor = load_predictor(folder, variant=args.variant, batch_size=args.batch_size, **budget)
    args.id_column = id_column(args)
    kw = dict(text_column=args.text_column, id_column=args.id_column, top_k=args.top_k, chunk=args.chunk_size,
              on_bad_row=args.on_bad_row, generation=generation, log=prediction_logger(args, folder, generation))
    choice = getattr(predictor, "variant_choice", None)  # a classifier: the variant auto resolved to, and why
    try:
        if out is None:
            result = bp.predict_file(predictor, src, sys.stdout, fmt, **kw)
        else:
            with atomic_output(out) as tmp:
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    result = bp.predict_file(predictor, src, f, fmt, **kw)
        return {**result, "variant": choice.note if choice is not None else None}
    finally:
        if kw["log"] is not None:
            kw["log"].log.close()


def prediction_logger(args, folder: Path, generation):
    """The classifier's prediction logger (None: off, or a generation export, which has no probabilities)."""
    # lazy: loads numpy, pandas
    from domaintune.predict import batch as bp

    path = prediction_log_path(args)
    if path is None or generation is not None or export_task(folder) == "token_classification":  # no class probs
        return None
    if args.prediction_log_mb <= 0 or args.prediction_log_files < 0:
        raise DataError("command line", None, None, "--prediction-log-mb must be > 0 and --prediction-log-files >= 0")
    log = PredictionLog(path, args.log_text, max(1, int(args.prediction_log_mb * (1 << 20))), args.prediction_log_files)
    return bp.PredictionLogger(log, model_version(args, folder), file_sha256(args.input))


def cmd_predict(args) -> int:
    try:
        result = run(args)
    except (DataError, StageError, RegistryError, ValueError) as exc:
        print(f"domaintune predict: error: {exc}", file=sys.stderr)
        return 2
    if result["ids"] == "row numbers" and Path(args.input).suffix.lower() != ".txt":
        print(f"domaintune predict: {args.input} has no id column {args.id_column!r}; ids are row numbers "
              "(--id-column names another)" + ("; the prediction log keys them <input sha256[:12]>:<row>"
                                               if prediction_log_path(args) else ""), file=sys.stderr)
    for row, fld, problem in result["bad_rows"]:
        where = f"row {row}" + (f": field {fld!r}" if fld else "")
        print(f"domaintune predict: skipped {args.input}: {where}: {problem}", file=sys.stderr)
    print(f"domaintune predict: {result['predicted']:,} of {result['rows']:,} rows predicted"
          + (f", {len(result['bad_rows']):,} bad rows skipped" if result["bad_rows"] else "")
          + (f", {result['blank_lines']:,} blank lines ignored" if result["blank_lines"] else "")
          + f" in {result['seconds']:.1f} s" + (f" -> {args.out}" if args.out else "")
          + (f" (variant: {result['variant']})" if result.get("variant") else ""), file=sys.stderr)
    return 0
