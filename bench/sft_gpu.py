"""GPU SFT benchmark for base.task generation: QLoRA vs bf16 LoRA vs bf16 full on a ~1B Llama.

One script, at most ~5 minutes of GPU time. The model is a random LlamaForCausalLM with
TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632, vocab 32000):
speed and memory do not depend on the weights' values. Each method goes through the finetune
stage's own code: domaintune.train.sft.apply_method (full | LoRA | QLoRA = NF4 + double quant, bf16
compute), gradient checkpointing, the causal-LM objective of domaintune.llm on the training
engine (domaintune.engine, bf16 autocast) with the optimizer finetune.optimizer: auto picks
(domaintune.train.sft.optimizer_for: bitsandbytes' paged 8-bit AdamW for QLoRA on CUDA, fused torch AdamW
for LoRA and full). Batches are 1 x 1024 tokens of random ids with completion-only labels on the
second half. Peak memory is the training peak: counted from after the model is built and placed
(QLoRA's bf16 weights before quantisation are not a training cost).

Reported per method: tokens/s over the timed steps, peak GPU memory (torch.cuda.max_memory_allocated),
and the targets of issue 14: QLoRA peak <= 40% of bf16 LoRA's; QLoRA tokens/s >= 50% of bf16 LoRA's;
and QLoRA scaled against torchtune's published Llama 3.1 8B QLoRA figure (7.4 GiB peak, 2,413 tokens/s
on one RTX 4090) by parameter count (a rough yardstick: different GPU and model).

    python bench/sft_gpu.py --out bench/results/sft_gpu.json     # on a CUDA machine
    python bench/sft_gpu.py --smoke                               # CPU, tiny shape: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
    "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}
TORCHTUNE_8B_QLORA = {"peak_gib": 7.4, "tokens_per_s": 2413, "params": 8.03e9, "gpu": "RTX 4090",
                      "source": "torchtune README, Llama 3.1 8B QLoRA single device"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_method(method: str, shape: str, seq: int, steps: int, warmup: int, device: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from domaintune.core.params import FinetuneParams
    from domaintune.modeling import llm
    from domaintune.train.engine import Engine, EngineConfig, param_groups
    from domaintune.train.sft import apply_method, optimizer_for

    cuda = device == "cuda"
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=max(seq, 2048), tie_word_embeddings=False, **SHAPES[shape])
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(device):  # random init where it runs: seconds on a GPU, not a minute on the host
        model = LlamaForCausalLM(cfg).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    ft = FinetuneParams(method=method, lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules=tuple(TARGETS),
                        gradient_checkpointing=True, qlora_compute_dtype="bfloat16" if cuda else "float32")
    model = apply_method(model, ft, device, seed=0)
    model.train()
    optimizer = optimizer_for(ft, device)
    engine = Engine(model, param_groups(model.named_parameters(), 2e-4, 0.0),
                    EngineConfig(lr=2e-4, total_steps=steps + warmup, bf16="on" if cuda else "off", device=device,
                                 optimizer=optimizer))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the training peak: weights (as placed) + activations + state
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    labels = ids.clone()
    labels[:, : seq // 2] = llm.IGNORE
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq).unsqueeze(0)}
    for _ in range(warmup):
        engine.step(llm.causal_lm_loss, [batch])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        rec = engine.step(llm.causal_lm_loss, [batch])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "optimizer": optimizer, "params": n_params, "trainable": trainable,
            "tokens_per_s": round(steps * seq / seconds, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            "last_loss": round(rec["loss"], 4), "finite": bool(rec["loss"] == rec["loss"])}


def verdict(results: dict) -> dict:
    q, lo = results["qlora"], results["lora"]
    out = {"qlora_tokens_per_s_vs_lora": round(q["tokens_per_s"] / lo["tokens_per_s"], 3),
           "target_tokens_per_s_ratio": 0.5}
    out["tokens_per_s_ok"] = out["qlora_tokens_per_s_vs_lora"] >= 0.5
    if q["peak_gib"] is not None:
        out["qlora_peak_vs_lora"] = round(q["peak_gib"] / lo["peak_gib"], 3)
        out["target_peak_ratio"] = 0.4
        out["peak_ok"] = out["qlora_peak_vs_lora"] <= 0.4
        scale = q["params"] / TORCHTUNE_8B_QLORA["params"]
        out["torchtune_scaled"] = {"peak_gib_at_this_size": round(TORCHTUNE_8B_QLORA["peak_gib"] * scale, 3),
                                   "tokens_per_s_at_this_size": round(TORCHTUNE_8B_QLORA["tokens_per_s"] / scale, 1),
                                   "reference": TORCHTUNE_8B_QLORA}
    return out


def cpu_model() -> str:
    """lscpu's model name (the host CPU, recorded with every bench result)."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor() or "unknown")


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, 2 steps: checks the script runs")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("sft_gpu: error: no CUDA device (use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    shape = "smoke" if args.smoke else "llama-1.1b"
    load_start, t_start = os.getloadavg(), time.perf_counter()
    seq, steps, warmup = (128, 2, 1) if args.smoke else (args.seq, args.steps, args.warmup)
    results = {}
    for method in ("qlora", "lora", "full"):
        results[method] = run_method(method, shape, seq, steps, warmup, device)
        print(json.dumps(results[method]), flush=True)
    report = {"benchmark": "sft_gpu", "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
              or "cpu", "cpu_model": cpu_model(), "loadavg": {"start": load_start, "end": os.getloadavg()},
              "wall_seconds": round(time.perf_counter() - t_start, 1),
              "smoke": args.smoke, "shape": shape, "seq_len": seq, "steps": steps, "warmup": warmup,
              "versions": {"torch": torch.__version__}, "results": results, "verdict": verdict(results)}
    print(json.dumps(report["verdict"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
