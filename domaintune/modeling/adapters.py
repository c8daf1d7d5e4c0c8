"""Adapter surgery shared by every task: target modules, layer depth, 4-bit (QLoRA) quantisation of Linear layers."""
from __future__ import annotations

import re
from typing import Optional, Sequence

from domaintune.core.errors import ParamsError


def encoder_layers(encoder):
    """The encoder's list of transformer blocks (BERT-style `encoder.layer`, else the
    first ModuleList as long as config.num_hidden_layers)."""
    from torch import nn

    inner = getattr(encoder, "encoder", None)
    if inner is not None and isinstance(getattr(inner, "layer", None), nn.ModuleList):
        return inner.layer
    n = getattr(encoder.config, "num_hidden_layers", None)
    for _, mod in encoder.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ParamsError("finetune: cannot find the encoder's transformer layers (not a BERT-like model?)")



_LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.")



def param_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for transformer block i, num_layers+1 for the head and anything above."""
    if name.startswith("head.") or ".head." in name:
        return num_layers + 1
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if "embeddings" in name:
        return 0
    return num_layers + 1  # pooler / final norm sit above the last block



def linear_module_names(encoder) -> list[str]:
    """Leaf names of the Linear layers in the encoder (what LoRA can target)."""
    from torch import nn

    names = set()
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    return sorted(names)



def target_modules(model, spec, causal: bool) -> list[str] | str:
    """finetune.target_modules resolved for `model`: a list stays as given; auto is the task's default -- for a
    causal LM every attention and MLP Linear (peft's "all-linear", the output layer excluded: QLoRA's recipe),
    for an encoder the attention projections peft maps its architecture to (BERT: query, value), else every
    Linear inside an attention block."""
    if spec != "auto":
        return list(spec)
    if causal:
        return "all-linear"
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    known = PEFT_TARGETS.get(getattr(model.config, "model_type", None))
    if known:
        return list(known)
    return sorted({n.split(".")[-1] for n, m in model.named_modules()
                   if type(m).__name__ == "Linear" and "attention" in n.lower() and "output" not in n.lower()})


def check_target_modules(encoder, targets: Sequence[str] | str) -> None:
    if targets == "all-linear":
        return
    available = linear_module_names(encoder)
    full_names = [n for n, _ in encoder.named_modules()]
    for t in targets:
        if t not in available and not any(n == t or n.endswith("." + t) for n in full_names):
            raise ParamsError(f"params.yaml: finetune.target_modules: module {t!r} is not in the model; "
                              f"available Linear modules: {available}")



def qlora_backend_error() -> Optional[str]:
    """None if bitsandbytes can run a 4-bit NF4 Linear forward+backward here, else why not."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means no backend
        return f"bitsandbytes cannot be imported: {exc}"
    try:
        lin = torch.nn.Linear(64, 64)
        q = _to_4bit(bnb, lin, torch.float32)
        x = torch.randn(2, 64, requires_grad=True)
        q(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return "bitsandbytes 4-bit backward gave no finite gradient"
    except Exception as exc:  # noqa: BLE001
        return f"bitsandbytes 4-bit NF4 Linear does not run on this machine: {type(exc).__name__}: {exc}"
    return None



def _to_4bit(bnb, lin, compute_dtype):
    import torch

    device = lin.weight.device
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.detach().clone().cpu(), requires_grad=False,
                                 quant_type="nf4", compress_statistics=True)  # compress = double quant
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.detach().clone().cpu(), requires_grad=False)
    # On AVX512-BF16 CPUs bitsandbytes repacks the weights in place the first time the layer runs in
    # eval mode (validation), and its repacked path cannot train afterwards ("a view of a leaf Variable
    # ... in-place"). We train, so keep the portable layout on every CPU.
    q.support_avx512bf16_for_cpu = False
    return q.to(device if device.type != "meta" else "cpu")  # .to() is what quantises



# bitsandbytes quantises in blocks of 64 values along in_features; its CPU kernels on AVX512
# machines repack the 4-bit weights per block and fail (deep inside bitsandbytes) when a Linear's
# in_features is not a multiple of it. CUDA kernels have no such limit.
QLORA_CPU_BLOCK = 64



def check_4bit_shapes(encoder, device: str) -> None:
    """Refuse, before any work, a qlora encoder whose Linear shapes this device's 4-bit kernels cannot run.
    The rule is applied on every CPU (not only AVX512 ones) so a setup that works on one laptop works on all."""
    from torch import nn

    if device.startswith("cuda"):
        return
    for layer_idx, layer in enumerate(encoder_layers(encoder)):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and mod.in_features % QLORA_CPU_BLOCK:
                raise ParamsError(
                    f"params.yaml: finetune.method: qlora on CPU needs every quantised Linear's in_features to be "
                    f"a multiple of {QLORA_CPU_BLOCK} (bitsandbytes' 4-bit block); layer {layer_idx} "
                    f"'{name}' has in_features {mod.in_features}. Use lora, or a CUDA device")



def quantize_encoder_4bit(encoder, compute_dtype: str) -> int:
    """Replace every nn.Linear inside the transformer blocks by an NF4 Linear4bit.
    Done by hand: loading a whole model in 4-bit through transformers on CPU left
    some layers unquantised. Embeddings stay as they are (they are lookups)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute_dtype]
    count = 0
    for layer in encoder_layers(encoder):
        for _name, mod in list(layer.named_modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, child_name, _to_4bit(bnb, child, dtype))
                    count += 1
    return count

