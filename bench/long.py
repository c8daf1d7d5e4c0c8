"""Long documents (issue 27): truncate-128, truncate-512, head_tail-512 and chunks (windows of 128 tokens,
base.chunk_overlap 32, base.max_chunks 16, the pooling chosen on validation) at equal epochs, on two sets.

  bbc_news       ../shared/datasets/bbc_news (real articles, 5 topics, median ~440 word-pieces). Research-only
                 licence: read here, never copied into the project. Easy: the start decides most articles, so it
                 shows long inputs are handled at a fair cost, not that reading further helps.
  evidence_late  built here from ../shared/datasets/banking77: each document is 6-12 queries of "filler" intents
                 (a fixed set, never labels) with one query of a labelled intent at a random position; the label
                 is that query's intent. Training/validation documents come from train.csv (split 85/15 by a
                 seeded permutation), test documents from test.csv.

Each mode trains the project's default recipe (finetune defaults: full fine-tuning, linear-probe head init,
lr 1e-4, batch 32, label smoothing 0.1) with the same seed and epochs, then the trained folder is loaded by
domaintune's Predictor (what predict and serve run) and scored on test. Accuracy and macro-F1 do not depend
on the temperature, so none is fitted. Reductions (CPU-bound: 2 shared cores, the whole run <= 25 minutes
under the heavy lock) are stated in the JSON under "setting".

Run (one set per call, each under the lock):
  nice -n 19 flock /tmp/heavy.lock env PYTHONPATH=. python bench/long.py --set bbc_news
  nice -n 19 flock /tmp/heavy.lock env PYTHONPATH=. python bench/long.py --set evidence_late
Results merge into bench/results/long.json: results[set][mode] with accuracy, macro_f1, train_seconds,
predict_texts_per_s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import DATASETS as DATA
from _common import REPO, cpu

RESULTS = REPO / "bench" / "results" / "long.json"

MODES = {  # name -> (base.max_length, base.long_text)
    "truncate-128": (128, "truncate"),
    "truncate-512": (512, "truncate"),
    "head_tail-512": (512, "head_tail"),
    "chunks": (128, "chunks"),
}
SETS = {
    # bbc: 1,474/165/409 rows in the release; a stratified seeded sample of each keeps the run in budget
    "bbc_news": {"train": 300, "validation": 80, "test": 200, "epochs": 1},
    # evidence_late: 10 labelled intents, 10 filler intents (fewer labels: learnable from 480 documents in 2 epochs)
    "evidence_late": {"train": 480, "validation": 120, "test": 240, "epochs": 2, "labelled_intents": 10,
                      "filler_intents": 10, "queries": [6, 12]},
}
SEED = 42


def frame(texts, labels, split: str) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"{split}-{i}" for i in range(len(texts))], "text": list(texts),
                         "label": [str(x) for x in labels], "split": split})


def stratified(df: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n rows, each label's share kept (largest remainders), drawn by rng."""
    if n >= len(df):
        return df.reset_index(drop=True)
    share = df["label"].value_counts(normalize=True).sort_index() * n
    take = np.floor(share).astype(int)
    for lab in (share - take).sort_values(ascending=False).index[: n - int(take.sum())]:
        take[lab] += 1
    parts = [g.iloc[rng.permutation(len(g))[: take[lab]]] for lab, g in df.groupby("label")]
    return pd.concat(parts).sort_index().reset_index(drop=True)


def bbc_news(cfg: dict, data: Path) -> tuple[dict, dict]:
    rng = np.random.default_rng(SEED)
    folder = data / "bbc_news"
    splits = {}
    for s in ("train", "validation", "test"):
        df = pd.read_csv(folder / f"{s}.csv")
        df = stratified(pd.DataFrame({"text": df["text"].astype(str), "label": df["label"].astype(str)}), cfg[s], rng)
        splits[s] = frame(df["text"], df["label"], s)
    return splits, {"source": str(folder), "rows": {s: len(d) for s, d in splits.items()},
                    "rows_in_release": {"train": 1474, "validation": 165, "test": 409}}


