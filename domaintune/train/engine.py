"""The training engine: written once, driven by DAPT (MLM), fine-tuning (classification) and SFT (causal LM).

The engine owns what every objective shares: AdamW (fused where the device has it) over
parameter groups, the LR schedule, gradient clipping, gradient accumulation, bf16 autocast,
device placement, gradient averaging across data-parallel processes, resumable checkpoints
(safetensors + JSON, no pickle, written atomically) and the per-step history that DVCLive
curves are drawn from. A method (full, freeze, LoRA, ...) decides which parameters train;
an objective decides what a batch's loss is. Neither touches the optimiser.

How an objective plugs in -- three things: the trainable parameters, a batch iterator, and a
loss function over a batch::

    from domaintune.engine import Engine, EngineConfig, param_groups

    groups = param_groups(model.named_parameters(), lr=5e-5, weight_decay=0.01)   # requires_grad only
    cfg = EngineConfig(lr=5e-5, total_steps=1000, warmup_steps=60, max_grad_norm=1.0,
                       grad_accum=2, bf16="auto", device="auto", checkpoint_every=100)
    engine = Engine(model, groups, cfg, checkpoint_dir="models/checkpoints/sft-<key>")

    def loss_fn(model, batch):           # runs under the engine's autocast, on its device
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return causal_lm_loss(out.logits, batch["labels"])   # a scalar: the mean over the batch

    batches = MyBatches(...)             # iterable; state_dict()/load_state_dict() for exact resume
    history = engine.fit(loss_fn, batches, progress="sft")   # resumes if a checkpoint exists
    write_curves("reports/sft/live", history)   # domaintune/train/curves.py: the one DVCLive writer

`fit` pulls `grad_accum` batches per optimizer step, moves tensors (dicts / tuples of
tensors) to the device, and stops at `total_steps`. An objective that needs its own loop
(fine-tuning: epochs, validation, early stopping) calls `engine.step(loss_fn, micro_batches)`
and `engine.save(loop_state)` / `engine.restore()` itself. Under a multi-process launch
(`domaintune.distributed`), each process passes its share of the global batch and
`step(..., weights=...)` averages gradients so the update equals the one-process update on
the global batch; only rank 0 writes checkpoints and outputs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from domaintune.core.device import resolve_device, use_bf16
from domaintune.core.io import atomic_output, read_json, write_json
from domaintune.core.progress import Progress
from domaintune.train import distributed
from domaintune.train.optim import lr_schedule, no_weight_decay

log = logging.getLogger("domaintune.engine")

# Test hook: raise after this many optimizer steps (after checkpointing), to simulate a crash.
CRASH_ENV = "DOMAINTUNE_CRASH_AFTER_STEPS"
# Test hook "N:PATH": in the Nth checkpoint write of this process, once its first file is written,
# create PATH and wait to be killed (tests SIGKILL the stage mid-write); raises if nobody does in 120 s.
STALL_ENV = "DOMAINTUNE_STALL_IN_CHECKPOINT_WRITE"
_checkpoint_writes = 0


class TrainingCrash(RuntimeError):
    """Raised by the CRASH_ENV test hook."""


def crash_after() -> int:
    return int(os.environ.get(CRASH_ENV, "0") or 0)


def _stall_hook() -> None:
    global _checkpoint_writes
    _checkpoint_writes += 1
    spec = os.environ.get(STALL_ENV, "")
    if spec and int(spec.split(":", 1)[0]) == _checkpoint_writes:
        Path(spec.split(":", 1)[1]).write_text(str(os.getpid()))
        time.sleep(120)
        raise TrainingCrash(f"{STALL_ENV}: nobody killed this process during checkpoint write {_checkpoint_writes}")


@dataclass
class EngineConfig:
    lr: float
    total_steps: int
    warmup_steps: int = 0
    scheduler: str = "linear"      # linear | cosine | constant (after linear warm-up)
    max_grad_norm: float = 1.0
    grad_accum: int = 1            # micro-batches per optimizer step
    bf16: str = "auto"             # auto | on | off (domaintune.device.use_bf16)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 0      # optimizer steps between checkpoints inside fit (0 = none)
    compile: bool = False          # torch.compile the forward model
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: str = "adamw"       # adamw (torch, fused where it can) | paged_adamw_8bit (bitsandbytes, CUDA)


# ---------------------------------------------------------------- parameter groups and optimiser

def param_groups(named_params: Iterable, lr: float, weight_decay: float,
                 lr_scale: Optional[Callable[[str], float]] = None,
                 group_key: Optional[Callable[[str], Any]] = None, trainable_only: bool = True) -> list[dict]:
    """AdamW groups over the parameters that require grad (all given ones with trainable_only=False): no weight
    decay on biases and
    LayerNorm gains (optim.no_weight_decay); `lr_scale(name)` multiplies the LR (layer-wise decay);
    `group_key(name)` keeps parameters apart (e.g. by depth, for gradual unfreezing). Each group
    carries "names" and "key" next to the torch keys; Engine strips them for the optimiser."""
    groups: dict[tuple, dict] = {}
    for name, p in named_params:
        if trainable_only and not p.requires_grad:
            continue
        wd = 0.0 if no_weight_decay(name) else weight_decay
        scale = lr_scale(name) if lr_scale is not None else 1.0
        key = (group_key(name) if group_key is not None else 0, scale, wd)
        g = groups.setdefault(key, {"params": [], "names": [], "lr": lr * scale, "weight_decay": wd, "key": key[0]})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (str(k[0]) if not isinstance(k[0], int) else k[0],
                                                             k[1], k[2]))]


def make_adamw(groups: list[dict], cfg: EngineConfig, device: str):
    """AdamW; fused (one kernel over all tensors) where the device and dtypes allow: ~8x faster steps than
    the per-tensor loop on the CPU (MiniLM's 11.7M-row word embedding is updated every step).
    cfg.optimizer paged_adamw_8bit: bitsandbytes' PagedAdamW8bit (moments in 8 bits, blockwise quantised;
    state in CUDA unified memory that pages to the host under memory pressure), CUDA only."""
    import torch

    torch_groups = [{k: v for k, v in g.items() if k not in ("names", "key")} for g in groups]
    if cfg.optimizer == "paged_adamw_8bit":
        if not device.startswith("cuda"):
            raise ValueError(f"paged_adamw_8bit needs a CUDA device, got {device}")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(torch_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    try:
        return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    except (RuntimeError, ValueError):  # a dtype/device the fused kernel does not cover
        return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


# ---------------------------------------------------------------- the engine

class Engine:
    """One model's training state: optimiser, schedule, autocast, device, checkpoints, history."""

    def __init__(self, model, groups: list[dict], cfg: EngineConfig,
                 checkpoint_dir: Optional[str | os.PathLike] = None, device: Optional[str] = None):
        import torch


        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.forward_model = torch.compile(model) if cfg.compile else model
        self.groups = groups
        self.opt = make_adamw(groups, cfg, self.device)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        # Clipping sums squared norms in the model's parameter order (the sum's rounding depends on it).
        order = {id(p): i for i, p in enumerate(model.parameters())}
        self.clip_params = sorted(self.params, key=lambda p: order.get(id(p), len(order)))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_schedule(cfg.scheduler, cfg.warmup_steps, cfg.total_steps))
        self.bf16 = use_bf16(cfg.bf16, self.device)
        self.ckpt = Path(checkpoint_dir) / "last" if checkpoint_dir is not None else None
        self.world = distributed.world_size()
        self.rank = distributed.rank()
        self.step_count = 0
        self.history: list[dict] = []  # one record per optimizer step
        self.samples = 0
        self.crash_at = crash_after()  # CRASH_ENV test hook (0 = off)

    # -- one optimizer step

    def autocast(self):
        import torch

        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16)

    def step(self, loss_fn: Callable, micro_batches: Sequence, weights: Optional[Sequence[float]] = None,
             samples: int = 0) -> dict:
        """Forward/backward every micro-batch (autocast), average gradients (accumulation and data-parallel
        processes), clip, AdamW, schedule. `weights[i]` is micro-batch i's share of the global batch
        (default: equal shares of this process's batch). Returns the step record added to history."""
        import torch


        n = len(micro_batches)
        weights = list(weights) if weights is not None else [1.0 / (n * self.world)] * n
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for batch, w in zip(micro_batches, weights):
            with self.autocast():
                loss = loss_fn(self.forward_model, to_device(batch, self.device))
            (loss.float() * w).backward()
            total += float(loss.detach()) * w
        if self.world > 1:
            total = distributed.all_reduce_grads(self.params, total)
        clip = [p for p in self.clip_params if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(clip, self.cfg.max_grad_norm) if clip else torch.tensor(0.0)
        lr_now = self.opt.param_groups[-1]["lr"]
        self.opt.step()
        self.sched.step()
        self.step_count += 1
        self.samples += samples
        rec = {"step": self.step_count, "loss": total, "lr": float(lr_now), "grad_norm": float(gnorm)}
        self.history.append(rec)
        return rec

    def maybe_crash(self) -> None:
        """The CRASH_ENV test hook: call after the step's checkpoint (if any) is written."""
        if self.crash_at and self.step_count >= self.crash_at:
            raise TrainingCrash(f"{CRASH_ENV}={self.crash_at}: simulated crash after step {self.step_count}")

    # -- checkpoints

    def save(self, loop_state: dict, extra_tensors: Optional[dict] = None) -> None:
        """Checkpoint everything (weights, AdamW moments, schedule, RNG, history) plus the caller's
        JSON-able loop state and optional named tensors. Rank 0 writes; the others wait for it."""
        if self.ckpt is None:
            return
        rng = distributed.gather_rng_states(self.device)  # every process's dropout stream (a collective)
        if self.rank == 0:
            state = dict(loop_state, engine={"step": self.step_count, "history": self.history,
                                             "samples": self.samples})
            save_checkpoint(self.ckpt, self.model, self.opt, self.sched, self.params, state, extra_tensors, rng)
        distributed.barrier()

    def restore(self) -> Optional[tuple[dict, Optional[dict]]]:
        """(loop state, extra tensors) of the last checkpoint, with the engine's own state put back;
        None when there is no checkpoint."""
        if self.ckpt is None or not (self.ckpt / "state.json").exists():
            return None
        state, extra = load_checkpoint(self.ckpt, self.model, self.opt, self.sched, self.params)
        eng = state.pop("engine", {"step": 0, "history": [], "samples": 0})
        self.step_count, self.history, self.samples = eng["step"], eng["history"], eng["samples"]
        log.info("resuming from %s at step %d", self.ckpt, self.step_count)
        return state, extra

    # -- the simple loop

    def fit(self, loss_fn: Callable, batches, on_step: Optional[Callable[[dict], None]] = None,
            progress: Optional[str] = None) -> list[dict]:
        """Train to cfg.total_steps on `batches` (an iterator; with state_dict()/load_state_dict() a
        resumed run sees exactly the batches an uninterrupted one would). Returns the step history."""
        restored = self.restore()
        if restored is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(restored[0].get("batches"))
        it = iter(batches)
        bar = _bar(progress, self.cfg.total_steps, self.step_count)
        t0 = time.perf_counter()
        start_samples = self.samples
        while self.step_count < self.cfg.total_steps:
            micro = [next(it) for _ in range(self.cfg.grad_accum)]
            rec = self.step(loss_fn, micro, samples=sum(batch_len(b) for b in micro) * self.world)
            rec["seconds"] = time.perf_counter() - t0
            if on_step is not None:
                on_step(rec)
            if bar is not None:
                bar.update(1, loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            every = self.cfg.checkpoint_every
            if every and self.step_count % every == 0 and self.step_count < self.cfg.total_steps:
                self.save({"batches": batches.state_dict() if hasattr(batches, "state_dict") else None})
            self.maybe_crash()
        if bar is not None:
            bar.close()
        self.run_seconds = time.perf_counter() - t0  # this call only (a resumed run timed from its restart)
        self.run_samples = self.samples - start_samples
        return self.history

    def clear_checkpoint(self) -> None:
        import shutil

        if self.ckpt is not None and self.rank == 0:
            shutil.rmtree(self.ckpt.parent, ignore_errors=True)


def _bar(label: Optional[str], total: int, initial: int):
    if not label:
        return None

    return Progress(total, label, "step", initial=initial)


def to_device(batch, device: str):
    """Tensors of a batch (a tensor, a dict / tuple / list of them, anything else as is) on `device`."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_len(batch) -> int:
    """Rows in a batch (the first tensor's first dimension)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    return 0


# ---------------------------------------------------------------- checkpoint files

def save_checkpoint(ckpt_dir: Path, model, opt, sched, params: list, state: dict,
                    extra: Optional[dict] = None, rank_rng: Optional[dict] = None) -> None:
    """Written to a temporary folder and swapped in complete (data.atomic_output): a crash mid-write
    leaves the previous checkpoint in place."""
    with atomic_output(ckpt_dir) as tmp:
        tmp.mkdir()
        _write_checkpoint(tmp, model, opt, sched, params, state, extra, rank_rng or {})


def _write_checkpoint(tmp: Path, model, opt, sched, params: list, state: dict, extra: Optional[dict],
                      rank_rng: dict) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu().clone() for k, v in trainable_state(model).items()},
              str(tmp / "model.safetensors"))
    _stall_hook()
    if extra is not None:
        save_file({k: v.contiguous().cpu() for k, v in extra.items()}, str(tmp / "best.safetensors"))
    if opt is not None:
        ot, os_ = _optimizer_to_tensors(opt, params)
        if ot:
            save_file(ot, str(tmp / "optimizer.safetensors"))
        state = dict(state, optimizer=os_)
    if sched is not None:
        state = dict(state, scheduler={k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"})
    rng = {"torch_rng": torch.get_rng_state(), **rank_rng}
    if torch.cuda.is_available() and torch.cuda.is_initialized() and "cuda_rng" not in rng:
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    write_json(tmp / "state.json", state)


def load_checkpoint(ckpt_dir: Path, model, opt, sched, params: list) -> tuple[dict, Optional[dict]]:
    import torch
    from safetensors.torch import load_file

    state = read_json(ckpt_dir / "state.json")
    load_trainable_state(model, load_file(str(ckpt_dir / "model.safetensors")))
    extra = load_file(str(ckpt_dir / "best.safetensors")) if (ckpt_dir / "best.safetensors").exists() else None
    if opt is not None and "optimizer" in state:
        f = ckpt_dir / "optimizer.safetensors"
        _optimizer_from_tensors(opt, params, load_file(str(f)) if f.exists() else {}, state.pop("optimizer"))
    if sched is not None and "scheduler" in state:
        sched.load_state_dict(dict(state.pop("scheduler"), lr_lambdas=[None] * len(sched.lr_lambdas)))
    rng = load_file(str(ckpt_dir / "rng.safetensors"))
    r = distributed.rank()  # under data parallelism each process gets back its own stream
    torch.set_rng_state(rng.get(f"torch_rng.{r}", rng["torch_rng"]))
    cuda = rng.get(f"cuda_rng.{r}", rng.get("cuda_rng"))
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    return state, extra


def _optimizer_to_tensors(opt, params: list) -> tuple[dict, dict]:
    """Per-parameter state tensors (safetensors) and the JSON rest: group settings, and state values that
    are plain numbers (bitsandbytes' 8-bit optimizers keep `step` as an int)."""
    index = {id(p): i for i, p in enumerate(params)}
    tensors, values = {}, {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if hasattr(v, "detach"):
                tensors[f"{index[id(p)]}.{k}"] = v.detach().clone().contiguous().cpu()
            else:
                values[f"{index[id(p)]}.{k}"] = v
    return tensors, {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                     "state_values": values}


def _optimizer_from_tensors(opt, params: list, tensors: dict, scalars: dict) -> None:
    for g, saved in zip(opt.param_groups, scalars["param_groups"]):
        g.update(saved)
    fused = opt.param_groups[0].get("fused")
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        p = params[int(i)]
        # fused AdamW keeps `step` on the parameter's device, the per-tensor loop on the CPU
        opt.state[p][k] = v.to(p.device) if k != "step" or fused else v.clone()
    for key, v in scalars.get("state_values", {}).items():
        i, k = key.split(".", 1)
        opt.state[params[int(i)]][k] = v


def trainable_state(model) -> dict:
    """Every float tensor that training can change (quantised 4-bit weights never change)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.dtype.is_floating_point}


def load_trainable_state(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name])
