"""The export of a causal LM fine-tuned by domaintune/train/sft.py: the adapter merged into a float (for
QLoRA: dequantised NF4) copy of the base, checked against the unmerged logits (export.merge_tolerance) and
saved for transformers.pipeline("text-generation") with a model card.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from domaintune.core.device import stage_device
from domaintune.core.errors import StageError
from domaintune.modeling import llm
from domaintune.modeling.causal import encode_split, load_tuned


def merged_for_export(model_dir: str, test: pd.DataFrame, base, tolerance: float, n_check: int = 16):
    """(merged model, tokenizer, run info, merge check). The check compares merged vs unmerged logits on
    up to n_check test examples (prompt + response); a gap over `tolerance` raises StageError."""
    import torch


    dev = stage_device(base)
    tuned, tok, run = load_tuned(model_dir)
    tuned = tuned.to(dev)
    ids = [torch.tensor([e.input_ids], device=dev) for e in encode_split(tok, test.head(n_check), base.max_length)]
    if run["method"] == "full":
        return tuned, tok, run, {"method": "full", "had_adapter": False, "examples": len(ids),
                                 "max_rel_diff": 0.0, "tolerance": tolerance}
    with torch.no_grad():
        before = [tuned(input_ids=x).logits for x in ids]
        merged = llm.merge_adapter(tuned).eval()
        gap = max((llm.max_logit_gap(b, merged(input_ids=x).logits) for b, x in zip(before, ids)), default=0.0)
    check = {"method": run["method"], "had_adapter": True, "examples": len(ids), "max_rel_diff": gap,
             "tolerance": tolerance,
             "merged_into": "dequantised NF4 base" if run["method"] == "qlora" else "float base"}
    if gap > tolerance:
        raise StageError(f"merged model disagrees with the unmerged one: max logit difference {gap:.3g} "
                         f"(relative) > export.merge_tolerance {tolerance}")
    return merged, tok, run, check



def save_export(model, tok, out: Path, max_new_tokens: int) -> None:
    import torch

    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    with torch.no_grad():
        model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)



def pipeline_check(out: Path, prompt: str, tok) -> str:
    """Load the export with transformers.pipeline('text-generation') and complete one prompt."""
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    res = gen(llm.prompt_text(tok, prompt), max_new_tokens=8, do_sample=False, return_full_text=False)
    return res[0]["generated_text"]



def model_card(run: dict, check: dict, tok, eval_metrics: dict, intended_use: str, max_new_tokens: int) -> str:
    template = getattr(tok, "chat_template", None)
    fmt = (f"The tokenizer's chat template (one user turn, then the assistant's reply):\n\n```jinja\n{template}\n```"
           if template else f"The default template (domaintune/modeling/llm.py):\n\n```\n{llm.DEFAULT_TEMPLATE}"
                            "{response}<eos>\n```")
    ppl = eval_metrics.get("perplexity", {})
    return "\n".join([
        "# Model card (generation)", "",
        f"Causal LM fine-tuned by domaintune: method `{run['method']}` on `{run['base_model']}`.", "",
        "## Prompt format", "", fmt, "",
        "## Generation settings", "",
        f"Greedy decoding (`do_sample: false`), at most {max_new_tokens} new tokens, stop at "
        f"`{tok.eos_token}` (saved in generation_config.json).", "",
        "## Merge", "",
        f"Adapter merged: {check['had_adapter']} ({check.get('merged_into', 'no adapter')}); merged vs unmerged "
        f"logits on {check['examples']} test examples: max relative difference {check['max_rel_diff']:.3g} "
        f"(tolerance {check['tolerance']}).", "",
        "## Evaluation", "",
        f"Test-response perplexity: start {ppl.get('base', float('nan')):.3f}, "
        f"tuned {ppl.get('tuned', float('nan')):.3f}.", "",
        "## Intended use", "", intended_use, "",
        "Load it with `transformers.pipeline('text-generation', model=<this folder>)`.", ""])
