"""Weight-only int8 export, stored as plain safetensors (no pickle, no custom kernels).

Scheme: every nn.Linear weight W [out, in] of the encoder (and optionally the
word-embedding table [vocab, hidden], one row per token) is stored as
    q = round(W / s).clamp(-127, 127) as int8,  s = max|W[row]| / 127 per row (float32)
i.e. symmetric, per-output-channel. One scale per row keeps a single large row
from crushing the precision of all the others (per-tensor scales lose ~1-2 points
of accuracy on BERT-style models; per-channel is within noise). Biases, LayerNorm
and position embeddings stay float32: they are <2% of the bytes. The classifier
head stays float32 too: it is tiny and it sets the logit scale the fitted
temperature was calibrated for.

On load the int8 tensors are dequantised to float32 (exact same math as above,
reversed), so any CPU/GPU runs the model with stock PyTorch ops; the gain is
~3-4x less disk and download, not compute. `dynamic=True` additionally swaps the
Linear layers for PyTorch dynamic-int8 ones (int8 activations too); measured on
BANKING77 on 2 cores (bench/calibration.py) it was ~25% faster but cost accuracy
(0.916 vs 0.927 test accuracy, 96.1% prediction agreement), so the export and
Predictor default to the dequantised path (0.926, 99.8% agreement, ECE 0.011).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

QUANT_SCHEME = "int8-weight-only-symmetric-per-output-channel"
_META_KEY = "domaintune_int8"


def quantize_tensor(w):
    """(int8 tensor, float32 per-row scale) for a 2-D float tensor."""
    import torch

    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_tensor(q, scale):
    return q.float() * scale.float()[:, None]


def quantizable_weights(encoder, embeddings: bool = True) -> list[str]:
    """state_dict keys of the weights to store as int8: Linear weights (+ word embeddings)."""
    from torch import nn

    keys = []
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.Linear):
            keys.append(f"{name}.weight" if name else "weight")
        elif embeddings and isinstance(mod, nn.Embedding) and name.endswith("word_embeddings"):
            keys.append(f"{name}.weight")
    return keys


def save_int8_encoder(encoder, out_dir: str | os.PathLike, embeddings: bool = True) -> dict:
    """Write config.json + model.int8.safetensors; returns {quantized, float_bytes, int8_bytes}."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(out)
    qkeys = set(quantizable_weights(encoder, embeddings))
    tensors, float_bytes = {}, 0
    for key, t in encoder.state_dict().items():
        t = t.detach().cpu()
        float_bytes += t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
        if key in qkeys:
            q, s = quantize_tensor(t)
            tensors[key] = q
            tensors[f"{key}_scale"] = s
        else:
            tensors[key] = t.float().contiguous() if t.is_floating_point() else t.contiguous()
    path = out / "model.int8.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", _META_KEY: json.dumps(sorted(qkeys)),
                                           "scheme": QUANT_SCHEME})
    return {"quantized_tensors": len(qkeys), "float32_bytes": int(float_bytes), "int8_bytes": path.stat().st_size}


def load_int8_encoder(model_dir: str | os.PathLike, dynamic: bool = False):
    """Rebuild the encoder from config.json and the dequantised int8 weights (strict: every key must match)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    model_dir = Path(model_dir)
    path = model_dir / "model.int8.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _META_KEY not in meta:
            raise ValueError(f"{path}: not a domaintune int8 file (no {_META_KEY} metadata)")
        qkeys = set(json.loads(meta[_META_KEY]))
        raw = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for key, t in raw.items():
        if key.endswith("_scale") and key[: -len("_scale")] in qkeys:
            continue
        state[key] = dequantize_tensor(t, raw[f"{key}_scale"]) if key in qkeys else t
    config = AutoConfig.from_pretrained(str(model_dir))
    enc = AutoModel.from_config(config, attn_implementation="sdpa")
    enc.load_state_dict(state, strict=True)
    enc.eval()
    if dynamic:
        enc = torch.ao.quantization.quantize_dynamic(enc, {torch.nn.Linear}, dtype=torch.qint8)
    return enc