def evidence_late(cfg: dict, tokenizer, data: Path) -> tuple[dict, dict]:
    """Documents of filler queries with one labelled query at a random position (see the module docstring).
    Filler intents: the `filler_intents` intents with the longest queries in train.csv (mean word-pieces), so
    documents run past 128 tokens as often as 6-12 BANKING77 queries allow; labelled intents: `labelled_intents`
    of the others, drawn by the seed."""
    folder = data / "banking77"
    tr, te = pd.read_csv(folder / "train.csv"), pd.read_csv(folder / "test.csv")
    rng = np.random.default_rng(SEED)
    tr = tr.iloc[rng.permutation(len(tr))].reset_index(drop=True)
    cut = int(0.85 * len(tr))
    pools = {"train": tr.iloc[:cut], "validation": tr.iloc[cut:], "test": te}
    n_tok = tr["text"].map(lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]))
    by_len = n_tok.groupby(tr["category"]).mean().sort_values(ascending=False, kind="stable")
    filler = sorted(by_len.index[: cfg["filler_intents"]])
    rest = sorted(set(tr["category"]) - set(filler))
    labelled = sorted(rng.choice(rest, cfg["labelled_intents"], replace=False).tolist())
    lo, hi = cfg["queries"]
    splits, late = {}, {}
    for s, pool in pools.items():
        fill = pool[pool["category"].isin(filler)]["text"].astype(str).tolist()
        by_intent = {c: g["text"].astype(str).tolist() for c, g in pool.groupby("category") if c in labelled}
        texts, labels, past = [], [], 0
        for i in range(cfg[s]):
            intent = labelled[i % len(labelled)]  # balanced labels
            k = int(rng.integers(lo, hi + 1))
            queries = [fill[j] for j in rng.integers(0, len(fill), k - 1)]
            pos = int(rng.integers(0, k))
            evidence = by_intent[intent][int(rng.integers(0, len(by_intent[intent])))]
            queries.insert(pos, evidence)
            text = " ".join(queries)
            # is the evidence query's last token past what truncate-128 reads (126 content tokens)?
            before = len(tokenizer(" ".join(queries[: pos + 1]), add_special_tokens=False)["input_ids"])
            past += before > 126
            texts.append(text)
            labels.append(intent)
        order = rng.permutation(len(texts))
        splits[s] = frame([texts[i] for i in order], [labels[i] for i in order], s)
        late[s] = past / len(texts)
    return splits, {"source": str(folder), "filler_intents": filler, "labelled_intents": labelled,
                    "queries_per_document": [lo, hi], "rows": {s: len(d) for s, d in splits.items()},
                    "share_evidence_past_token_126": late,
                    "note": "truncate-128 cannot see the evidence of the documents counted in "
                            "share_evidence_past_token_126: their share bounds what reading further can gain"}


def length_summary(tokenizer, splits: dict) -> dict:
    from domaintune.modeling.chunks import length_stats

    return {s: length_stats(tokenizer, [df["text"].tolist()], 128) for s, df in splits.items()}


