"""Measure how hard the example is: frozen MiniLM embeddings + logistic regression, 5-fold CV.

Scored against the *true* (pre-flip) labels of the distinct tickets, so the
number says how separable the domain is, not how noisy the labels are. The
generator is tuned so this lands in the 85-95% band: high enough that the
classes are real, low enough that fine-tuning has something to gain.

    flock /tmp/domaintune-heavy.lock .venv/bin/python examples/support_tickets/check_difficulty.py

Writes difficulty.json next to this script (the numbers quoted in README.md).
Takes ~15 s of embedding on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for `domaintune`
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _generator():
    spec = importlib.util.spec_from_file_location("make_dataset", HERE / "make_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_dataset"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--out", default=str(HERE / "difficulty.json"))
    p.add_argument("--C", type=float, default=10.0)
    args = p.parse_args(argv)

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from domaintune.modeling.encoders import embed_texts, load_encoder, load_tokenizer, resolve_model, set_threads

    gen = _generator()
    ds = gen.generate()
    # Distinct tickets only (template >= 0): copies would leak across folds.
    rows = [r for r in ds.rows if r.template >= 0]
    texts = [r.text for r in rows]
    labels = sorted(gen.CLASS_COUNTS)
    y_true = np.array([labels.index(r.true_label) for r in rows])
    y_given = np.array([labels.index(r.label) for r in rows])

    set_threads()
    path = resolve_model(args.model)
    t0 = time.perf_counter()
    X = embed_texts(load_encoder(path), load_tokenizer(path), texts, batch_size=64, max_length=128)
    embed_s = time.perf_counter() - t0

    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    clf = LogisticRegression(C=args.C, max_iter=2000)
    pred_true = cross_val_predict(clf, X, y_true, cv=cv)
    pred_given = cross_val_predict(clf, X, y_given, cv=cv)
    cm = confusion_matrix(y_true, pred_true)
    confusions = []
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            if i != j and cm[i, j]:
                confusions.append({"true": a, "predicted": b, "count": int(cm[i, j])})
    confusions.sort(key=lambda d: -d["count"])
    per_class = {lab: round(float(cm[i, i] / cm[i].sum()), 3) for i, lab in enumerate(labels)}
    result = {
        "model": args.model,
        "rows": len(rows),
        "cv": "StratifiedKFold(5, shuffle, random_state=0), LogisticRegression(C=%g)" % args.C,
        "accuracy_vs_true_labels": round(float((pred_true == y_true).mean()), 4),
        "accuracy_trained_on_given_labels_vs_true": round(float((pred_given == y_true).mean()), 4),
        "per_class_recall": per_class,
        "top_confusions": confusions[:10],
        "embed_seconds": round(embed_s, 1),
        "texts_per_second": round(len(texts) / embed_s, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
