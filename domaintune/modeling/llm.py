"""Causal language models for `base.task: generation`: prompt formatting, completion-only labels,
packing without cross-attention, the causal-LM objective, scoring, and merging an adapter.

Formatting. A prompt/response pair is rendered with the tokenizer's chat template when it has
one (`[{"role": "user", ...}, {"role": "assistant", ...}]`), else with DEFAULT_TEMPLATE:

    <bos>### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}<eos>

Completion-only labels. The rendered text is tokenised ONCE, as the model will see it, and a
token carries loss exactly when its character span (the fast tokenizer's offsets) overlaps the
response span. Tokenising the prompt on its own and counting its tokens (what silently fails in
trl #598/#980/#1191) is wrong whenever a token straddles the prompt/response boundary: such a
token holds response text, so here it carries loss, and no prompt-only token ever does.

Packing. Whole examples are laid end to end in rows of at most `block_size` tokens; position ids
restart at 0 for each example and no attention mask is passed, so transformers builds a
block-diagonal causal mask from the position ids (masking_utils.find_packed_sequence_indices):
no example attends to another. The loss never predicts an example's first token from the
previous example (`causal_lm_token_nll` drops targets whose position id is 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from domaintune.data import chat

IGNORE = -100
DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


class TemplateError(ValueError):
    """The chat template does not render a prompt that is a prefix of the full conversation."""


# ---------------------------------------------------------------- formatting

def render(tokenizer, prompt: str, response: str) -> tuple[str, int, int]:
    """(full text, response start char, response end char) for one example.

    The response span covers everything the template adds after the prompt's generation
    prefix (the response, then end-of-turn / eos markers), so the model learns to stop."""
    if getattr(tokenizer, "chat_template", None):
        user = chat.messages(prompt)
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if not full.startswith(head):
            raise TemplateError("the tokenizer's chat template renders the prompt with the generation prompt "
                                "differently from the start of the full conversation; cannot mask the prompt")
        return full, len(head), len(full)
    head = prompt_text(tokenizer, prompt)
    full = head + response + (tokenizer.eos_token or "")
    return full, len(head), len(full)


def prompt_text(tokenizer, prompt: str) -> str:
    """What generation starts from: the template up to where the response begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat.messages(prompt), tokenize=False, add_generation_prompt=True)
    msgs = chat.messages(prompt)
    # the default template has one instruction: a conversation becomes "role: content" lines
    instruction = msgs[0]["content"] if len(msgs) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
    return (tokenizer.bos_token or "") + DEFAULT_TEMPLATE.format(prompt=instruction)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]          # IGNORE on prompt tokens
    response_tokens: int       # response tokens before truncation
    cut_tokens: int            # response tokens lost to max_length


def encode(tokenizer, prompt: str, response: str, max_length: int) -> Encoded:
    """Token ids and completion-only labels for one example, cut to max_length."""
    full, start, end = render(tokenizer, prompt, response)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if (b < end and e > start and e > b) else IGNORE for t, (b, e) in zip(ids, enc["offset_mapping"])]
    n_resp = sum(lab != IGNORE for lab in labels)
    kept = labels[:max_length]
    cut = n_resp - sum(lab != IGNORE for lab in kept)
    return Encoded(ids[:max_length], kept, n_resp, cut)


def encode_text(tokenizer, text: str) -> list[int]:
    """A plain text for continued pre-training: every token is a target; eos closes it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


# ---------------------------------------------------------------- batches

def pad_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded batch of (input_ids, labels) with an attention mask (one example per row)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    lab = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": lab, "attention_mask": mask, "position_ids": pos,
            "sample": _row_samples(mask)}


def _row_samples(mask):
    import torch

    rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask).clone()
    rows[mask == 0] = -1
    return rows


def pack(examples: Sequence[tuple[list[int], list[int]]], block_size: int) -> list[list[int]]:
    """Greedy first-fit in order: lists of example indices whose total length fits block_size."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, (ids, _) in enumerate(examples):
        if len(ids) > block_size:
            raise ValueError(f"example {i} has {len(ids)} tokens > block_size {block_size}")
        for r, free in enumerate(room):
            if free >= len(ids):
                rows[r].append(i)
                room[r] -= len(ids)
                break
        else:
            rows.append([i])
            room.append(block_size - len(ids))
    return rows


