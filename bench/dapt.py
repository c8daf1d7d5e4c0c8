"""Benchmark: domain-adaptive pre-training (the dapt stage's core) on BANKING77 with the bundled MiniLM.

Side by side in one run, same data and seed:
  1. speed of one MLM training step (forward + backward) with the vocabulary
     projection applied only at masked positions (what the stage does) vs the
     stock BertForMaskedLM forward with labels (logits at every position);
  2. DAPT itself through the product's engine (domaintune.train.mlm.adapt -> domaintune.engine):
     samples/s of its training loop, and held-out MLM perplexity on held-out *train* texts (test texts are never
     used for DAPT): with the fresh head, after the head warm-up (the base
     encoder's own number) and after DAPT;
  3. the effect on the downstream task: frozen mean-pooled embeddings +
     logistic regression (C=10) trained on train, scored on test, from the base
     encoder vs from the DAPT encoder.
Writes bench/results/dapt.json. Heavy: run it under the shared lock:

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/dapt.py
    .venv/bin/python bench/dapt.py --limit 800 --max-steps 5 --out /tmp/dapt.json   # quick check
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
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
BANKING77 = REPO.parent / "shared" / "datasets" / "banking77"


def step_speed(model, train_ids, train_attn, vocab, batch_size: int, steps: int, seed: int) -> dict:
    """Forward+backward samples/s: masked-only head (ours) vs logits at every position (stock), interleaved."""
    import torch

    from domaintune.train import mlm as dapt

    rng = np.random.default_rng(seed)
    model.train()
    times = {"masked_only": 0.0, "all_positions": 0.0}
    for i in range(steps + 1):  # step 0 warms both paths up and is not timed
        batch = rng.choice(len(train_ids), size=batch_size, replace=False)
        ids, labels = dapt.whole_word_mask(train_ids[batch], train_attn[batch], vocab, 0.15, rng)
        args = (torch.from_numpy(ids), torch.from_numpy(train_attn[batch]), torch.from_numpy(labels))
        order = ["masked_only", "all_positions"] if i % 2 else ["all_positions", "masked_only"]
        for name in order:  # alternate which goes first so load changes hit both alike
            t = time.perf_counter()
            if name == "masked_only":
                loss = dapt.mlm_loss(model, *args)
            else:
                loss = model(input_ids=args[0], attention_mask=args[1], labels=args[2]).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i:
                times[name] += time.perf_counter() - t
    out = {k: round(steps * batch_size / v, 2) for k, v in times.items()}
    out["ratio_masked_only_vs_all_positions"] = round(out["masked_only"] / out["all_positions"], 3)
    out["steps_each"] = steps
    return out


def probe(encoder_path: str, train_texts, y_train, test_texts, y_test, n_labels: int, C: float) -> dict:
    """Frozen mean-pooled embeddings + logistic regression: test metrics and seconds."""
    from sklearn.linear_model import LogisticRegression

    from domaintune.evaluate.calibration import single_label_metrics
    from domaintune.modeling.encoders import embed_texts, load_encoder, load_tokenizer

    t0 = time.perf_counter()
    enc, tok = load_encoder(encoder_path), load_tokenizer(encoder_path)
    x_train = embed_texts(enc, tok, train_texts, batch_size=64, max_length=128)
    x_test = embed_texts(enc, tok, test_texts, batch_size=64, max_length=128)
    t_embed = time.perf_counter() - t0
    clf = LogisticRegression(C=C, max_iter=3000).fit(x_train, y_train)
    probs = np.zeros((len(x_test), n_labels))
    probs[:, clf.classes_] = clf.predict_proba(x_test)  # a --limit sample may miss some classes
    m = single_label_metrics(probs, y_test, n_labels)
    return {"test_accuracy": round(m["accuracy"], 4), "test_macro_f1": round(m["macro_f1"], 4),
            "test_ece": round(m["ece"], 4), "embed_seconds": round(t_embed, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(BANKING77))
    ap.add_argument("--limit", type=int, default=0, help="use only the first N train and N/3 test rows (quick check)")
    ap.add_argument("--max-steps", type=int, default=None, help="DAPT steps (default: --epochs passes)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--head-warmup-steps", type=int, default=50)
    ap.add_argument("--speed-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the stage's, all cores)")
    ap.add_argument("--C", type=float, default=10.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dapt.json"))
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda (DAPT itself runs on the product's engine there)")
    args = ap.parse_args()
    run(args)


def run(args) -> None:
    """The three measurements side by side; writes args.out."""

    import torch

    from domaintune.core.params import DaptParams, as_dict
    from domaintune.modeling.encoders import load_tokenizer, resolve_model, set_threads
    from domaintune.train import mlm as dapt

    set_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    train = pd.read_csv(Path(args.data) / "train.csv")
    test = pd.read_csv(Path(args.data) / "test.csv")
    if args.limit:
        train = train.sample(n=min(args.limit, len(train)), random_state=0)
        test = test.sample(n=min(max(args.limit // 3, 1), len(test)), random_state=0)
        test = test[test["category"].isin(set(train["category"]))]
    labels = sorted(train["category"].unique())
    index = {c: i for i, c in enumerate(labels)}
    y_train = train["category"].map(index).to_numpy()
    y_test = test["category"].map(index).to_numpy()
    base_path = resolve_model("minilm")

    # DAPT corpus: train texts only; the held-out slice comes out of them.
    corpus = dapt.build_corpus(train["text"].tolist(), {}, train_file="banking77/train.csv")
    params = DaptParams(block_size=args.block_size, batch_size=args.batch_size, lr=args.lr,
                        max_steps=args.max_steps or 0, epochs=None if args.max_steps else args.epochs,
                        head_warmup_steps=args.head_warmup_steps)

    # 1. step speed, on the same blocks the training uses
    tok = load_tokenizer(base_path)
    vocab = dapt.Vocab.from_tokenizer(tok)
    lists = tok(corpus.texts, add_special_tokens=False)["input_ids"]
    ids, attn = dapt.pack_blocks(lists, args.block_size, vocab)
    model, _ = dapt.load_mlm_model(base_path, args.seed)
    speed = step_speed(model, ids, attn, vocab, args.batch_size, args.speed_steps, args.seed)
    del model
    print("step speed", speed, flush=True)

    # 2. DAPT itself (the stage's core function)
    t0 = time.perf_counter()
    from domaintune.core.device import resolve_device

    device = resolve_device(args.device)
    model, tok, metrics, info, _ = dapt.adapt(corpus, base_path, params, args.seed, device, progress=False)
    dapt_seconds = time.perf_counter() - t0
    print("dapt", metrics, flush=True)

    # 3. downstream probe: base encoder vs DAPT encoder
    with tempfile.TemporaryDirectory() as tmp:
        dapt_dir = Path(tmp) / "dapt"
        dapt_dir.mkdir()
        dapt.save_encoder(model, tok, base_path, dapt_dir, args.seed)
        del model
        tr, te = train["text"].tolist(), test["text"].tolist()
        base_probe = probe(base_path, tr, y_train, te, y_test, len(labels), args.C)
        print("probe base", base_probe, flush=True)
        dapt_probe = probe(str(dapt_dir), tr, y_train, te, y_test, len(labels), args.C)
        print("probe dapt", dapt_probe, flush=True)

    result = {
        "benchmark": "dapt",
        "data": {"dataset": "banking77", "train_rows": len(train), "test_rows": len(test),
                 "dapt_corpus": "train texts only (held-out slice of them for perplexity)",
                 "corpus_texts_used": corpus.counts["used"], "duplicates_removed": corpus.counts["duplicate"]},
        "model": "bundled all-MiniLM-L6-v2",
        "params": as_dict(params),
        "seed": args.seed,
        "mlm_step_speed_samples_per_s": speed,
        "dapt": {**metrics, "wall_seconds": round(dapt_seconds, 1), "mlm_head": info["mlm_head"]},
        "probe_logreg_C": args.C,
        "probe_base": base_probe,
        "probe_dapt": dapt_probe,
        "probe_accuracy_delta_dapt_minus_base": round(dapt_probe["test_accuracy"] - base_probe["test_accuracy"], 4),
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_1min_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                    "note": "shared 2-core box; lighter jobs of other engineers may run beside this one"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
