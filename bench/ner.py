"""NER benchmark on WNUT-17 (issue 28): domaintune's token_classification finetune vs a plain transformers
Trainer token-classification recipe, same base model, data, epochs, batch size, LR, warmup, weight decay, seed.

Heavy: run under `flock /tmp/heavy.lock`. Data: ../shared/datasets/wnut17 (train / validation / test JSONL of
tokens + tags; read in place, never copied). Both runs are scored the same way: each test word's tag is its first
sub-word's argmax, entity P/R/F1 by seqeval strict IOB2 (domaintune.data.tokens.entity_scores), micro and per type.

  domaintune  domaintune.train.tokens.train_tagger with params.yaml's finetune section (method full, label
              smoothing 0.1, length-grouped dynamic padding, validation entity F1 each epoch, best epoch kept),
              DAPT off (the base model as is); train_seconds include the per-epoch validation passes
  domaintune_dapt  the same after the dapt stage's work (domaintune.train.dapt.run: whole-word-masked MLM on the
              WNUT train sentences only, params.yaml's dapt section with dapt.epochs 1 instead of max_steps and no
              extra corpus); train_seconds/samples_per_s are the finetune's, dapt_seconds the MLM's
  hf_trainer  AutoModelForTokenClassification + Trainer + DataCollatorForTokenClassification (dynamic padding,
              first sub-word labelled, the rest -100), no evaluation during training (run_ner's plain recipe)
samples_per_s = training sentences seen / train_seconds. Results merge into bench/results/ner.json results[config].
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
DEFAULT_DATA = Path("/work/shared/datasets/wnut17")

from domaintune.core.params import IngestParams, load_params  # noqa: E402
from domaintune.data.tagged import ingest_tokens  # noqa: E402
from domaintune.data.tokens import align_labels, decode_rows, entity_scores  # noqa: E402
from domaintune.modeling.encoders import resolve_model, set_threads  # noqa: E402
from domaintune.modeling.tagger import predicted_tags, torch_runner, word_logits  # noqa: E402


def cpu() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    return {"model": info.get("Model name", "").strip(), "cores_used": len(os.sched_getaffinity(0)),
            "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags],
            "python": platform.python_version()}


def score(model, tok, test, names, max_length: int) -> dict:
    words, _, tags = decode_rows(test)
    wl = word_logits(torch_runner(model.eval()), tok, words, len(names), max_length, 64)
    s = entity_scores(tags, predicted_tags(wl, names))
    return {"entity_f1": s["f1"], "precision": s["precision"], "recall": s["recall"], "per_type": s["per_type"],
            "token_accuracy": s["token_accuracy"]}


def run_domaintune(splits, tags, base, ft, encoder: str | None = None) -> dict:
    from transformers import AutoModelForTokenClassification

    from domaintune.modeling.encoders import load_tokenizer
    from domaintune.train.tokens import train_tagger

    out = Path("/tmp/bench_ner_model")
    t0 = time.perf_counter()
    m = train_tagger(splits["train"], splits["validation"], tags, encoder or resolve_model(base.model), base, ft, out,
                     progress=False)
    wall = time.perf_counter() - t0
    from domaintune.export.artifacts import ONNX_FILE
    from domaintune.export.tokens import onnx_runner, write_onnx, write_onnx_int8

    model = AutoModelForTokenClassification.from_pretrained(out)
    tok = load_tokenizer(str(out))
    res = score(model, tok, splits["test"], tags, base.max_length)
    # the export variants' entity F1 on the same test split (what the export gates compare)
    write_onnx(out, model, tok)
    write_onnx_int8(out)
    words, _, gold = decode_rows(splits["test"])
    for variant in ("onnx", "onnx-int8"):
        wl = word_logits(onnx_runner(out / variant / ONNX_FILE), tok, words, len(tags), base.max_length, 64)
        res[f"{variant}_entity_f1"] = entity_scores(gold, predicted_tags(wl, tags))["f1"]
    return {**res, "train_seconds": m["train_seconds"], "wall_seconds_incl_load": wall,
            "samples_per_s": m["train_samples_per_s"], "best_epoch": m["per_seed"][str(m["best_seed"])]["best_epoch"],
            "val_entity_f1": m.get("val_entity_f1")}


def run_dapt(splits, tags, base, ft, dp) -> dict:
    import shutil

    from domaintune.data.dataset import write_dataset
    from domaintune.train import dapt

    root = Path("/tmp/bench_ner_dapt")
    shutil.rmtree(root, ignore_errors=True)
    write_dataset(root / "data", splits, tags)
    t0 = time.perf_counter()
    m = dapt.run(root / "data", root / "dapt", root / "dapt.json", base, dp, progress=False)
    dapt_s = time.perf_counter() - t0
    res = run_domaintune(splits, tags, base, ft, encoder=str(root / "dapt"))
    return {**res, "dapt_seconds": dapt_s, "dapt_steps": m["steps"], "dapt_epochs": m["epochs"],
            "dapt_train_texts": m["train_texts"], "dapt_perplexity": [m["perplexity_before"], m["perplexity_after"]]}


def run_hf(splits, tags, base, ft) -> dict:
    import torch
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    path = resolve_model(base.model)
    tok = AutoTokenizer.from_pretrained(path)
    index = {t: i for i, t in enumerate(tags)}
    words, _, wtags = decode_rows(splits["train"])
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=base.max_length)
    feats = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
              "labels": align_labels(enc.word_ids(i), [index[t] for t in wtags[i]])} for i in range(len(words))]
    torch.manual_seed(ft.seeds[0])
    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(tags),
                                                            id2label=dict(enumerate(tags)), label2id=index)
    args = TrainingArguments(output_dir="/tmp/bench_ner_hf", per_device_train_batch_size=ft.batch_size,
                             learning_rate=ft.lr, num_train_epochs=ft.epochs, weight_decay=ft.weight_decay,
                             warmup_steps=int(ft.warmup_ratio * -(-len(feats) // ft.batch_size) * ft.epochs),
                             lr_scheduler_type="linear", seed=ft.seeds[0],
                             eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=DataCollatorForTokenClassification(tok))
    out = trainer.train()
    res = score(trainer.model, tok, splits["test"], tags, base.max_length)
    rt = out.metrics["train_runtime"]
    return {**res, "train_seconds": rt, "samples_per_s": len(feats) * ft.epochs / rt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["domaintune", "domaintune_dapt", "hf_trainer"])
    ap.add_argument("--dapt-epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None,
                    help="train with this seed instead of params.yaml's (same splits); results go to <config>_seed<N>")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "ner.json")
    args = ap.parse_args()
    set_threads()
    base = dataclasses.replace(load_params(REPO / "params.yaml", "base"), task="token_classification")
    ft = dataclasses.replace(load_params(REPO / "params.yaml", "finetune"), epochs=args.epochs)
    if args.seed is not None:
        ft = dataclasses.replace(ft, seeds=[args.seed])
    dp = dataclasses.replace(load_params(REPO / "params.yaml", "dapt"), corpus=(), epochs=args.dapt_epochs)
    r = ingest_tokens(str(args.data), IngestParams(feedback=None), base.seed)
    splits, tags = r.tables, r.tags
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results.setdefault("results", {})
    setup = {
        "dataset": "WNUT-17 (emerging entities), train 3,394 / validation 1,009 / test 1,287 sentences, 6 types",
        "base_model": base.model, "epochs": args.epochs,
        "dapt": {"domaintune": "off (the base model as is)",
                 "domaintune_dapt": f"on, reduced: {args.dapt_epochs} epoch(s) of whole-word-masked MLM over the "
                                    "WNUT train sentences only (no extra corpus), instead of params.yaml's max_steps "
                                    "over its example corpus; the rest of params.yaml's dapt section as is "
                                    f"(block_size {dp.block_size}, batch {dp.batch_size}, lr {dp.lr}, "
                                    f"head warm-up {dp.head_warmup_steps} steps)",
                 "why_reduced": "a real DAPT corpus of tweets is not shipped and the shared 2-core machine's lock "
                                "is held under ~15 minutes per bench command"},
        "why_epochs": "params.yaml's finetune.epochs (2), for both domaintune and the Trainer",
        "finetune": {"method": ft.method, "batch_size": ft.batch_size, "lr": ft.lr, "weight_decay": ft.weight_decay,
                     "warmup_ratio": ft.warmup_ratio, "label_smoothing (domaintune only)": ft.label_smoothing,
                     "seed": ft.seeds[0]},
        "scoring": "test split, first sub-word argmax per word, seqeval strict IOB2 entity micro F1 and per type",
        "published": {"best 2017 shared-task system (UH-RiTUAL)": 0.4186,
                      "BERTweet-base fine-tuned (Nguyen et al. 2020)": 0.56,
                      "BERT-base-size fine-tunes, reported range": "about 0.47-0.56"},
        "cpu": cpu(),
        "seeds": "params.yaml's (42) for results[config]; results[<config>_seed<N>] are the same runs with seed N "
                 "(--seed: the model init, the shuffles and dropout; same splits), a check of run-to-run spread",
    }
    if args.seed is None or "setup" not in results:
        results["setup"] = setup
    for cfg in args.configs:
        t0 = time.perf_counter()
        if cfg == "domaintune_fp32":  # the same recipe without bf16 autocast (the Trainer runs float32)
            res = run_domaintune(splits, tags, base, dataclasses.replace(ft, bf16="off"))
        elif cfg == "domaintune_dapt":
            res = run_dapt(splits, tags, base, ft, dp)
        elif cfg == "domaintune_no_smoothing":  # the same recipe with finetune.label_smoothing 0 (as the HF recipe)
            res = run_domaintune(splits, tags, base, dataclasses.replace(ft, label_smoothing=0.0))
        else:
            res = run_domaintune(splits, tags, base, ft) if cfg == "domaintune" else run_hf(splits, tags, base, ft)
        res["config_seconds"] = time.perf_counter() - t0
        res["seed"] = ft.seeds[0]
        results["results"][cfg if args.seed is None else f"{cfg}_seed{args.seed}"] = res
        print(cfg, json.dumps({k: v for k, v in res.items() if k != "per_type"}), flush=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")  # after each config: a crash keeps the rest


if __name__ == "__main__":
    main()