def packed_batch(examples: Sequence[tuple[list[int], list[int]]], rows: Sequence[Sequence[int]],
                 pad_id: int) -> dict:
    """Rows of packed examples: position ids restart per example, `sample` says whose token it is
    (-1 = padding, which forms its own segment and carries no loss). No attention mask: the model
    derives the block-diagonal causal mask from the position ids."""
    import torch

    width = max(sum(len(examples[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    sample = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = examples[i]
            n = len(x)
            ids[r, at: at + n] = torch.tensor(x)
            lab[r, at: at + n] = torch.tensor(y)
            pos[r, at: at + n] = torch.arange(n)
            sample[r, at: at + n] = i
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding: one more segment, masked out of the loss
    return {"input_ids": ids, "labels": lab, "position_ids": pos, "sample": sample}


# ---------------------------------------------------------------- objective

def forward_logits(model, batch: dict):
    kw = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "attention_mask" in batch:
        kw["attention_mask"] = batch["attention_mask"]
    return model(**kw, use_cache=False).logits


def target_mask(batch: dict):
    """(targets [B, T-1], mask [B, T-1]): a target counts only if it has a label and belongs to the same
    example as the token predicting it (position id > 0)."""
    lab = batch["labels"][:, 1:]
    return lab, (lab != IGNORE) & (batch["position_ids"][:, 1:] > 0)


def causal_lm_token_nll(logits, batch: dict):
    """(nll [B, T-1], target mask [B, T-1]) of next-token prediction over the targets of target_mask."""
    import torch.nn.functional as F

    lab, valid = target_mask(batch)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), lab.clamp(min=0), reduction="none")
    return nll * valid, valid


def causal_lm_loss(model, batch: dict):
    """Mean NLL over every target token of the batch (the training objective). A data-parallel shard
    (sft.shard_batch) divides by its `norm` instead: the global batch's target count over the world."""
    nll, valid = causal_lm_token_nll(forward_logits(model, batch), batch)
    return nll.sum() / (batch["norm"] if "norm" in batch else valid.sum().clamp(min=1))


def per_sample_nll(model, batch: dict, n_samples: int):
    """(sum of NLL, number of target tokens) per example, packed or not."""
    import torch

    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    nll, valid = causal_lm_token_nll(forward_logits(model, batch), batch)
    who = batch["sample"][:, 1:]
    idx = torch.where(valid, who, torch.full_like(who, n_samples)).flatten()
    sums = torch.zeros(n_samples + 1, dtype=nll.dtype, device=dev).index_add_(0, idx, nll.flatten().detach())
    counts = torch.zeros(n_samples + 1, dtype=torch.long, device=dev).index_add_(0, idx, valid.flatten().long())
    return sums[:-1].cpu(), counts[:-1].cpu()


def perplexity(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> dict:
    """Token-level perplexity over the targets (responses) of `examples`, without gradients."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            s, c = per_sample_nll(model, pad_batch(chunk, pad_id), len(chunk))
            total += float(s.sum())
            count += int(c.sum())
    nll = total / max(count, 1)
    return {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "tokens": count}


def label_loglik(model, tokenizer, prompts: Sequence[str], labels: Sequence[str], max_length: int,
                 batch_size: int):
    """Log-likelihood [n_prompts, n_labels] of each label as the response to each prompt (the sum over
    the label's tokens, end-of-turn included): the scores of classification as generation."""
    import numpy as np
    import torch

    out = np.zeros((len(prompts), len(labels)), dtype=np.float64)
    pairs = [(i, j, encode(tokenizer, p, lab, max_length)) for i, p in enumerate(prompts)
             for j, lab in enumerate(labels)]
    model.eval()
    with torch.no_grad():
        for k in range(0, len(pairs), batch_size):
            chunk = pairs[k: k + batch_size]
            s, _ = per_sample_nll(model, pad_batch([(e.input_ids, e.labels) for _, _, e in chunk],
                                                   tokenizer.pad_token_id), len(chunk))
            for (i, j, _), v in zip(chunk, s.tolist()):
                out[i, j] = -v
    return out


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt (rendered like training), special tokens stripped."""
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(prompt_text(tokenizer, p), add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(next(model.parameters()).device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs


# ---------------------------------------------------------------- merge

def _float_weight(layer):
    """A Linear's weight in float32; a bitsandbytes 4-bit one dequantised (what the adapter saw)."""
    if type(layer).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        return w.float().reshape(layer.out_features, layer.in_features)
    return layer.weight.detach().float()


def merge_adapter(peft_model, adapter: str = "default"):
    """An adapter model -> the plain base model with every LoRA delta added to a float copy of its
    base weights. 4-bit base layers are dequantised first, so the merge never rounds into 4-bit
    (peft's own merge re-quantises, which is what degrades merged QLoRA models, transformers #31293)."""
    base = peft_model.get_base_model()
    targets = [(name, mod) for name, mod in base.named_modules()
               if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")]
    for name, mod in targets:
        _replace(base, name, _float_linear(mod.base_layer, mod.get_delta_weight(adapter).float()))
    # the 4-bit layers without an adapter are dequantised too: the export is one float model
    for name, mod in [(n, m) for n, m in base.named_modules() if type(m).__name__ == "Linear4bit"]:
        _replace(base, name, _float_linear(mod))
    return base


def _float_linear(inner, delta=None):
    import torch
    from torch import nn

    w = _float_weight(inner) if delta is None else _float_weight(inner) + delta
    lin = nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if inner.bias is not None:
            lin.bias.copy_(inner.bias.float())
    return lin


def _replace(root, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def max_logit_gap(a, b) -> float:
    """max |a - b| / max(1, max |a|): the merge check's measure (relative to the logit scale)."""
    return float((a - b).abs().max() / max(1.0, float(a.abs().max())))
