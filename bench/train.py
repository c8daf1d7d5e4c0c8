"""Training benchmarks on BANKING77 (issue 4, benchmarks 1-3).

Heavy: run under `flock /tmp/domaintune-heavy.lock`. Parts (each merges its
results into bench/results/train.json, or --results):

  throughput  side by side in one process, same subset, steps, batch and seed:
              (1) the seeds' recipe: HF Trainer, padding="max_length", max_length=256
              (2) a competent HF Trainer: dynamic padding, length-grouped sampler
              (3) our finetune loop (domaintune.train.classifier.train_one, method full)
              -> training samples/s and the ratios ours/(1), ours/(2)
  quality     our default recipe (params.yaml finetune section) on the full train
              set, one run per --seeds, test accuracy mean +- std; --methods adds a
              table (accuracy, trainable params, time, peak memory), one
              subprocess per run so peak memory is per run
  bf16        bf16 autocast vs float32 of our default recipe at equal data/epochs/seed: test accuracy
              and samples/s (decides domaintune.core.device.CPU_BF16_AUTO on this CPU kind)
  hf-quality  the HF recipes trained to the end (same epochs/LR/seed) -> test
              accuracy, to compare with ours at equal data and epochs
(GPU speed, benchmark 5, is bench/train_gpu.py.) With --cpu a part stays on
the CPU even where CUDA exists; under `taskset -c 0,1` that is "2 CPU cores".

Every run's exact setting (rows, steps, epochs, threads, device) is recorded
next to its numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# Steps left out of steady-state throughput (first-call allocations, kernel selection).
WARMUP_STEPS = 3
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "banking77"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_banking77(folder: Path):
    tr = pd.read_csv(folder / "train.csv")
    te = pd.read_csv(folder / "test.csv")
    labels = sorted(tr["category"].unique())

    def frame(df, split):
        return pd.DataFrame({"id": [f"{split}-{i}" for i in range(len(df))], "text": df["text"].astype(str),
                             "label": df["category"].astype(str), "split": split})

    return frame(tr, "train"), frame(te, "test"), labels


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def env_info() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "cpus": len(os.sched_getaffinity(0)), "machine": platform.node(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def merge_results(path: Path, key: str, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2) + "\n")


def accuracy(model, tok, df: pd.DataFrame, labels, max_length=128) -> float:
    from domaintune.modeling.encoders import predict_logits

    logits = predict_logits(model, tok, df["text"].tolist(), batch_size=128, max_length=max_length)
    return float((np.array(labels)[logits.argmax(1)] == df["label"].to_numpy()).mean())


# ---------------------------------------------------------------- HF Trainer baselines

class _Rows:
    """A plain torch Dataset of tokenised rows (no `datasets` dependency)."""

    def __init__(self, enc, y):
        self.enc, self.y = enc, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        row = {k: v[i] for k, v in self.enc.items()}
        row["labels"] = int(self.y[i])
        return row


def hf_train(train_df, labels, model_dir, *, padded: bool, seed: int, batch_size: int, lr: float,
             max_steps: int = -1, epochs: float = 1.0, bf16: bool = False, device: str = "cpu"):
    """HF Trainer fine-tune. padded=True: the seeds' recipe (pad every text to 256 tokens);
    False: dynamic padding + length-grouped sampling. Returns (model, tokenizer, seconds, samples)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    y = np.array([labels.index(v) for v in train_df["label"]])
    texts = train_df["text"].tolist()
    if padded:
        enc = tok(texts, padding="max_length", truncation=True, max_length=256)
        collator = default_data_collator
    else:
        enc = tok(texts, truncation=True, max_length=128)
        collator = DataCollatorWithPadding(tok)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels),
                                                               attn_implementation="sdpa", use_safetensors=True)
    steps_total = max_steps if max_steps > 0 else int(np.ceil(len(texts) / batch_size) * epochs)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw = dict(output_dir=tempfile.mkdtemp(prefix="hfbench-"), per_device_train_batch_size=batch_size,
              learning_rate=lr, weight_decay=0.01, warmup_steps=int(0.06 * steps_total), max_steps=max_steps,
              num_train_epochs=epochs, seed=seed, report_to=[], save_strategy="no", logging_strategy="no",
              dataloader_num_workers=0, disable_tqdm=True, bf16=bf16, use_cpu=device == "cpu")
    if not padded:  # the sampler option was renamed in transformers 5.x
        if "group_by_length" in fields:
            kw["group_by_length"] = True
        else:
            kw["train_sampling_strategy"] = "group_by_length"
    args = TrainingArguments(**{k: v for k, v in kw.items() if k in fields})
    from transformers import TrainerCallback

    stamps = []

    class Stamp(TrainerCallback):  # per-step wall clock, for steady-state throughput
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    trainer = Trainer(model=model, args=args, train_dataset=_Rows(enc, y), data_collator=collator,
                      callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    samples = steps_total * batch_size if max_steps > 0 else len(texts) * epochs
    steady = None
    if len(stamps) > WARMUP_STEPS + 1:  # full batches only: steps after warm-up, before a ragged last one
        n = len(stamps) - 1 - WARMUP_STEPS
        steady = n * batch_size / (stamps[-2] - stamps[WARMUP_STEPS - 1]) if n > 0 else None
    return trainer.model, tok, secs, samples, steady


def hf_accuracy(model, tok, df, labels, device) -> float:
    import torch

    from domaintune.modeling.encoders import TokenBatches

    model.eval()
    texts = df["text"].tolist()
    pred = np.zeros(len(texts), dtype=int)
    with torch.inference_mode():
        for idx, enc in TokenBatches(tok, texts, 128, 128):
            enc = {k: torch.from_numpy(v).to(device) for k, v in enc.items()}
            pred[idx] = model(**enc).logits.argmax(-1).cpu().numpy()
    return float((np.array(labels)[pred] == df["label"].to_numpy()).mean())


# ---------------------------------------------------------------- ours

def ours_params(params_file: Path, **over):
    from domaintune.core.params import load_params

    base, ft = load_params(params_file, "base", "finetune")
    fields = {k: v for k, v in dataclasses.asdict(ft).items()}
    fields.update(over)
    return base, type(ft)(**fields)


def ours_train(train_df, labels, model_dir, base, ft, seed):
    from domaintune.train.classifier import train_one

    empty = train_df.iloc[:0]
    return train_one(train_df, empty, labels, str(model_dir), base, ft, seed=seed, progress=False)


# ---------------------------------------------------------------- parts

def part_throughput(a) -> dict:
    import torch

    from domaintune.modeling.encoders import set_threads

    set_threads()
    train, test, labels = load_banking77(a.data)
    n = a.steps * a.batch_size
    sub = train.sample(n=n, random_state=a.seed).reset_index(drop=True)
    out = {"setting": {"rows": n, "steps": a.steps, "batch_size": a.batch_size, "epochs": 1, "seed": a.seed,
                       "lr": 5e-5, "model": str(a.model), "env": env_info()}}
    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    base, ft = ours_params(a.params, method="full", epochs=1, batch_size=a.batch_size, lr=5e-5, seeds=(a.seed,),
                           checkpoint_every=0, device=device, bf16="off")
    runs = [("ours", "off")] + ([("ours_bf16", "on")] if a.bf16 else [])
    for name, bf16 in runs:  # the product's engine (train_one -> FinetuneRun -> Engine), float32 and bf16 autocast
        ft = dataclasses.replace(ft, bf16=bf16)
        model, tok, _, res = ours_train(sub, labels, a.model, base, ft, a.seed)
        st = res["history"]["steps"]
        steady = sum(s["samples"] for s in st[WARMUP_STEPS:-1]) / (st[-2]["seconds"] - st[WARMUP_STEPS - 1]["seconds"])
        out[name] = {"seconds": res["train_seconds"], "samples_per_s": res["train_samples_per_s"],
                     "steady_samples_per_s": steady, "probe_seconds": res["probe_seconds"], "steps": res["steps"],
                     "bf16": res["bf16"]}
        print(name, out[name], flush=True)
        del model
    for name, padded in (("hf_competent", False), ("hf_seeds_recipe", True)):
        m, _, secs, samples, steady = hf_train(sub, labels, a.model, padded=padded, seed=a.seed,
                                               batch_size=a.batch_size, lr=5e-5, max_steps=a.steps, device=device)
        out[name] = {"seconds": secs, "samples_per_s": samples / secs, "steady_samples_per_s": steady,
                     "steps": a.steps}
        print(name, out[name], flush=True)
        del m
    for kind in ("samples_per_s", "steady_samples_per_s"):
        out[f"ratio_vs_seeds_recipe_{kind}"] = out["ours"][kind] / out["hf_seeds_recipe"][kind]
        out[f"ratio_vs_competent_{kind}"] = out["ours"][kind] / out["hf_competent"][kind]
        if "ours_bf16" in out:
            out[f"ratio_bf16_vs_fp32_{kind}"] = out["ours_bf16"][kind] / out["ours"][kind]
    print({k: v for k, v in out.items() if k.startswith("ratio")}, flush=True)
    return out


def run_one(a) -> dict:
    """One of our runs on the full train set; evaluated on test. Runs in its own process."""
    import torch

    from domaintune.modeling.encoders import count_parameters, set_threads

    set_threads()
    train, test, labels = load_banking77(a.data)
    if a.train_limit:
        train = train.sample(n=a.train_limit, random_state=0).reset_index(drop=True)
    if a.test_limit:  # smoke runs only
        test = test.sample(n=a.test_limit, random_state=0).reset_index(drop=True)
    over = json.loads(a.override or "{}")
    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    base, ft = ours_params(a.params, seeds=(a.seed,), checkpoint_every=0, device=device, **over)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, tok, names, res = ours_train(train, labels, a.model, base, ft, a.seed)
    total = time.perf_counter() - t0
    acc = accuracy(model, tok, test, names, base.max_length)
    row = {"method": ft.method, "seed": a.seed, "test_accuracy": acc, "train_rows": len(train),
           "epochs": ft.epochs, "lr": ft.lr, "trainable_params": res["trainable_params"],
           "total_params": count_parameters(model), "train_seconds": res["train_seconds"],
           "probe_seconds": res["probe_seconds"], "total_seconds": total,
           "train_samples_per_s": res["train_samples_per_s"], "peak_rss_mb": peak_rss_mb(),
           "device": device, "override": over, "env": env_info()}
    if device == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _child(a, seed: int, override: dict, cores: str | None = None) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as fh:
        cmd = [sys.executable, __file__, "one", "--seed", str(seed), "--override", json.dumps(override),
               "--json-out", fh.name, "--data", str(a.data), "--model", str(a.model), "--params", str(a.params)]
        if a.train_limit:
            cmd += ["--train-limit", str(a.train_limit)]
        if a.test_limit:
            cmd += ["--test-limit", str(a.test_limit)]
        if a.cpu:
            cmd.append("--cpu")
        if cores:
            cmd = ["taskset", "-c", cores] + cmd
        subprocess.run(cmd, check=True)
        return json.loads(Path(fh.name).read_text())


def part_quality(a) -> dict:
    common = json.loads(a.override or "{}")  # applies to every run (e.g. {"bf16": "off"})
    runs = [(s, dict(common)) for s in a.seeds] + [(a.seeds[0], {**common, "method": m, **_method_defaults(m)})
                                                  for m in a.methods]
    rows = []
    if a.parallel_cores:  # one 2-core slot per run (GPU machine's CPUs: runs must not share cores)
        from concurrent.futures import ThreadPoolExecutor

        slots = a.parallel_cores.split(";")
        with ThreadPoolExecutor(len(slots)) as ex:
            futs = [ex.submit(_child, a, s, o, slots[i % len(slots)]) for i, (s, o) in enumerate(runs)]
            rows = [f.result() for f in futs]
    else:
        rows = [_child(a, s, o) for s, o in runs]
    for r in rows:
        print(json.dumps({k: r[k] for k in ("method", "seed", "test_accuracy", "train_seconds", "peak_rss_mb")}),
              flush=True)
    default = rows[: len(a.seeds)]
    accs = [r["test_accuracy"] for r in default]
    return {"setting": {"seeds": a.seeds, "train_limit": a.train_limit, "test_limit": a.test_limit, "params": str(a.params),
                        "override": common, "parallel_cores": a.parallel_cores},
            "default_test_accuracy_mean": float(np.mean(accs)),
            "default_test_accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "default_runs": default, "methods": rows[len(a.seeds):]}


def part_bf16(a) -> dict:
    """bf16 autocast vs float32 on this CPU at equal data, epochs and seed: test accuracy and training samples/s
    of the product's finetune (the default recipe), each run in its own process."""
    rows = {}
    for name, bf16 in (("fp32", "off"), ("bf16", "on")):
        rows[name] = _child(a, a.seed, {"bf16": bf16, "epochs": int(a.epochs)})
        print(name, {k: rows[name][k] for k in ("test_accuracy", "train_seconds", "train_samples_per_s")}, flush=True)
    return {"setting": {"train_limit": a.train_limit, "test_limit": a.test_limit, "epochs": int(a.epochs),
                        "seed": a.seed, "env": env_info()},
            **rows, "accuracy_bf16_minus_fp32": rows["bf16"]["test_accuracy"] - rows["fp32"]["test_accuracy"],
            "speed_bf16_over_fp32": rows["bf16"]["train_samples_per_s"] / rows["fp32"]["train_samples_per_s"]}


def _method_defaults(method: str) -> dict:
    # LoRA/QLoRA/head want a larger LR than a full fine-tune (few, freshly initialised weights).
    return {"lora": {"lr": 5e-4}, "qlora": {"lr": 5e-4}, "head": {"lr": 1e-3}, "freeze": {"freeze_layers": 3},
            "full": {}}[method]


def part_hf_quality(a) -> dict:
    import torch

    train, test, labels = load_banking77(a.data)
    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    out = {"setting": {"epochs": a.epochs, "lr": 5e-5, "batch_size": 32, "seed": a.seed, "env": env_info()}}
    for name, padded in (("hf_competent", False), ("hf_seeds_recipe", True)):
        m, tok, secs, _, _ = hf_train(train, labels, a.model, padded=padded, seed=a.seed, batch_size=32, lr=5e-5,
                                      epochs=a.epochs, device=device)
        out[name] = {"test_accuracy": hf_accuracy(m, tok, test, labels, device), "train_seconds": secs}
        print(name, out[name], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["throughput", "quality", "hf-quality", "bf16", "one"])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", type=Path, default=None, help="encoder folder (default: bundled MiniLM)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "train.json")
    ap.add_argument("--key", default=None, help="key in the results JSON (default: the part name)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--methods", nargs="*", default=[])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--train-limit", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=0)
    ap.add_argument("--override", default="{}")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--parallel-cores", default="", help='e.g. "0,1;2,3;4,5": run quality runs side by side')
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is there")
    ap.add_argument("--bf16", action="store_true", help="throughput: also time our engine under bf16 autocast")
    a = ap.parse_args(argv)
    if a.model is None:
        from domaintune.modeling.encoders import resolve_model

        a.model = Path(resolve_model("minilm"))
    if a.part == "one":
        row = run_one(a)
        a.json_out.write_text(json.dumps(row))
        return 0
    fn = {"throughput": part_throughput, "quality": part_quality, "hf-quality": part_hf_quality,
          "bf16": part_bf16}[a.part]
    t0 = time.perf_counter()
    res = fn(a)
    res["wall_seconds"] = time.perf_counter() - t0
    res["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    merge_results(a.results, a.key or a.part, res)
    print(json.dumps(res, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
