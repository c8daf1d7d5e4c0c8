"""Calibration benchmark on BANKING77: ECE/NLL/accuracy before and after temperature scaling.

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/calibration.py [--skip-finetune]

Data: ../shared/datasets/banking77 (train.csv 10,003 rows / test.csv 3,080, 77 intents).
BANKING77 has no validation split, so 10% of train (stratified, base.seed) is held out
to fit the temperature (and for finetune's model selection); test is never touched
until scoring. Two classifiers, both scored by the evaluate stage's own core
(domaintune.evaluate.classifier.evaluate_logits):
  probe     frozen mean-pooled bundled MiniLM embeddings + logistic regression (C=10)
  finetune  the default fine-tune: params.yaml's finetune section through
            domaintune.train.classifier.train_classifier (what the finetune stage runs)
For the fine-tuned model it also compares the export's int8 variant with float32
(accuracy, ECE after calibration, latency on the test split). Targets (issue 5):
ECE after <= 0.02, never worse than before, accuracy unchanged.
Results: bench/results/calibration.json (written after each part).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(REPO / "bench"))

from banking77 import DATA, load_banking77  # noqa: E402

from domaintune.core.params import EvaluateParams, load_params  # noqa: E402
from domaintune.evaluate.classifier import evaluate_logits  # noqa: E402

OUT = REPO / "bench" / "results" / "calibration.json"
TARGET_ECE = 0.02


def summarize(res, seconds: float) -> dict:
    b, a = res.before, res.after
    return {
        "temperature": res.calibration["temperature"],
        "validation_nll_before": res.calibration["validation_nll_before"],
        "validation_nll_after": res.calibration["validation_nll_after"],
        "test_before": b, "test_after": a,
        "checks": {
            "accuracy_unchanged": a["accuracy"] == b["accuracy"],
            f"ece_after_le_{TARGET_ECE}": a["ece"] <= TARGET_ECE,
            "ece_not_worse": a["ece"] <= b["ece"],
            "nll_not_worse": a["nll"] <= b["nll"],
        },
        "seconds": round(seconds, 1),
    }


def run_probe(splits, labels, base, ev: EvaluateParams) -> dict:
    from sklearn.linear_model import LogisticRegression

    from domaintune.modeling.encoders import embed_texts, load_encoder, load_tokenizer, resolve_model, set_threads

    set_threads()
    t0 = time.perf_counter()
    path = resolve_model(base.model)
    enc, tok = load_encoder(path), load_tokenizer(path)
    emb = {s: embed_texts(enc, tok, df["text"].tolist(), 64, base.max_length) for s, df in splits.items()}
    index = {lab: i for i, lab in enumerate(labels)}
    clf = LogisticRegression(C=10.0, max_iter=2000)
    clf.fit(emb["train"], splits["train"]["label"].map(index))
    def logits(x):
        # decision_function = multinomial logits (softmax of them is predict_proba); a class absent
        # from train (only in --limit smoke runs) gets a logit no softmax will pick.
        out = np.full((len(x), len(labels)), -1e4)
        out[:, clf.classes_] = clf.decision_function(x)
        return out

    res = evaluate_logits(splits["validation"], splits["test"], logits(emb["validation"]), logits(emb["test"]),
                          labels, ev)
    return summarize(res, time.perf_counter() - t0)


def run_finetune(splits, labels, base, ev: EvaluateParams, params_path: Path) -> dict:
    import torch

    from domaintune.evaluate.calibration import softmax
    from domaintune.export.classifier import score_variant
    from domaintune.modeling.encoders import load_classifier, predict_logits, resolve_model
    from domaintune.modeling.quantize import load_int8_encoder, save_int8_encoder
    from domaintune.train.classifier import train_classifier

    ft = load_params(params_path, "finetune")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        train_metrics = train_classifier(splits["train"], splits["validation"], labels, resolve_model(base.model),
                                         base, ft, out, base_encoder=resolve_model(base.model), progress=False)
        train_s = time.perf_counter() - t0
        model, tok, meta = load_classifier(out, merge=True)
        ml = int(meta["max_length"])
        val_logits = predict_logits(model, tok, splits["validation"]["text"].tolist(), 64, ml)
        test_texts = splits["test"]["text"].tolist()
        t2 = time.perf_counter()
        test_logits = predict_logits(model, tok, test_texts, 64, ml)
        float_s = time.perf_counter() - t2
        res = evaluate_logits(splits["validation"], splits["test"], val_logits, test_logits, meta["labels"], ev)
        out_dict = summarize(res, time.perf_counter() - t0)
        out_dict["train_seconds"] = round(train_s, 1)
        out_dict["train_metrics"] = train_metrics
        out_dict["finetune_params"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(ft).items()}
        # int8 export variant vs float32, same test texts, same temperature.
        calib = {"temperature": res.calibration["temperature"]}
        save_int8_encoder(model.encoder, Path(tmp) / "int8", embeddings=True)
        qenc = load_int8_encoder(Path(tmp) / "int8")
        fenc = model.encoder
        model.encoder = qenc
        t3 = time.perf_counter()
        q_logits = predict_logits(model, tok, test_texts, 64, ml)
        q_s = time.perf_counter() - t3
        model.encoder = load_int8_encoder(Path(tmp) / "int8", dynamic=True)
        t4 = time.perf_counter()
        qd_logits = predict_logits(model, tok, test_texts, 64, ml)
        qd_s = time.perf_counter() - t4
        model.encoder = fenc
        fbytes = sum(p.numel() * 4 for p in fenc.state_dict().values())
        qbytes = (Path(tmp) / "int8" / "model.int8.safetensors").stat().st_size
        T = calib["temperature"]
        out_dict["export_variants"] = {
            "float32": {**score_variant(test_logits, splits["test"], meta, calib, ev.bins),
                        "ms_per_text": 1000 * float_s / len(test_texts), "weights_bytes": int(fbytes)},
            "int8_dequantised": {**score_variant(q_logits, splits["test"], meta, calib, ev.bins),
                                 "ms_per_text": 1000 * q_s / len(test_texts), "weights_bytes": int(qbytes),
                                 "max_abs_logit_diff": float(np.abs(q_logits - test_logits).max()),
                                 "argmax_agreement": float((q_logits.argmax(1) == test_logits.argmax(1)).mean()),
                                 "max_prob_diff": float(np.abs(softmax(q_logits, T) - softmax(test_logits, T)).max())},
            "int8_dynamic_matmul": {**score_variant(qd_logits, splits["test"], meta, calib, ev.bins),
                                    "ms_per_text": 1000 * qd_s / len(test_texts),
                                    "argmax_agreement": float((qd_logits.argmax(1) == test_logits.argmax(1)).mean())},
            "torch_threads": torch.get_num_threads(),
        }
    return out_dict


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "scikit-learn", "scipy", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    global DATA, OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--skip-finetune", action="store_true", help="only the frozen-embedding probe (~3 min)")
    ap.add_argument("--data", default=str(DATA), help="folder with BANKING77 train.csv/test.csv")
    ap.add_argument("--out", default=str(OUT), help="results JSON")
    ap.add_argument("--limit", type=int, default=0, help="smoke test: keep this many rows per split (no results file)")
    args = ap.parse_args()
    DATA, OUT = Path(args.data), Path(args.out)
    if not (DATA / "train.csv").exists():
        print(f"BANKING77 not found at {DATA}", file=sys.stderr)
        return 1
    base, ev = load_params(args.params, "base", "evaluate")
    splits, labels = load_banking77(base.seed, DATA)
    if args.limit:
        splits = {s: df.sample(n=min(args.limit, len(df)), random_state=0).reset_index(drop=True)
                  for s, df in splits.items()}
        OUT = Path(tempfile.gettempdir()) / "calibration-smoke.json"
    result = {
        "benchmark": "calibration",
        "dataset": "banking77", "rows": {s: len(df) for s, df in splits.items()}, "labels": len(labels),
        "validation": "10% of train.csv, stratified, random_state=base.seed; fits T only",
        "ece_bins": ev.bins, "target_ece_after": TARGET_ECE,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": versions(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)

    def save():
        OUT.write_text(json.dumps(result, indent=2, default=float) + "\n")

    result["probe"] = run_probe(splits, labels, base, ev)
    save()
    print(json.dumps(result["probe"]["checks"]), result["probe"]["test_before"]["ece"], "->",
          result["probe"]["test_after"]["ece"], flush=True)
    if not args.skip_finetune:
        result["finetune"] = run_finetune(splits, labels, base, ev, Path(args.params))
        save()
        f = result["finetune"]
        print(json.dumps(f["checks"]), f["test_before"]["ece"], "->", f["test_after"]["ece"], flush=True)
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
