"""GPU training benchmark: lora vs qlora vs full, MiniLM-sized and BERT-base-sized.

Runs on a CUDA machine (the project's CI has none). For each size and method it
builds the same EncoderClassifier the finetune stage trains (random weights
from a config: speed does not depend on the values), applies the finetune
stage's own method surgery (domaintune.training._apply_method: LoRA via peft,
QLoRA = bitsandbytes NF4 Linear4bit + LoRA), and times optimizer steps on
batches of fixed length under bf16 autocast, all sizes and methods in one run.

Reported per configuration: samples/s, tokens/s, model FLOP utilisation (MFU)
against the GPU's dense bf16 peak, and peak GPU memory. MFU counts the usual
6 * params * tokens training FLOPs plus attention (12 * layers * hidden * seq
per token); for LoRA/QLoRA the frozen weights get no weight gradient, so the
work really done is ~4 * params * tokens: both figures are written.

    python bench/train_gpu.py --out bench/results/train_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 peak (no sparsity) from NVIDIA's datasheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}

SIZES = {
    # all-MiniLM-L6-v2's shape
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    # bert-base-uncased's shape
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def peak_tflops(name: str) -> float:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: add its dense bf16 peak to PEAK_BF16_TFLOPS")


def bench_one(size: str, method: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from domaintune.modeling import build_classifier, count_parameters
    from domaintune.params import FinetuneParams
    from domaintune.training import _apply_method

    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, attn_implementation="sdpa", **SIZES[size])
    encoder = BertModel(cfg, add_pooling_layer=False)
    model = build_classifier(encoder, num_labels=77, pooling="mean", dropout=0.1).cuda()
    total_params = count_parameters(model)
    ft = FinetuneParams(method=method, target_modules=("query", "key", "value", "dense"), qlora_compute_dtype="bfloat16")
    _apply_method(model, ft, seed=0)
    model.cuda()
    for p in model.head.parameters():
        p.requires_grad = True
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    ids = torch.randint(1000, 30000, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    y = torch.randint(0, 77, (batch,), device="cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(ids, mask), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    samples_s = batch * steps / dt
    tokens_s = samples_s * seq
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    attn_flops_per_token = 12 * layers * hidden * seq  # QK^T and AV, forward+backward
    peak = peak_tflops(torch.cuda.get_device_name()) * 1e12
    return {
        "size": size, "method": method, "batch": batch, "seq_len": seq, "steps": steps,
        "params_total": total_params, "params_trainable": sum(p.numel() for p in trainable),
        "samples_per_s": round(samples_s, 1), "tokens_per_s": round(tokens_s),
        "mfu_6n": round(tokens_s * (6 * total_params + attn_flops_per_token) / peak, 4),
        "mfu_4n_frozen_base": round(tokens_s * (4 * total_params + attn_flops_per_token) / peak, 4)
        if method in ("lora", "qlora") else None,
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "final_loss": round(float(loss.detach()), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/train_gpu.json")
    # 32 is what the CPU default uses (launch-bound on an H100); 256 fills the GPU.
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/train_gpu.py needs a CUDA GPU")
    rows = []
    for size in SIZES:
        for batch in args.batch:
            for method in ("full", "lora", "qlora"):
                try:
                    row = bench_one(size, method, batch, args.seq, args.steps, args.warmup)
                except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others
                    row = {"size": size, "method": method, "batch": batch, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(row), flush=True)
                rows.append(row)
    import bitsandbytes
    import peft
    import transformers

    result = {
        "benchmark": "train_gpu",
        "device": torch.cuda.get_device_name(),
        "peak_bf16_tflops": peak_tflops(torch.cuda.get_device_name()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "settings": {"batches": args.batch, "seq_len": args.seq, "steps": args.steps, "warmup": args.warmup,
                     "precision": "bf16 autocast", "weights": "random init from config",
                     "lora_targets": ["query", "key", "value", "dense"]},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
