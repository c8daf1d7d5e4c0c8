"""Data-parallel training across processes (several GPUs, several nodes, or CPU processes in CI).

A stage with `processes > 1` re-runs its own command under torchrun (torch.distributed.run, what
`accelerate launch` also drives): one process per device, `nnodes` machines meeting at
`rdzv_endpoint`. Each process joins the group (NCCL on CUDA, gloo on the CPU), trains on its share
of every global batch, and the engine averages gradients so each update equals the one-process
update on the same global batch. Rank 0 alone writes checkpoints and outputs; the DVC stage stays
one command with the same output files.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Optional, Sequence

from domaintune.core.errors import StageError
from domaintune.core.io import read_json

LAUNCHED_ENV = "DOMAINTUNE_LAUNCHED"


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()


def init_from_env() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1). Returns whether it did."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # CPU processes share the cores: one process per core-share, no oversubscription
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(params: Sequence, loss: float) -> float:
    """Sum every gradient (each process weighted its loss by its share of the global batch, so the sum
    is the global-batch gradient) in one flat buffer; returns the summed loss."""
    import torch
    import torch.distributed as dist

    # Every process runs the same model and objective, so the same parameters hold gradients everywhere
    # (an unused one, e.g. BERT's pooler, has none on any rank and AdamW skips it, as in one process).
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
    t = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def shard(indices, world: int, rank_: int):
    """This process's share of one global batch (rows rank, rank+world, ...)."""
    return indices[rank_::world]


def launch(module: str, argv: Sequence[str], processes: int, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str = "127.0.0.1:29500") -> int:
    """Run `python -m module argv...` under torchrun with `processes` per node; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", f"--nnodes={nnodes}",
           f"--node-rank={node_rank}", f"--master-addr={rdzv_endpoint.rsplit(':', 1)[0]}",
           f"--master-port={rdzv_endpoint.rsplit(':', 1)[1]}", "-m", module, *argv]
    env = dict(os.environ, **{LAUNCHED_ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return subprocess.run(cmd, env=env).returncode


def launched() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1"


def launch_if_wanted(stage: str, argv: Sequence[str], p) -> Optional[int]:
    """For a stage whose params ask for several processes (p.processes x p.nnodes > 1): re-run the same
    stage command under torchrun and return its exit code. None when this process should train itself
    (one process, or already one of the launched ones)."""
    if p.processes * p.nnodes <= 1 or launched():
        return None
    return launch(f"stages.{stage}", list(argv), p.processes, p.nnodes, p.node_rank, p.rdzv_endpoint)


def run_in_processes(stage: str, argv: Sequence[str], p, metrics_path: str, train: Callable[[], object]):
    """A stage's training entry: under `processes`/`nnodes` > 1, launch the stage's command in that many
    processes and wait (returns the metrics rank 0 wrote); otherwise (one process, or one of the launched)
    join the process group if there is one and run `train()`."""
    rc = launch_if_wanted(stage, argv, p)
    if rc is not None:
        if rc:
            raise StageError(f"{p.processes * p.nnodes} training processes: a process failed (exit {rc}); "
                             "its error is above")
        return read_json(metrics_path)
    init_from_env()
    try:
        return train()
    finally:
        shutdown()


def gather_rng_states(device: str) -> dict:
    """{"torch_rng.R": state, "cuda_rng.R": state} of every process R (for rank 0's checkpoint), empty in a
    single process. A collective: every process must call it."""
    import torch
    import torch.distributed as dist

    world = world_size()
    if world == 1:
        return {}
    states = {"torch_rng": torch.get_rng_state()}
    if device.startswith("cuda"):
        states["cuda_rng"] = torch.cuda.get_rng_state()
    out = {}
    for name, st in states.items():
        t = st.to(device) if device.startswith("cuda") else st  # NCCL gathers device tensors
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        out.update({f"{name}.{r}": p.cpu() for r, p in enumerate(parts)})
    return out
