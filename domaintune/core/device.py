"""Where models run: one rule for every stage that loads a model.

`base.device` in params.yaml is `auto | cpu | cuda | cuda:N`. `auto` is CUDA when torch sees
a device (the local rank's GPU under a multi-process launch), else the CPU. An explicit
`cuda` on a machine without CUDA is a ParamsError (one line, exit 2), never a silent CPU run.

Precision rules, also written once here:
- training autocast in bf16 where the hardware runs it fast (`use_bf16`);
- inference on CUDA in float16/bfloat16 weights (`inference_dtype`): the metrics stay equal within
  the tolerance that tests/train/test_engine.py states; on the CPU inference stays float32;
- attention is SDPA (modeling.load_encoder asks for it).

Threads: one inference pool sized by `inference_threads` (affinity capped by the cgroup CPU quota), used by torch
and onnxruntime alike; batches: cut by a token budget (`MAX_BATCH_TOKENS`, modeling.encoders.TokenBatches).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from domaintune.core.errors import ParamsError

log = logging.getLogger("domaintune.device")

_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_spec(spec: str, where: str = "base.device") -> None:
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ParamsError(f"params.yaml: {where}: must be auto, cpu, cuda or cuda:N, got {spec!r}")


def local_rank() -> int:
    """This process's rank on its node under torchrun / accelerate launch (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def resolve_device(spec: str = "auto", where: str = "base.device") -> str:
    """The torch device string for `spec` on this machine (see the module docstring)."""
    import torch

    check_spec(spec, where)
    if spec == "cpu":
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if spec == "auto":
        return f"cuda:{local_rank() % max(1, torch.cuda.device_count())}" if has_cuda else "cpu"
    if not has_cuda:
        raise ParamsError(f"params.yaml: {where}: {spec} requested but torch sees no CUDA device "
                          "(use auto or cpu)")
    index = int(spec.split(":")[1]) if ":" in spec else local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise ParamsError(f"params.yaml: {where}: {spec} requested but torch sees {count} CUDA device(s)")
    return f"cuda:{index}"


def stage_device(base) -> str:
    """The device a stage's models go to: base.device resolved (what every stage calls)."""
    return resolve_device(getattr(base, "device", "auto") or "auto")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: the CPUs where bf16 matmuls are native instead of emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(mode: str, device: str) -> bool:
    """bf16 autocast for training: mode on/off/auto. auto: CUDA with bf16 support; on the CPU
    only where bench/results/train.json measured it faster at equal accuracy (see CPU_BF16_AUTO)."""
    import torch

    if mode == "off":
        return False
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = CPU_BF16_AUTO and cpu_has_fast_bf16()
    if mode == "on" and not ok:
        log.warning("bf16: on, but this hardware has no fast bf16 (or auto found it slower); using it anyway")
        return True
    return ok


# Whether `bf16: auto` turns CPU autocast on where the CPU has AVX512-BF16/AMX. True keeps what
# finetune did before the engine (bf16 autocast on such CPUs). `bench/train.py bf16` and
# `throughput --bf16` measure it (results keys 5_bf16_cpu_* / 5_throughput_cpu_*); set False if bf16 is
# slower or less accurate there.
CPU_BF16_AUTO = True


def inference_dtype(device: str):
    """Weights dtype for inference-only passes: bf16 on CUDA that supports it, fp16 on older CUDA,
    float32 on the CPU (CPU half-precision inference is not faster for these small encoders)."""
    import torch

    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def place_for_inference(model, device: str, half: bool = True):
    """Move a model to `device` in its inference dtype (float32 with half=False), eval mode. Returns it."""
    import torch

    model.to(device=device, dtype=inference_dtype(device) if half else torch.float32)
    return model.eval()


def batch_size_for(device: str, cpu: int = 64, gpu: int = 256) -> int:
    """Eval / embedding batch size for the device: large on a GPU (keeps it busy), modest on the CPU
    (length-sorted batches already keep padding low there)."""
    return gpu if device.startswith("cuda") else cpu


# Token budget of one inference batch (predict --max-batch-tokens, serve --max-batch-tokens, Predictor): texts are
# sorted by token length and cut into batches whose (longest text) x (texts) stays within it, up to the batch size.
# 8192 = 64 texts of 128 tokens, the default batch size at the default max_length: at the defaults no batch is cut
# smaller than before, while texts of 512 tokens go 16 at a time (a padded [64, 512] batch would be 4x the
# activations with no more throughput on a CPU).
MAX_BATCH_TOKENS = 8192


# ---------------------------------------------------------------- threads
CGROUP = Path("/sys/fs/cgroup")


def _affinity_cores() -> int:
    """The cores the scheduler lets this process run on (taskset, cpusets), not every core of the host."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_quota() -> str | None:
    """This process's cgroup CPU quota as cgroup v2's cpu.max reads ("QUOTA PERIOD" or "max PERIOD"), from its own
    cgroup (/proc/self/cgroup) or the root of the mounted hierarchy; cgroup v1's cfs_quota_us/cfs_period_us in the
    same form; None where there is none."""
    try:
        own = [line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
               if line.startswith("0::")]
    except (OSError, IndexError):
        own = []
    for path in [CGROUP / p.lstrip("/") / "cpu.max" for p in own] + [CGROUP / "cpu.max"]:
        try:
            return path.read_text()
        except OSError:
            continue
    try:
        quota = (CGROUP / "cpu" / "cpu.cfs_quota_us").read_text().strip()
        period = (CGROUP / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return f"{'max' if quota.startswith('-') else quota} {period}"


def quota_cores(cpu_max: str | None) -> int | None:
    """Whole cores a cpu.max quota allows (None: no quota, or one that cannot be read). Rounded down, at least 1:
    threads beyond the quota are throttled mid-operation, and an intra-op pool waits for its slowest thread."""
    parts = (cpu_max or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, int(quota // period))


def inference_threads() -> int:
    """The size of the one inference thread pool: the cores this process may use, i.e. its CPU affinity capped by
    its cgroup CPU quota. torch's intra-op threads (modeling.encoders.set_threads) and onnxruntime's intra_op threads
    (export.artifacts.onnx_session) are set to it, inter-op parallelism to 1."""
    cores = _affinity_cores()
    quota = quota_cores(_cpu_quota())
    return max(1, min(cores, quota) if quota is not None else cores)
