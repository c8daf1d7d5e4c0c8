"""Where models run: one rule for every stage that loads a model.

`base.device` in params.yaml is `auto | cpu | cuda | cuda:N`. `auto` is CUDA when torch sees
a device (the local rank's GPU under a multi-process launch), else the CPU. An explicit
`cuda` on a machine without CUDA is a ParamsError (one line, exit 2), never a silent CPU run.

Precision rules, also written once here:
- training autocast in bf16 where the hardware runs it fast (`use_bf16`);
- inference on CUDA in float16/bfloat16 weights (`inference_dtype`): the metrics stay equal within
  the tolerance that tests/train/test_engine.py states; on the CPU inference stays float32;
- attention is SDPA (modeling.load_encoder asks for it).
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
