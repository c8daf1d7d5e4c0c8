"""Training causal LMs on the engine (domaintune/train/engine.py): continued pre-training (dapt) and
supervised fine-tuning (finetune) for base.task: generation. See domaintune/evaluate/genaudit.py for
the data layout and domaintune/modeling/llm.py for the objective (completion-only loss, packing).

SFT methods: full | lora | qlora (the transformer blocks' Linear layers in NF4 with double
quantisation under LoRA adapters; bf16 compute by finetune.qlora_compute_dtype), optional
packing (finetune.packing) and gradient checkpointing (finetune.gradient_checkpointing);
checkpoints under --checkpoints make a crashed run resume where it stopped.

Why the engine and not TRL's SFTTrainer: on the same model, data and steps the engine trains 3.0x
more tokens/s at equal peak memory on the CPU (bench/sft.py, bench/results/sft.json), and shares
the checkpoints, device rule and curves of every other stage.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from domaintune.core.device import stage_device
from domaintune.core.errors import ParamsError
from domaintune.core.io import write_json
from domaintune.core.params import as_dict
from domaintune.modeling import llm
from domaintune.modeling.adapters import (
    check_4bit_shapes,
    check_target_modules,
    quantize_encoder_4bit,
    target_modules,
)
from domaintune.modeling.causal import RUN_FILE, encode_split, load_causal_lm, pairs
from domaintune.modeling.encoders import resolve_model
from domaintune.train import distributed
from domaintune.train.classifier import finetune_device
from domaintune.train.curves import write_curves
from domaintune.train.engine import Engine, EngineConfig, param_groups
from domaintune.train.runkey import run_key

# ---------------------------------------------------------------- batches for the engine

class Batches:
    """Endless, seeded, resumable batches of examples (packed rows or one example per row)."""

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int, block_size: int | None = None):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.units = llm.pack(examples, block_size) if block_size else [[i] for i in range(len(examples))]
        self.epoch, self.pos = 0, 0
        self.packed = bool(block_size)

    def __len__(self) -> int:
        return math.ceil(len(self.units) / self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state) -> None:
        if state:
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def __iter__(self):
        while True:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))
            while self.pos < len(order):
                chunk = [self.units[k] for k in order[self.pos: self.pos + self.batch_size]]
                self.pos += self.batch_size
                if self.packed:
                    yield llm.packed_batch(self.examples, chunk, self.pad_id)
                else:
                    yield llm.pad_batch([self.examples[u[0]] for u in chunk], self.pad_id)
            self.epoch, self.pos = self.epoch + 1, 0


class Shard:
    """This process's rows of every global micro-batch (rows rank, rank+world, ...), each carrying `norm`:
    the global micro-batch's target-token count over `world`. Every process builds the same seeded global
    batches, so the count needs no communication, and the engine's gradient sum over processes (each
    weighted 1/world) is exactly the one-process gradient of the mean over the global batch's targets.
    In one process a shard is the whole batch and `norm` its own count: the objective is unchanged."""

    def __init__(self, batches, world: int = 1, rank: int = 0):
        self.batches, self.world, self.rank = batches, world, rank
        self.tokens = 0  # input tokens of the global batches seen (every process counts the same)

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state) -> None:
        self.batches.load_state_dict(state)

    def __iter__(self):
        for batch in self.batches:
            self.tokens += int(batch["input_ids"].numel())
            yield shard_batch(batch, self.world, self.rank)


def shard_batch(batch: dict, world: int, rank: int) -> dict:
    """Rows rank::world of a global batch with `norm` = its target count / world. A process left without a
    row (a last batch smaller than the world) gets row 0 with no target: zero loss, zero gradients."""
    import torch

    _, valid = llm.target_mask(batch)
    norm = torch.tensor(max(int(valid.sum()), 1) / world, dtype=torch.float32)
    rows = list(range(rank, batch["input_ids"].shape[0], world))
    part = {k: v[rows or [0]] for k, v in batch.items()}
    if not rows:
        part["labels"] = torch.full_like(part["labels"], llm.IGNORE)
    part["norm"] = norm
    return part


def train(model, batches: Batches, steps: int, lr: float, warmup_ratio: float, weight_decay: float,
          max_grad_norm: float, scheduler: str = "linear", bf16: str = "off", device: str = "cpu",
          checkpoint_dir=None, checkpoint_every: int = 0, grad_accum: int = 1, optimizer: str = "adamw") -> dict:
    """Run the training engine on the causal-LM objective; returns history and throughput. Under a
    multi-process launch (domaintune.distributed) each process trains on its Shard of every global
    batch; rank 0 alone writes checkpoints."""
    cfg = EngineConfig(lr=lr, total_steps=steps, warmup_steps=int(warmup_ratio * steps), scheduler=scheduler,
                       max_grad_norm=max_grad_norm, bf16=bf16, device=device, checkpoint_every=checkpoint_every,
                       grad_accum=grad_accum, optimizer=optimizer)
    engine = Engine(model, param_groups(model.named_parameters(), lr, weight_decay), cfg,
                    checkpoint_dir=checkpoint_dir)
    shards = Shard(batches, distributed.world_size(), distributed.rank())
    model.train()  # from_pretrained returns eval mode: no dropout, and no gradient checkpointing
    t0 = time.perf_counter()
    history = engine.fit(llm.causal_lm_loss, shards)
    seconds = time.perf_counter() - t0
    engine.clear_checkpoint()
    return {"history": history, "steps": engine.step_count, "seconds": round(seconds, 3), "processes": shards.world,
            "tokens_per_second": round(shards.tokens / seconds, 1) if seconds > 0 else None}


def steps_for(n_batches: int, epochs: int | None, max_steps: int) -> int:
    return max(1, n_batches * epochs) if epochs else max_steps


# ---------------------------------------------------------------- dapt

def dapt_generation(splits: dict[str, pd.DataFrame], corpus: list[str], base, p, out, checkpoint_dir=None,
                    live: Path | None = None) -> dict:
    """Continued causal-LM pre-training; writes the model + tokenizer to `out` (None: a data-parallel
    helper process, which trains and writes nothing), returns the metrics."""
    import torch


    model, tok = load_causal_lm(base.model)
    texts = list(corpus) + splits["train"]["text"].tolist() + splits["train"]["label"].tolist()
    rng = np.random.default_rng(base.seed)
    order = rng.permutation(len(texts))
    n_held = max(1, int(round(p.heldout_fraction * len(texts))))
    held, train_texts = [texts[i] for i in order[:n_held]], [texts[i] for i in order[n_held:]]
    blocks = _blocks(tok, train_texts, p.block_size)
    heldout = _blocks(tok, held, p.block_size)
    writer = out is not None
    metrics = {"task": "generation", "enabled": p.enabled, "texts": {"train": len(train_texts), "heldout": n_held},
               "blocks": len(blocks), "processes": distributed.world_size()}
    if writer:
        metrics["perplexity_before"] = llm.perplexity(model, heldout, tok.pad_token_id, p.batch_size)["perplexity"]
    if p.enabled and blocks:
        batches = Batches(blocks, p.batch_size // p.grad_accum, tok.pad_token_id, base.seed, block_size=p.block_size)
        steps = steps_for(math.ceil(len(batches) / p.grad_accum), p.epochs, p.max_steps)
        run = train(model, batches, steps, p.lr, p.warmup_ratio, p.weight_decay, p.max_grad_norm,
                    device=stage_device(base), checkpoint_dir=checkpoint_dir, checkpoint_every=p.checkpoint_every,
                    grad_accum=p.grad_accum)
        if live is not None:
            write_curves(live, run["history"])
        model.to("cpu")
        metrics.update(steps=run["steps"], tokens_per_second=run["tokens_per_second"],
                       loss_first=run["history"][0]["loss"], loss_last=run["history"][-1]["loss"])
    if not writer:
        return metrics
    metrics["perplexity_after"] = llm.perplexity(model, heldout, tok.pad_token_id, p.batch_size)["perplexity"]
    with torch.no_grad():
        model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return metrics


def _blocks(tok, texts: Sequence[str], block_size: int) -> list[tuple[list[int], list[int]]]:
    """Each text (bos ... eos) cut into pieces of at most block_size tokens; every token a target."""
    out = []
    for t in texts:
        ids = llm.encode_text(tok, t)
        for k in range(0, len(ids), block_size):
            piece = ids[k: k + block_size]
            if len(piece) > 1:
                out.append((piece, piece))
    return out


# ---------------------------------------------------------------- finetune (SFT)

def optimizer_for(ft, device: str) -> str:
    """finetune.optimizer resolved for this device: auto is bitsandbytes' paged 8-bit AdamW for qlora on CUDA
    (the optimizer state of QLoRA recipes: 8-bit moments that page to host memory under pressure) and torch
    AdamW elsewhere; paged_adamw_8bit without CUDA is a ParamsError (one line, exit 2)."""
    if ft.optimizer == "paged_adamw_8bit":
        if not device.startswith("cuda"):
            raise ParamsError(f"params.yaml: finetune.optimizer: paged_adamw_8bit needs a CUDA device (bitsandbytes "
                              f"pages its state through CUDA memory) but this run trains on {device}; "
                              "use auto or adamw")
        return "paged_adamw_8bit"
    if ft.optimizer == "auto" and ft.method == "qlora" and device.startswith("cuda"):
        return "paged_adamw_8bit"
    return "adamw"


def apply_method(model, ft, device: str, seed: int):
    """full: every weight trains; lora: adapters on finetune.target_modules; qlora: the transformer
    blocks' Linear layers in NF4 (double quant) under the adapters. Returns the model to train."""
    import torch

    if ft.method not in ("full", "lora", "qlora"):
        raise ParamsError(f"params.yaml: finetune.method: {ft.method!r} is for classification; "
                          "base.task generation takes full, lora or qlora")
    if len(ft.seeds) > 1:
        raise ParamsError(f"params.yaml: finetune.seeds: base.task generation trains one model; list one seed, "
                          f"got {list(ft.seeds)}")
    if ft.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if ft.method == "full":
        return model
    from peft import LoraConfig, get_peft_model


    targets = target_modules(model, ft.target_modules, causal=True)
    check_target_modules(model, targets)
    if ft.method == "qlora":
        check_4bit_shapes(model, device)
        quantize_encoder_4bit(model, ft.qlora_compute_dtype)
    if ft.gradient_checkpointing:
        model.enable_input_require_grads()
    torch.manual_seed(seed)
    cfg = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout, bias="none",
                     target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def finetune_generation(splits: dict[str, pd.DataFrame], encoder_dir: str, base, ft, out: Path | None,
                        checkpoints: str, live: Path | None, data_hash: str) -> dict:
    """SFT on train, perplexity on validation; writes the model (or adapter) + tokenizer + run.json.
    out None: a data-parallel helper process, which trains on its shard and writes nothing."""
    device = finetune_device(base, ft)
    seed = ft.seeds[0]
    model, tok = load_causal_lm(encoder_dir)
    enc = encode_split(tok, splits["train"], base.max_length)
    kept = [e for e in enc if e.response_tokens - e.cut_tokens > 0]
    skipped = [rid for rid, e in zip(splits["train"]["id"], enc) if e.response_tokens - e.cut_tokens == 0]
    if not kept:
        raise ParamsError(f"params.yaml: base.max_length: {base.max_length} leaves no response token in any "
                          "train example")
    model = apply_method(model, ft, device, seed)
    batches = Batches(pairs(kept), ft.batch_size // ft.grad_accum, tok.pad_token_id, seed,
                      block_size=base.max_length if ft.packing else None)
    key = run_key("finetune", ft, encoder_dir, max_length=base.max_length, data=data_hash, seed=seed)
    run = train(model, batches, steps_for(math.ceil(len(batches) / ft.grad_accum), ft.epochs, 0), ft.lr,
                ft.warmup_ratio, ft.weight_decay, ft.max_grad_norm, ft.scheduler, ft.bf16, device,
                Path(checkpoints) / f"sft-{key}", ft.checkpoint_every, ft.grad_accum, optimizer_for(ft, device))
    model.to("cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = {"task": "generation", "method": ft.method, "packing": ft.packing, "steps": run["steps"],
               "optimizer": optimizer_for(ft, device),
               "processes": distributed.world_size(), "train_examples": len(kept),
               "skipped_no_response_tokens": skipped, "loss_first": run["history"][0]["loss"],
               "loss_last": run["history"][-1]["loss"], "tokens_per_second": run["tokens_per_second"],
               "seconds": run["seconds"], "trainable_parameters": int(trainable), "dataset_hash": data_hash}
    if out is None:
        return metrics
    metrics["validation"] = llm.perplexity(model, pairs(encode_split(tok, splits["validation"], base.max_length)),
                                           tok.pad_token_id, ft.batch_size) if len(splits["validation"]) else None
    save_tuned(model, tok, out, ft, encoder_dir)
    write_curves(live, run["history"])
    return metrics


