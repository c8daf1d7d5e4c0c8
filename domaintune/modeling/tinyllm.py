"""A tiny random Llama and a byte-level BPE tokenizer trained on the project's own texts, so the
generation DAG runs end to end in CI without any download.

    python -m domaintune.modeling.tinyllm --texts examples/support_replies/pairs.csv --out models/tiny-llama

Every Linear's in_features is a multiple of 64 (hidden 64, intermediate 128), which bitsandbytes'
CPU 4-bit kernels need (domaintune/train/classifier.py check_4bit_shapes), so QLoRA runs on CPU too.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

SPECIALS = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
# One turn per message; the generation prompt opens the assistant turn; <|end|> closes each turn
# and is the eos token, so a model trained on it learns to stop.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    """A byte-level BPE (GPT-2 style: lossless, exact character offsets) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   additional_special_tokens=SPECIALS[3:])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random LlamaForCausalLM sized for `tokenizer` (float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def read_texts(paths: Iterable[str]) -> list[str]:
    """Every cell of every CSV (or every line of any other file) given."""
    import pandas as pd

    out: list[str] = []
    for p in paths:
        if p.endswith(".csv"):
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
            for c in df.columns:
                out.extend(df[c].tolist())
        else:
            out.extend(Path(p).read_text(encoding="utf-8").splitlines())
    return [t for t in out if t.strip()]


def save(out: str | Path, texts: Iterable[str], seed: int = 0, **shape) -> Path:
    out = Path(out)
    tok = build_tokenizer(texts)
    model = build_model(tok, seed=seed, **shape)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", nargs="+", required=True, help="CSV files (every cell) or text files (every line)")
    ap.add_argument("--out", required=True, help="model folder to write (safetensors + tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    save(args.out, read_texts(args.texts), seed=args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
