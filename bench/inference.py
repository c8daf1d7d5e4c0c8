"""Inference benchmark on BANKING77: the transformers pipeline anchor, PyTorch float32 and bf16, every export
variant (and onnxruntime static QDQ int8, measured only), side by side.

    DOMAINTUNE_BANKING77=../shared/datasets/banking77 \
    nice -n 19 flock /tmp/heavy.lock .venv/bin/python bench/inference.py --rounds 2

Issue 26 rows (all on the same texts, the same cores, one process, one variant after the other):
  anchor_pipeline: transformers.pipeline("text-classification", batch_size=32), float32, on the fine-tune
      itself (its own pooling and head wrapped as a transformers model), shuffled test texts -> texts/s
  variants[v]["token_budget"]: Predictor.predict_proba on every test text at once, the way `domaintune predict`
      runs a chunk (sorted by token length, batches of <= 64 texts within 8,192 tokens) -> texts/s
  variants[v]["buckets"]: the same on texts of <= 16, 17-64, 65-256 and 257-512 tokens (the longer two built by
      concatenating test texts; max_length raised to 512 for them, as the fine-tune's 128 would truncate)
  bf16-autocast: PyTorch float32 weights under torch.autocast(bfloat16) (measured only: not an export variant)
  onnx-qdq: onnxruntime static QDQ int8 of onnx/, calibrated on the same train texts as openvino-int8
      (measured only, issue 26 item 1: a variant only if faster here than onnx-int8 and openvino-int8)
  auto: the export stage's own speed record (domaintune.export.classifier: texts/s on <= 512 seeded test texts,
      gate verdicts) written to the bench export's export_report.json; --variant auto resolves from it

The model is the default fine-tune (bench/banking77.py trains it once and caches it, with
the evaluate stage's temperature). Its export is written by the product's own writers
(domaintune.artifacts, what the export stage runs) and every variant is run through
domaintune.predict.predictor.Predictor.predict_proba (tokenisation + model + calibrated softmax), on the
3,080 BANKING77 test texts in a fixed shuffled order (each variant runs --rounds rounds and keeps
its fastest, as the machine is shared):
  batch 32: every test text, in requests of 32 -> p50/p95 ms per request, texts/s
  batch 1:  the first --single texts one at a time -> p50/p95 ms per text, texts/s; batch_1_stages: the first
            200 of them split into tokenise / runtime alone / the rest of Predictor.predict_proba (p50s)
plus accuracy, macro-F1 and ECE (15 bins) with the fitted temperature, and agreement with float32.
Targets (issue 11, 2 CPU cores): ONNX int8 >= 3x the batched texts/s of PyTorch float32 with
<= 0.5 points of accuracy lost; single-text p50 <= 5 ms.
Results: bench/results/inference.json.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from banking77 import cache_root, cached_finetune, load_banking77  # noqa: E402

OUT = REPO / "bench" / "results" / "inference.json"
from domaintune.export.variants import VARIANTS  # noqa: E402

NAMES = {"float32": "PyTorch float32", "int8": "PyTorch int8 (weight-only, dequantised on load)",
         "onnx": "ONNX float32 (onnxruntime)", "onnx-int8": "ONNX int8 (onnxruntime dynamic quantisation)",
         "openvino-int8": "OpenVINO int8 (NNCF static quantisation, calibrated on train texts)"}


def _code_hash() -> str:
    files = [REPO / "domaintune" / n for n in ("export/artifacts.py", "modeling/quantize.py", "modeling/encoders.py")]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def cached_export(model_folder: Path, info: dict, params, train_texts: list[str], seed: int) -> Path:
    """The fine-tune exported in every variant by domaintune.artifacts (cached next to the fine-tune)."""
    from domaintune.core.io import read_json
    from domaintune.export import artifacts
    from domaintune.modeling.encoders import load_classifier

    key = f"{model_folder.name}-{_code_hash()}-{params.int8_embeddings}-{params.onnx_opset}-" \
          f"{params.onnx_int8_per_channel}-{params.calibration_rows}-{seed}"
    out = cache_root() / f"banking77-export-{key}"
    if (out / "done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    model, tok, meta = load_classifier(model_folder / "model", merge=True)
    calib = info["calibration"]
    meta = {**{k: v for k, v in meta.items() if k not in ("adapter", "num_labels", "hidden_size")},
            "base_encoder": None, "temperature": float(calib["temperature"]), "calibration": calib}
    artifacts.write_float32(model, tok, out, meta)
    artifacts.write_int8(out, model, read_json(out / "model.json"), params.int8_embeddings)
    artifacts.write_onnx(out, model, tok, read_json(out / "model.json"), params.onnx_opset)
    artifacts.write_onnx_int8(out, params.onnx_int8_per_channel)
    artifacts.write_openvino_int8(out, tok, artifacts.calibration_texts(train_texts, params.calibration_rows, seed),
                                  int(meta.get("max_length") or 128), seed)  # as export does
    (out / "done").write_text("ok\n")
    return out


def timed_calls(fn, requests: list[list[str]]) -> np.ndarray:
    """Milliseconds per call of fn(request), after one warm-up call."""
    fn(requests[0])
    out = []
    for r in requests:
        t0 = time.perf_counter()
        fn(r)
        out.append(1000 * (time.perf_counter() - t0))
    return np.array(out)


def latency_stats(ms: np.ndarray, texts_per_call: list[int]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "texts_per_s": round(sum(texts_per_call) / (ms.sum() / 1000), 1), "calls": len(ms)}


def load_and_score(folder: Path, variant: str, test, calib: dict) -> tuple[object, dict, np.ndarray]:
    from domaintune.export.artifacts import variant_bytes
    from domaintune.export.classifier import score_variant
    from domaintune.predict.predictor import Predictor

    t0 = time.perf_counter()
    p = Predictor.load(folder, variant=variant, batch_size=32)
    load_s = time.perf_counter() - t0
    logits = p.logits(test["text"].tolist())
    quality = score_variant(logits, test, p.meta, calib)
    row = {"name": NAMES[variant], **{k: round(float(v), 4) for k, v in quality.items()},
           "size_mb": round(variant_bytes(folder, variant) / 1e6, 1), "load_seconds": round(load_s, 2)}
    return p, row, logits


def time_best_of(predictors: dict, requests: list[list[str]], batch_size: int, rounds: int) -> dict:
    """Each variant times every request `rounds` times in a row and keeps its fastest round (the
    machine is shared: the best round is the one least disturbed by other processes). Variants run
    one after the other, not interleaved: in an interleaved run PyTorch float32, timed right after
    onnxruntime, was 12x slower on single texts than the same computation as int8 (onnxruntime's
    worker threads spin after each run)."""
    out = {}
    for name, p in predictors.items():
        p.batch_size = batch_size
        runs = [timed_calls(p.predict_proba, requests) for _ in range(rounds)]
        out[name] = latency_stats(min(runs, key=lambda ms: ms.sum()), [len(r) for r in requests])
    return out


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "onnx", "onnxruntime", "openvino", "nncf", "tokenizers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


MEASURED_ONLY = {"bf16-autocast": "PyTorch float32 weights under torch.autocast(bfloat16) (measured only)",
                 "onnx-qdq": "ONNX static QDQ int8 (onnxruntime quantize_static, calibrated on train texts; "
                             "measured only)"}
STAGE_TEXTS = 200  # single texts whose time is split into tokenise / runtime / the rest (batch_1_stages)
BUCKETS = {"<=16": (1, 16, 512), "<=64": (17, 64, 512), "<=256": (65, 256, 128), "<=512": (257, 512, 64)}
# bucket: (min tokens, max tokens, texts measured): fewer of the long ones keeps the float32 rows short


def lscpu() -> dict:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    return {"model": info.get("Model name", "").strip() or _cpu(),
            "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                              "amx_int8", "avx_vnni")}}


def onnx_qdq(folder: Path, tok, calibration: list[str], max_length: int) -> Path:
    """onnxruntime static QDQ int8 of the export's onnx/ graph (U8 activations, S8 per-channel weights, MinMax
    ranges from `calibration`, one text per step at its own length), cached beside the export."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    out = folder.parent / f"{folder.name}-onnx-qdq"
    if (out / "done").exists():
        return out / "model.onnx"
    out.mkdir(parents=True, exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v.astype(np.int64) for k, v in tok([t], truncation=True, max_length=max_length,
                                                                     return_tensors="np").items()
                                if k in ("input_ids", "attention_mask")} for t in calibration])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(folder / "onnx" / "model.onnx"), str(out / "model.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    (out / "done").write_text("ok\n")
    return out / "model.onnx"


def pipeline_anchor(folder: Path, texts: list[str], rounds: int) -> dict:
    """transformers.pipeline("text-classification", batch_size=32) in float32 on the fine-tune itself: its
    encoder, pooling and head wrapped as a transformers PreTrainedModel (what a user without domaintune runs)."""
    import torch
    from transformers import PreTrainedModel, pipeline
    from transformers.modeling_outputs import SequenceClassifierOutput

    from domaintune.modeling.encoders import load_classifier

    clf, tok, meta = load_classifier(folder)
    config = clf.encoder.config
    config.id2label = dict(enumerate(meta["labels"]))
    config.label2id = {lab: i for i, lab in enumerate(meta["labels"])}

    class Wrapped(PreTrainedModel):
        config_class = type(config)
        base_model_prefix = "clf"
        _supports_sdpa = True  # the wrapped encoder keeps its own attention; this only passes transformers' check

        def __init__(self, cfg):
            super().__init__(cfg)
            self.clf = clf

        def forward(self, input_ids=None, attention_mask=None, **kw):
            return SequenceClassifierOutput(logits=self.clf(input_ids=input_ids, attention_mask=attention_mask))

    model = Wrapped(copy.deepcopy(config)).eval()
    pipe = pipeline("text-classification", model=model, tokenizer=tok, batch_size=32, device="cpu",
                    truncation=True, max_length=int(meta.get("max_length") or 128))
    with torch.inference_mode():
        pipe(texts[:64])  # warm-up
        best, got = float("inf"), None
        for _ in range(rounds):
            t0 = time.perf_counter()
            got = pipe(texts)
            best = min(best, time.perf_counter() - t0)
    return {"name": 'transformers.pipeline("text-classification", batch_size=32), float32',
            "texts_per_s": round(len(texts) / best, 1), "texts": len(texts), "rounds": rounds,
            "labels": [g["label"] for g in got], "transformers": __import__("transformers").__version__}


def bucket_texts(tok, texts: list[str], lo: int, hi: int, n: int, seed: int) -> list[str]:
    """n texts of lo..hi tokens: test texts as they are, or (hi > 64) test texts concatenated until in range."""
    rng = np.random.default_rng(seed)
    lens = {t: len(tok(t, truncation=False)["input_ids"]) for t in texts}
    if hi <= 64:
        pool = [t for t in texts if lo <= lens[t] <= hi]
        return [pool[i] for i in rng.permutation(len(pool))[:n]]
    out = []
    while len(out) < n:
        parts, total = [], 2
        while total < lo:
            t = texts[int(rng.integers(len(texts)))]
            parts.append(t)
            total += lens[t] - 2
        if total <= hi:
            out.append(" ".join(parts))
    return out


def best_texts_per_s(fn, texts: list[str], rounds: int) -> float:
    fn(texts[: min(64, len(texts))])  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(texts)
        best = min(best, time.perf_counter() - t0)
    return round(len(texts) / best, 1)


def batch_1_stages(p, texts: list[str], bf16: bool = False) -> dict:
    """Where a single text's time goes, p50 over `texts` one at a time, the three timed side by side per text (so
    load drift hits each alike): tokenise (modeling.encoders.TokenBatches, the predictor's batching), runtime (the
    model alone on the tokenised text: the runner's infer call, or the torch module), and the whole
    Predictor.predict_proba; overhead = whole - tokenise - runtime (feed building, result copies, softmax)."""
    import contextlib

    import torch

    from domaintune.export.artifacts import ONNX_INPUTS
    from domaintune.modeling.encoders import TokenBatches

    def tokenise(t):
        return next(iter(TokenBatches(p.tokenizer, [t], p.max_length, 1, p.max_batch_tokens, p.long_text)))[1]

    if p.model is None:
        infer = p.runner._infer()

        def runtime(enc):
            return infer({k: enc[k] for k in ONNX_INPUTS})
    else:
        def runtime(enc):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                return p.model(**{k: torch.from_numpy(v) for k, v in enc.items()})
    whole = autocast_bf16(p) if bf16 else p.predict_proba
    feeds = [tokenise(t) for t in texts]
    whole([texts[0]]), runtime(feeds[0])  # warm-up
    ms = {"tokenise": [], "runtime": [], "predict_proba": []}
    for t, enc in zip(texts, feeds):
        for name, fn, arg in (("tokenise", tokenise, t), ("runtime", runtime, enc), ("predict_proba", whole, [t])):
            t0 = time.perf_counter()
            fn(arg)
            ms[name].append(1000 * (time.perf_counter() - t0))
    out = {f"{k}_p50_ms": round(float(np.percentile(v, 50)), 3) for k, v in ms.items()}
    out["overhead_p50_ms"] = round(out["predict_proba_p50_ms"] - out["tokenise_p50_ms"] - out["runtime_p50_ms"], 3)
    out["texts"] = len(texts)
    return out


def autocast_bf16(p):
    """p.predict_proba under torch's bf16 autocast (the bf16-autocast row)."""
    import torch

    def run(texts):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return p.predict_proba(texts)
    return run


def checks(rows: dict, anchor: dict, auto: str, serve: dict | None) -> dict:
    f = rows["float32"]
    d = rows[auto]
    tb = {k: v["token_budget"]["texts_per_s"] for k, v in rows.items()}
    drop = 100 * (f["accuracy"] - d["accuracy"])
    short = {k: v["batch_1"]["p50_ms"] for k, v in rows.items()}
    out = {"default_variant": auto,
           "default_token_budget_texts_per_s": tb[auto], "anchor_pipeline_texts_per_s": anchor["texts_per_s"],
           "default_over_anchor": round(tb[auto] / anchor["texts_per_s"], 2),
           "default_over_anchor_ge_3x": tb[auto] / anchor["texts_per_s"] >= 3.0,
           "default_over_pytorch_float32_token_budget": round(tb[auto] / tb["float32"], 2),
           "default_over_pytorch_float32_token_budget_ge_2x": tb[auto] / tb["float32"] >= 2.0,
           "default_accuracy_drop_points": round(drop, 2), "default_accuracy_drop_le_0.5": drop <= 0.5,
           "batch_1_p50_ms": short, "default_batch_1_p50_le_2ms_at_le_64_tokens": short[auto] <= 2.0,
           "fastest_batch_1_p50": min(short, key=short.get),
           "batch_1_stages_p50_ms": {k: v.get("batch_1_stages") for k, v in rows.items()},
           "onnx_qdq_vs": {k: round(tb["onnx-qdq"] / tb[k], 2) for k in ("onnx-int8", "openvino-int8")
                           if "onnx-qdq" in tb and k in tb},
           "bucket_texts_per_s": {k: {b: v["buckets"][b]["texts_per_s"] for b in BUCKETS} for k, v in rows.items()}}
    if serve:
        ratio = serve.get("served_over_raw_sorted")
        out.update({"serve_auto_over_raw": ratio, "serve_auto_over_raw_ge_0.8": ratio is not None and ratio >= 0.8,
                    "serve_auto_5xx": serve.get("responses_5xx"), "serve_auto_errors_0":
                    serve.get("responses_5xx") == 0 and serve.get("transport_errors") == 0})
    return out


def speed_record(folder: Path, names: list[str], rows: dict, test, seed: int, rounds: int) -> dict:
    """The export stage's own speed record for the bench export (domaintune.export.classifier): each variant's
    texts/s on <= 512 seeded test texts the way predict runs them, its gate verdict against float32 with the
    default params; written to the export's export_report.json, which --variant auto resolves from."""
    from types import SimpleNamespace

    from domaintune.core.device import MAX_BATCH_TOKENS
    from domaintune.core.io import write_json
    from domaintune.export import classifier as ex
    from domaintune.export.artifacts import calibration_texts, load_variant
    from domaintune.export.classifier import SPEED_TEXTS, gate_failures, texts_per_s

    sample = calibration_texts(test["text"].tolist(), SPEED_TEXTS, seed)
    measured = {}
    for name in names + ["bf16-autocast"]:
        runner, meta = load_variant(folder, "float32" if name == "bf16-autocast" else name)
        tps = texts_per_s(runner, sample, 64, int(meta.get("max_length") or 128), MAX_BATCH_TOKENS, rounds,
                          bf16=name == "bf16-autocast")
        measured[name] = {"texts_per_s": tps, "accuracy": rows[name]["accuracy"], "ece": rows[name]["ece"]}
        del runner
    params = SimpleNamespace(variants=tuple(names), batch_size=64, latency_repeats=rounds, max_accuracy_drop=0.5,
                             max_ece_increase=1.0)
    record = ex.speed_record(measured, params, len(test), len(sample), gate_failures(measured, params, len(test)))
    write_json(folder / "export_report.json", {"speed": record, "note": "written by bench/inference.py"})
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--single", type=int, default=500, help="texts timed one at a time (default: 500)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per variant; the fastest counts (default: 3)")
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "int8"], choices=VARIANTS,
                    help="export variants (default: all but int8, which runs float32's computation)")
    ap.add_argument("--fold-serve", default=None, metavar="JSON", help="only fold bench/serve.py's results of "
                    "`serve --variant auto` into --out's checks (run after bench/serve.py, on this run's export)")
    ap.add_argument("--skip-timing", action="store_true", help="only write the speed record (for bench/serve.py)")
    ap.add_argument("--finetune", default=None, metavar="DIR",
                    help="a fine-tune bench/banking77.py cached (model/, info.json) instead of the one params.yaml's "
                         "keys name: its key covers every base and finetune param, so a new param with a default "
                         "that leaves the model as it was asks for a new 15-minute fine-tune")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.fold_serve:
        result = json.loads(Path(args.out).read_text())
        serve = json.loads(Path(args.fold_serve).read_text())
        result["serve_auto"] = {k: serve.get(k) for k in ("summary", "settings", "variant", "resolved",
                                                          "server_variant", "server_metrics", "finished")}
        result["checks"] = checks(result["variants"], result["anchor_pipeline"],
                                  result["checks"]["default_variant"], serve["summary"])
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["checks"], indent=2))
        return 0
    from domaintune.core.params import load_params
    from domaintune.export.artifacts import OnnxRunner, load_tokenizer, onnx_session, thread_count
    from domaintune.export.variants import resolve_variant
    from domaintune.modeling.encoders import set_threads
    from domaintune.predict.predictor import Predictor

    set_threads()
    t_start = time.perf_counter()
    base, ex = load_params(args.params, "base", "export")
    if args.finetune:  # a cached fine-tune given by folder (bench/banking77.py's layout: model/, info.json)
        model_folder = Path(args.finetune)
        info = json.loads((model_folder / "info.json").read_text())
        print(f"banking77: the given fine-tune {model_folder} (base {info.get('base')})", flush=True)
    else:
        model_folder, info = cached_finetune(args.params)
    splits, _ = load_banking77(base.seed)
    folder = cached_export(model_folder, info, ex, splits["train"]["text"].tolist(), base.seed)
    print(f"export: {folder}", flush=True)
    test = splits["test"]
    texts = test["text"].tolist()
    order = np.random.default_rng(0).permutation(len(test))
    shuffled = [texts[i] for i in order]
    rows, logits, predictors = {}, {}, {}
    for v in args.variants:
        predictors[v], rows[v], logits[v] = load_and_score(folder, v, test, info["calibration"])
    # bf16 autocast: the float32 predictor's weights, every call under autocast
    bf16 = Predictor.load(folder, variant="float32", batch_size=32)
    with __import__("torch").autocast("cpu", dtype=__import__("torch").bfloat16):
        logits["bf16-autocast"] = bf16.logits(texts)
    from domaintune.export.classifier import score_variant

    rows["bf16-autocast"] = {"name": MEASURED_ONLY["bf16-autocast"], **{k: round(float(v), 4) for k, v in
                             score_variant(logits["bf16-autocast"], test, bf16.meta, info["calibration"]).items()}}
    calibration = calibration_texts_of(splits, ex, base.seed)
    qdq_path = onnx_qdq(folder, bf16.tokenizer, calibration, int(bf16.meta.get("max_length") or 128))
    qdq = Predictor(OnnxRunner(onnx_session(qdq_path), load_tokenizer(str(folder / "onnx")), len(bf16.meta["labels"])),
                    bf16.meta, float(info["calibration"]["temperature"]), batch_size=32, variant="onnx")
    logits["onnx-qdq"] = qdq.logits(texts)
    rows["onnx-qdq"] = {"name": MEASURED_ONLY["onnx-qdq"], "size_mb": round(qdq_path.stat().st_size / 1e6, 1),
                        **{k: round(float(v), 4) for k, v in
                           score_variant(logits["onnx-qdq"], test, bf16.meta, info["calibration"]).items()}}
    record = speed_record(folder, list(args.variants), rows, test, base.seed, args.rounds)
    auto = resolve_variant(folder, "auto")
    print(f"auto: {auto.note}", flush=True)
    if args.skip_timing:
        return 0
    load_start = os.getloadavg()
    anchor = pipeline_anchor(folder, shuffled, args.rounds)
    anchor_labels = anchor.pop("labels")
    ref_labels = [bf16.labels[i] for i in logits["float32"][order].argmax(1)]
    anchor["agreement_with_float32"] = round(float(np.mean([a == b for a, b in zip(anchor_labels, ref_labels)])), 4)
    print(f"anchor pipeline: {anchor['texts_per_s']} texts/s (agreement {anchor['agreement_with_float32']})",
          flush=True)
    timed = {**predictors, "bf16-autocast": bf16, "onnx-qdq": qdq}
    calls = {k: (autocast_bf16(p) if k == "bf16-autocast" else p.predict_proba) for k, p in timed.items()}
    b32 = time_best_of(predictors, [shuffled[i:i + 32] for i in range(0, len(shuffled), 32)], 32, args.rounds)
    b32p8 = time_best_of(predictors, [shuffled[i:i + 32] for i in range(0, len(shuffled), 32)], 8, args.rounds)
    tok = bf16.tokenizer
    bucket_sets = {b: bucket_texts(tok, texts, lo, hi, n, base.seed) for b, (lo, hi, n) in BUCKETS.items()}
    for k, p in timed.items():
        p.batch_size, p.max_batch_tokens = 64, 8192  # what `domaintune predict` runs (its defaults)
        rows[k]["token_budget"] = {"texts_per_s": best_texts_per_s(calls[k], shuffled, args.rounds),
                                   "batch_size": 64, "max_batch_tokens": 8192, "texts": len(shuffled)}
        p.batch_size = 1
        ms = []
        for _ in range(args.rounds):
            ms.append(timed_calls(calls[k], [[t] for t in shuffled[:args.single]]))
        rows[k]["batch_1"] = latency_stats(min(ms, key=lambda m: m.sum()), [1] * args.single)
        rows[k]["batch_1_stages"] = batch_1_stages(p, shuffled[:STAGE_TEXTS], bf16=k == "bf16-autocast")
        p.batch_size = 64
        buckets = {}
        for b, bt in bucket_sets.items():
            p.max_length = max(int(p.meta.get("max_length") or 128), BUCKETS[b][1])  # no truncation in the bucket
            buckets[b] = {"texts": len(bt), "texts_per_s": best_texts_per_s(calls[k], bt, args.rounds)}
        p.max_length = int(p.meta.get("max_length") or 128)
        rows[k]["buckets"] = buckets
        if k in b32:
            rows[k]["batch_32"], rows[k]["batch_32_passes_of_8"] = b32[k], b32p8[k]
        print(f"{k:14s} acc {rows[k]['accuracy']:.4f} ECE {rows[k]['ece']:.4f}  token budget "
              f"{rows[k]['token_budget']['texts_per_s']:7.1f} texts/s  batch1 p50 {rows[k]['batch_1']['p50_ms']:.2f} ms"
              f"  buckets {[v['texts_per_s'] for v in buckets.values()]}", flush=True)
    for v in rows:
        rows[v]["agreement_with_float32"] = round(float((logits[v].argmax(1) == logits["float32"].argmax(1)).mean()), 4)
    cpu = lscpu()
    result = {"benchmark": "inference", "dataset": "banking77", "test_rows": len(test),
              "model": f"default fine-tune ({info['finetune']['method']}, {info['finetune']['epochs']} epochs) of "
                       f"{base.model}, T = {info['calibration']['temperature']:.3f}",
              "finetune_folder": model_folder.name,
              "method": "Predictor.predict_proba (tokenise + model + calibrated softmax). token_budget = every test "
                        "text in one call, sorted by token length into batches of <= 64 texts within 8,192 tokens "
                        "(domaintune predict's defaults); batch 32 = shuffled requests of 32 (each request sorted "
                        "and budgeted on its own); batch 1 = the first --single shuffled texts (BANKING77: "
                        f"{sum(len(tok(t)['input_ids']) <= 64 for t in shuffled[:args.single])} of them <= 64 "
                        "tokens); buckets: see BUCKETS (<=256 and <=512 built by concatenating test texts, "
                        "max_length raised to the bucket bound); each row runs --rounds rounds in a row and its "
                        "fastest round counts",
              "reduced": "int8 (weight-only PyTorch, float32 computation) not timed; bf16-autocast and onnx-qdq have "
                         "no batch_32 rows; buckets measure 512/512/128/64 texts; --rounds "
                         f"{args.rounds}: the whole bench holds the shared machine's lock for about 15 minutes",
              "rounds": args.rounds, "single_texts": args.single, "threads": thread_count(),
              "anchor_pipeline": anchor, "variants": rows, "auto": {"resolved": auto.note, "speed_record": record},
              "machine": {"cpu": cpu["model"], "flags": cpu["flags"], "cores": os.cpu_count(),
                          "python": platform.python_version(), "loadavg_start": load_start,
                          "loadavg_end": os.getloadavg()},
              "versions": versions(), "seconds": round(time.perf_counter() - t_start, 1)}
    result["checks"] = checks(rows, anchor, auto.variant, None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=lambda o: o.item()) + "\n")
    print(json.dumps(result["checks"], indent=2, default=lambda o: o.item()))
    return 0


def calibration_texts_of(splits, ex, seed: int) -> list[str]:
    from domaintune.export.artifacts import calibration_texts

    return calibration_texts(splits["train"]["text"].tolist(), ex.calibration_rows, seed)


def _cpu() -> str:
    from domaintune.export.modelcard import cpu_name

    return cpu_name()


if __name__ == "__main__":
    raise SystemExit(main())
