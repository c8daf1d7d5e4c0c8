"""GPU benchmark of the product's training engine, one script, under 5 minutes of GPU time.

Every number comes from the code the stages run, not from a loop of its own:
  1. finetune  the engine (domaintune.train.engine.Engine: fused AdamW, bf16 autocast, clipping, schedule) driving
               the classification objective of domaintune.training on EncoderClassifier models of MiniLM's
               and BERT-base's shapes (random weights from a config: speed does not depend on the values),
               full fine-tune at batch 32, 64 and 256, sequence 128; LoRA at batch 64; torch.compile
               (finetune.compile) at batch 64. samples/s, tokens/s, MFU against the GPU's dense bf16 peak
               (6 * params * tokens + attention 12 * layers * hidden * seq per token), peak memory.
  2. dapt      domaintune.train.mlm.adapt (the dapt stage's core, on the engine) with the bundled MiniLM on
               BANKING77 train texts: samples/s, and the ratio to the 2-core CPU figure in
               bench/results/dapt.json (target: >= 20x).
  3. inference half-precision (bf16 on CUDA) vs float32 predictions of the same classifier
               (domaintune.core.device.place_for_inference + modeling.predict_logits): argmax agreement and the
               largest probability difference, the tolerance half-precision inference is held to.
The end-to-end DAG speed-up (target >= 3x 2 CPU cores) is `time dvc repro` on the two machines (README).

    python bench/train_gpu.py --out bench/results/train_gpu.json      # on the GPU machine
    python bench/train_gpu.py --smoke --out /tmp/train_gpu_smoke.json  # tiny shapes, CPU, a minute
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BANKING77 = REPO.parent / "shared" / "datasets" / "banking77"

# Dense bf16 peak (no sparsity) from NVIDIA's datasheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}

SIZES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}


def peak_tflops(device: str):
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def finetune_speed(size: str, method: str, batch: int, seq: int, steps: int, warmup: int, device: str,
                   compile_: bool = False) -> dict:
    """Engine steps of the finetune objective on fixed-length random batches."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from domaintune.core.params import FinetuneParams
    from domaintune.modeling.adapters import encoder_layers
    from domaintune.modeling.encoders import build_classifier, count_parameters
    from domaintune.train.classifier import _apply_method, _loss_function, _param_groups
    from domaintune.train.engine import Engine, EngineConfig

    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, attn_implementation="sdpa", **SIZES[size])
    model = build_classifier(BertModel(cfg, add_pooling_layer=False), num_labels=77, pooling="mean", dropout=0.1)
    total_params = count_parameters(model)
    ft = FinetuneParams(method=method, target_modules=("query", "key", "value", "dense"), compile=compile_)
    _apply_method(model, ft, seed=0, device=device)
    for p in model.head.parameters():
        p.requires_grad = True
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = _param_groups(model, trainable, ft, len(encoder_layers(model.encoder)))
    engine = Engine(model, groups, EngineConfig(lr=1e-4, total_steps=steps + warmup, bf16="auto",
                                                compile=compile_), device=device)
    ids = torch.randint(1000, 30000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    y = torch.randint(0, 77, (batch,), device=device)
    loss_fn = _loss_function(ft, np.zeros(1, dtype=int), 77, device)
    objective = lambda m, b: loss_fn(m(input_ids=b[0], attention_mask=b[1]).float(), b[2])  # noqa: E731
    model.train()
    for _ in range(warmup):
        engine.step(objective, [(ids, mask, y)])
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        rec = engine.step(objective, [(ids, mask, y)])
    _sync(device)
    tokens_s = batch * seq * steps / (time.perf_counter() - t0)
    peak = peak_tflops(device)
    flops_per_token = 6 * total_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    return {"size": size, "method": method, "batch": batch, "seq_len": seq, "steps": steps, "compile": compile_,
            "bf16": engine.bf16, "fused_adamw": bool(engine.opt.param_groups[0].get("fused")),
            "params_total": total_params, "params_trainable": sum(p.numel() for _, p in trainable),
            "samples_per_s": round(tokens_s / seq, 1), "tokens_per_s": round(tokens_s),
            "mfu": round(tokens_s * flops_per_token / (peak * 1e12), 4) if peak else None,
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if device.startswith("cuda") else None, "final_loss": round(rec["loss"], 4)}


def _texts(limit: int) -> list[str]:
    import pandas as pd

    f = BANKING77 / "train.csv"
    if f.is_file():
        return pd.read_csv(f)["text"].astype(str).tolist()[:limit]
    words = "card refund payment transfer account pin cash top up exchange rate fee balance".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 9)) for i in range(limit)]