def save_tuned(model, tok, out: Path, ft, encoder_dir: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_json(out / RUN_FILE, {"task": "generation", "method": ft.method, "base_model": str(encoder_dir),
                                "qlora_compute_dtype": ft.qlora_compute_dtype, "finetune": as_dict(ft)})


def dapt_summary(metrics: dict) -> str:
    if "perplexity_after" not in metrics:  # a data-parallel helper process: it trained, rank 0 measures
        return f"causal-LM training on this process's shard ({metrics.get('steps', 0)} steps)"
    return (f"causal-LM held-out perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity_after']:.2f}"
            f" ({metrics.get('steps', 0)} steps, {metrics.get('processes', 1)} process(es))")


def dapt_key(base, p, data_hash: str) -> str:
    """The run key of a causal-LM DAPT run (domaintune/train/runkey.py)."""
    return run_key("dapt", p, resolve_model(base.model), base=as_dict(base), data=data_hash)


def checkpoints_readme(folder: str) -> None:
    """DVC needs the persisted checkpoints out to exist even when a finished run cleared its state."""
    ckpt = Path(folder)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "README.txt").write_text("Resumable training state, one folder per run key; a finished run removes it.\n")


def finetune_summary(metrics: dict) -> str:
    val = metrics.get("validation")
    return (f"SFT {metrics['method']}: {metrics['steps']} steps in {metrics.get('processes', 1)} process(es), loss "
            f"{metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}"
            + (f", validation perplexity {val['perplexity']:.2f}" if val else ""))
