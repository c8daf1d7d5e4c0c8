"""CPU SFT benchmark: the project's engine (domaintune.sft) vs TRL's SFTTrainer, same model and data.

Why: issue 14 lets finetune build on TRL's SFTTrainer or on the project's engine, chosen by
measurement. Both train the same random Llama (hidden 256, 4 layers, the project's BPE tokenizer
trained on examples/support_replies) with LoRA on the attention projections, completion-only
loss, batch 8, the same number of steps, on the CPU in float32. Each variant runs in its own
process so its peak resident memory (ru_maxrss) is its own.

Reported: real (non-padding) tokens per second, examples per second, peak RSS, and the lines of
code each path needs on top of what the stages share (counted from the sources).

    flock /tmp/domaintune-heavy.lock python bench/sft.py --out bench/results/sft.json
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAIRS = ROOT / "examples" / "support_replies" / "pairs.csv"
SHAPE = dict(hidden=256, layers=4, heads=4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _setup(workdir: Path, n: int):
    from domaintune.modeling import llm, tinyllm

    rows = list(csv.DictReader(PAIRS.open(encoding="utf-8")))[:n]
    model_dir = workdir / "model"
    if not model_dir.exists():
        tinyllm.save(model_dir, [r["prompt"] for r in rows] + [r["response"] for r in rows], seed=0, **SHAPE)
    from domaintune.modeling.causal import load_causal_lm

    model, tok = load_causal_lm(str(model_dir))
    enc = [llm.encode(tok, r["prompt"], r["response"], 256) for r in rows]
    return rows, model, tok, enc


def run_engine(workdir: Path, n: int, steps: int, batch: int) -> dict:
    from domaintune.core.params import FinetuneParams
    from domaintune.train.sft import Batches, apply_method, train

    rows, model, tok, enc = _setup(workdir, n)
    ft = FinetuneParams(method="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules=tuple(TARGETS))
    model = apply_method(model, ft, "cpu", 0)
    batches = Batches([(e.input_ids, e.labels) for e in enc], batch, tok.pad_token_id, 0)
    t0 = time.perf_counter()
    run = train(model, batches, steps, 1e-3, 0.0, 0.0, 1.0)
    return {"seconds": time.perf_counter() - t0, "last_loss": run["history"][-1]["loss"]}


def run_trl(workdir: Path, n: int, steps: int, batch: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from domaintune.modeling import llm

    rows, model, tok, _ = _setup(workdir, n)
    # the same rendered text as the engine path: prompt = template up to the reply, completion = reply + end
    data = []
    for r in rows:
        full, start, _ = llm.render(tok, r["prompt"], r["response"])
        data.append({"prompt": full[:start], "completion": full[start:]})
    cfg = SFTConfig(output_dir=str(workdir / "trl"), max_length=256, per_device_train_batch_size=batch,
                    max_steps=steps, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0,
                    logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True,
                    completion_only_loss=True, dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=lora)
    t0 = time.perf_counter()
    out = trainer.train()
    return {"seconds": time.perf_counter() - t0, "last_loss": out.training_loss}


def child(variant: str, workdir: str, n: int, steps: int, batch: int) -> None:
    import torch

    torch.manual_seed(0)
    res = (run_engine if variant == "engine" else run_trl)(Path(workdir), n, steps, batch)
    res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(res))


def code_lines() -> dict:
    """Non-blank, non-comment lines: the engine path's own SFT code vs the TRL path's glue above."""
    def count(path: Path, start: str | None = None, end: str | None = None) -> int:
        text = path.read_text().split("\n")
        if start:
            i = next(k for k, line in enumerate(text) if line.startswith(start))
            j = next(k for k, line in enumerate(text[i + 1:], i + 1) if line.startswith(end)) if end else len(text)
            text = text[i:j]
        return sum(1 for line in text if line.strip() and not line.strip().startswith("#"))
    return {"engine_path": count(ROOT / "domaintune" / "llm.py") + count(ROOT / "domaintune" / "sft.py"),
            "trl_glue_in_this_bench": count(Path(__file__), "def run_trl", "def child")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--child", choices=["engine", "trl"])
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.workdir, args.rows, args.steps, args.batch)
        return 0
    with tempfile.TemporaryDirectory() as wd:
        from domaintune.modeling import llm
        from domaintune.modeling.causal import load_causal_lm

        _setup(Path(wd), args.rows)  # build the model + tokenizer once, outside the timed children
        _, tok = load_causal_lm(str(Path(wd) / "model"))
        rows = list(csv.DictReader(PAIRS.open(encoding="utf-8")))[: args.rows]
        mean_tokens = sum(len(llm.encode(tok, r["prompt"], r["response"], 256).input_ids) for r in rows) / len(rows)
        results = {}
        for variant in ("engine", "trl", "engine", "trl"):  # interleaved twice; the best of two is kept
            proc = subprocess.run([sys.executable, __file__, "--child", variant, "--workdir", wd, "--rows",
                                   str(args.rows), "--steps", str(args.steps), "--batch", str(args.batch)],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(line[7:])
            res["examples_per_s"] = round(args.steps * args.batch / res["seconds"], 2)
            res["real_tokens_per_s"] = round(res["examples_per_s"] * mean_tokens, 1)
            if variant not in results or res["seconds"] < results[variant]["seconds"]:
                results[variant] = res
    report = {"benchmark": "sft_cpu", "machine": "shared 2-core Intel Xeon (AVX512), float32",
              "settings": {"rows": args.rows, "steps": args.steps, "batch": args.batch, "method": "lora r16",
                           "shape": SHAPE, "mean_tokens_per_example": round(mean_tokens, 1)},
              "results": results, "code_lines": code_lines(),
              "engine_vs_trl_tokens_per_s": round(results["engine"]["real_tokens_per_s"]
                                                  / results["trl"]["real_tokens_per_s"], 3)}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
