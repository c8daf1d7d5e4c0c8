"""Loading causal LMs (base, tuned adapter) and encoding prompt/response pairs.

Safetensors only: every local weights folder passes encoders.check_safetensors (the classifier's check too)
before transformers or peft sees it, so neither falls back to a pickle (pytorch_model.bin, adapter_model.bin).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.io import read_json
from domaintune.modeling import llm
from domaintune.modeling.adapters import quantize_encoder_4bit
from domaintune.modeling.encoders import MODEL_WEIGHTS, check_safetensors, resolve_model

RUN_FILE = "run.json"



def load_causal_lm(path: str, dtype: str = "float32"):
    """(model, tokenizer) from a folder or hub name: safetensors only, no remote code, a fast tokenizer
    (its offsets place the response), a pad token (eos when the tokenizer has none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    where = resolve_model(path)
    if os.path.isdir(where):
        check_safetensors(Path(where), MODEL_WEIGHTS)
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
    """(tuned model, tokenizer, run info): a full model as saved, or base (+ NF4 for qlora) + adapter.
    Pickle weights are refused (check_safetensors), for the full model and the adapter alike."""
    run_file = Path(model_dir) / RUN_FILE
    if not run_file.is_file():
        raise DataError(run_file, None, None, "missing; the finetune stage writes it (`dvc repro finetune`)")
    run = read_json(run_file)
    if run["method"] == "full":
        model, tok = load_causal_lm(str(model_dir))
        return model.eval(), tok, run
    from peft import PeftModel

    check_safetensors(Path(model_dir), writer="the finetune stage writes it")  # peft would read adapter_model.bin
    model, _ = load_causal_lm(run["base_model"])
    if run["method"] == "qlora":
        quantize_encoder_4bit(model, run["qlora_compute_dtype"])
    return PeftModel.from_pretrained(model, str(model_dir)).eval(), _tokenizer(model_dir), run