def dapt_speed(device: str, steps: int, limit: int, batch: int) -> dict:
    """The dapt stage's core on the engine: samples/s of its training loop (head warm-up excluded)."""
    from domaintune.core.params import DaptParams
    from domaintune.modeling.encoders import resolve_model
    from domaintune.train.mlm import adapt, build_corpus

    corpus = build_corpus(_texts(limit), {}, train_file="banking77/train.csv")
    params = DaptParams(max_steps=steps, batch_size=batch, block_size=64, head_warmup_steps=2, checkpoint_every=0)
    _, _, metrics, info, _ = adapt(corpus, resolve_model("minilm"), params, 42, device, progress=False)
    out = {"steps": steps, "batch_size": batch, "block_size": 64, "samples_per_s": metrics["samples_per_s"],
           "bf16": info["bf16"], "texts": len(corpus.texts)}
    cpu_file = REPO / "bench" / "results" / "dapt.json"
    if cpu_file.is_file():
        cpu = json.loads(cpu_file.read_text()).get("dapt", {}).get("samples_per_s")
        if cpu:
            out["cpu_2core_samples_per_s"] = cpu
            out["ratio_vs_cpu_2core"] = round(metrics["samples_per_s"] / cpu, 1)
    return out


def inference_agreement(device: str, n: int) -> dict:
    """Half-precision vs float32 predictions of one classifier (bundled MiniLM encoder, seeded head)."""
    import numpy as np
    import torch

    from domaintune.core.device import inference_dtype, place_for_inference
    from domaintune.modeling.encoders import (
        build_classifier,
        load_encoder,
        load_tokenizer,
        predict_logits,
        resolve_model,
    )

    path = resolve_model("minilm")
    torch.manual_seed(0)
    model = build_classifier(load_encoder(path).float(), 77, "mean", 0.0)
    tok, texts = load_tokenizer(path), _texts(n)
    place_for_inference(model, device, half=False)
    ref = predict_logits(model, tok, texts, 256, 128)
    place_for_inference(model, device)
    t0 = time.perf_counter()
    half = predict_logits(model, tok, texts, 256, 128)
    seconds = time.perf_counter() - t0
    p_ref, p_half = (torch.softmax(torch.from_numpy(x), -1).numpy() for x in (ref, half))
    return {"texts": n, "dtype": str(inference_dtype(device)).replace("torch.", ""),
            "argmax_agreement": float((ref.argmax(1) == half.argmax(1)).mean()),
            "max_prob_abs_diff": float(np.abs(p_ref - p_half).max()), "half_texts_per_s": round(n / seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_gpu.json"))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (base.device's rule)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few steps on the CPU (checks the script)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dapt-steps", type=int, default=200)
    args = ap.parse_args(argv)
    import torch

    from domaintune.core.device import resolve_device

    device = "cpu" if args.smoke else resolve_device(args.device)
    if not args.smoke and not device.startswith("cuda"):
        raise SystemExit("bench/train_gpu.py: no CUDA device here; use --smoke to check the script on the CPU")
    t_all = time.perf_counter()
    if args.smoke:
        plan = [("smoke", "full", 4, 16, False), ("smoke", "lora", 4, 16, False)]
        steps, warmup, dapt_steps, inference_n = 2, 1, 2, 32
    else:
        plan = [(s, "full", b, 128, False) for s in ("minilm", "bert-base") for b in (32, 64, 256)]
        plan += [("bert-base", "lora", 64, 128, False), ("bert-base", "full", 64, 128, True),
                 ("minilm", "full", 64, 128, True)]
        steps, warmup, dapt_steps, inference_n = args.steps, 5, args.dapt_steps, 3000
    rows = []
    for size, method, batch, seq, comp in plan:
        try:
            row = finetune_speed(size, method, batch, seq, steps, warmup, device, comp)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
            row = {"size": size, "method": method, "batch": batch, "compile": comp,
                   "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    dapt = dapt_speed(device, dapt_steps, 256 if args.smoke else 10000, 4 if args.smoke else 128)
    print("dapt", json.dumps(dapt), flush=True)
    inference = inference_agreement(device, inference_n)
    print("inference", json.dumps(inference), flush=True)
    result = {"benchmark": "train_gpu", "smoke": args.smoke,
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
              "peak_bf16_tflops": peak_tflops(device),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "finetune": rows, "dapt": dapt, "inference_half_vs_fp32": inference,
              "seconds": round(time.perf_counter() - t_all, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