def run_mode(name: str, splits: dict, labels: list[str], epochs: int, encoder: str, workdir: Path) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    from domaintune.core.params import BaseParams, FinetuneParams
    from domaintune.modeling import chunks as chunking
    from domaintune.modeling.encoders import predict_logits
    from domaintune.predict.predictor import Predictor
    from domaintune.train.classifier import train_classifier

    max_length, long_text = MODES[name]
    base = BaseParams(seed=SEED, model=encoder, max_length=max_length, long_text=long_text, device="cpu")
    ft = dataclasses.replace(FinetuneParams(), epochs=epochs, seeds=(SEED,), checkpoint_every=0)
    out = workdir / name
    t0 = time.perf_counter()
    m = train_classifier(splits["train"], splits["validation"], labels, encoder, base, ft, out, progress=False)
    wall = time.perf_counter() - t0
    p = Predictor.load(out)
    test = splits["test"]
    p.predict(test["text"].tolist()[:8])  # warm-up
    t0 = time.perf_counter()
    logits = p.logits(test["text"].tolist())
    pred_s = time.perf_counter() - t0
    y = test["label"].to_numpy()
    pred = np.array([p.labels[i] for i in logits.argmax(1)])
    res = {"accuracy": float(accuracy_score(y, pred)),
           "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
           "train_seconds": float(m["train_seconds"]), "train_wall_seconds": wall,
           "predict_texts_per_s": len(test) / pred_s, "validation_macro_f1": m.get("val_macro_f1"),
           "max_length": max_length, "long_text": p.long_text.as_meta(), "epochs": epochs,
           "train_steps": m["per_seed"][str(SEED)]["steps"]}
    if long_text == "chunks":
        res["pooling_validation_macro_f1"] = p.meta["long_text"]["pooling_validation_macro_f1"]
        # every pooling's test score, for the record only: the model's pooling was chosen on validation
        batches_logits = {}
        batches, per_input = predict_logits(p.model, p.tokenizer, test["text"].tolist(), p.batch_size, max_length,
                                            long_text=p.long_text, per_input=True)
        for pooling in chunking.POOLINGS:
            z = batches.documents(per_input, pooling)
            pz = np.array([p.labels[i] for i in z.argmax(1)])
            batches_logits[pooling] = {"accuracy": float(accuracy_score(y, pz)),
                                       "macro_f1": float(f1_score(y, pz, average="macro", zero_division=0))}
        res["pooling_test_for_the_record"] = batches_logits
        enc = chunking.encode(p.tokenizer, splits["train"]["text"].tolist(), max_length, p.long_text)
        res["train_rows_windows"] = int(len(enc.doc))
    print(f"{name}: {json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)})}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), required=True)
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--data", type=Path, default=DATA, help="the folder holding bbc_news/ and banking77/ "
                    "(default ../shared/datasets next to the project)")
    args = ap.parse_args()

    import torch

    from domaintune.modeling.encoders import load_tokenizer, resolve_model, set_threads

    set_threads()
    encoder = resolve_model("minilm")
    tok = load_tokenizer(encoder)
    cfg = SETS[args.set]
    t_all = time.perf_counter()
    splits, about = bbc_news(cfg, args.data) if args.set == "bbc_news" else evidence_late(cfg, tok, args.data)
    labels = sorted(set(splits["train"]["label"]))
    about["length_tokens"] = length_summary(tok, splits)
    results = {}
    # head_tail-512 reads exactly what truncate-512 reads when no document is longer than its 510 content
    # tokens: the same inputs, seed and epochs train the same model, so it is not trained twice
    fits = all(s["max"] <= 510 for s in about["length_tokens"].values())
    with tempfile.TemporaryDirectory(prefix="long-bench-") as d:
        for mode in args.modes:
            if mode == "head_tail-512" and fits and "truncate-512" in results:
                results[mode] = {**results["truncate-512"], "long_text": {"mode": "head_tail"},
                                 "same_as": "truncate-512 (every document fits 510 tokens: identical inputs)"}
                continue
            results[mode] = run_mode(mode, splits, labels, cfg["epochs"], encoder, Path(d))
    doc = json.loads(args.results.read_text()) if args.results.exists() else {}
    doc.setdefault("results", {}).setdefault(args.set, {}).update(results)  # --modes: the others stay as they were
    doc.setdefault("setting", {})[args.set] = {
        **cfg, **about, "labels": len(labels), "seed": SEED, "model": "all-MiniLM-L6-v2 (bundled)",
        "recipe": "finetune defaults (full, probe head init, lr 1e-4, batch 32, label smoothing 0.1), one seed",
        "chunks": "base.max_length 128, chunk_overlap 32, max_chunks 16; finetune.chunk_loss document (the default): "
                  "the loss is on each training document's log-mean-exp of its windows' logits; the pooling at "
                  "inference (mean | logsumexp | max of window logits) chosen by validation macro-F1 at the end of "
                  "training",
        "reduced": "rows and epochs cut from the full sets so the whole bench holds the heavy lock <= 25 minutes "
                   "on 2 shared CPU cores (see rows / rows_in_release)",
        "wall_seconds": time.perf_counter() - t_all, "torch_threads": torch.get_num_threads()}
    doc["cpu"] = cpu("2 cores shared with other work (run under nice -n 19 and a lock that serialises heavy jobs): "
                     "seconds compare modes within this run, not machines")
    doc["about"] = ("issue 27 long-document benchmark (bench/long.py): test accuracy / macro-F1 per mode at equal "
                    "epochs, training seconds (the training loop, probe excluded) and Predictor.logits throughput "
                    "on the test documents")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
