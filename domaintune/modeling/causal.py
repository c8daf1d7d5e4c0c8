"""Loading causal LMs (base, tuned adapter) and encoding prompt/response pairs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from domaintune.core.errors import ParamsError
from domaintune.modeling import llm
from domaintune.modeling.adapters import quantize_encoder_4bit
from domaintune.modeling.encoders import resolve_model

RUN_FILE = "run.json"



def load_causal_lm(path: str, dtype: str = "float32"):
    """(model, tokenizer) from a folder or hub name: safetensors only, no remote code, a fast tokenizer
    (its offsets place the response), a pad token (eos when the tokenizer has none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    where = resolve_model(path)
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    if not tok.is_fast:
        raise ParamsError(f"params.yaml: base.model: {path}: the tokenizer is not a fast tokenizer; "
                          "completion-only labels need its character offsets")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True, trust_remote_code=False,
                                                     dtype=getattr(torch, dtype))
    except ValueError as exc:
        raise ParamsError(f"params.yaml: base.model: {path} is not a causal language model with safetensors "
                          f"weights: {str(exc).splitlines()[0]}") from None
    return model, tok



def encode_split(tok, df: pd.DataFrame, max_length: int) -> list[llm.Encoded]:
    return [llm.encode(tok, p, r, max_length) for p, r in zip(df["text"].tolist(), df["label"].tolist())]



def pairs(encoded: Sequence[llm.Encoded]) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in encoded]



def _tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok



def load_tuned(model_dir: str | Path):
    """(tuned model, tokenizer, run info): a full model as saved, or base (+ NF4 for qlora) + adapter."""
    run = json.loads((Path(model_dir) / RUN_FILE).read_text())
    if run["method"] == "full":
        model, tok = load_causal_lm(str(model_dir))
        return model.eval(), tok, run
    from peft import PeftModel


    model, _ = load_causal_lm(run["base_model"])
    if run["method"] == "qlora":
        quantize_encoder_4bit(model, run["qlora_compute_dtype"])
    return PeftModel.from_pretrained(model, str(model_dir)).eval(), _tokenizer(model_dir), run

