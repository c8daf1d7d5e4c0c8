"""base.task: generation -- loading a causal LM, and the audit and drift stages for it.

The stage modules keep their names, order, arguments and outs; for a generation task each calls
a `run_<stage>` here (audit), in domaintune/train/sft.py (dapt, finetune) or in
domaintune/export/generation.py (evaluate, export). The dataset schema is the classification one with
text = the prompt and label = the response (labels.json is empty: there is no label set).

- audit: reports what hurts SFT (responses cut by base.max_length, counted in tokens; near-empty
  responses; near-duplicate train prompts with different responses; response-length outliers) and
  passes the data through unchanged.
- dapt: continued causal-LM pre-training on dapt.corpus and the train prompts and responses, in
  packed blocks (llm.pack), on the training engine; held-out perplexity before and after.
- finetune: SFT with completion-only loss (llm.encode), methods full | lora | qlora (NF4, double
  quant), optional packing (finetune.packing) and gradient checkpointing, resumable checkpoints.
- evaluate: held-out perplexity of the start model and the tuned model on the test responses, and
  sample generations.
- drift: the classifier's baseline format and verdict with prompt descriptors, the model's own hidden
  states and prompt familiarity (domaintune/monitor/generation.py, which the drift stage calls), so
  `domaintune monitor` judges prompt batches.
- export: the adapter merged into a float (for QLoRA: dequantised) copy of the base, checked
  against the unmerged model's logits on test examples (export.merge_tolerance, else the stage
  fails), saved as safetensors + tokenizer + generation config + model card.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.core.io import atomic_output, write_json
from domaintune.data.dataset import SPLITS, read_dataset, read_hashes, write_dataset
from domaintune.modeling.causal import _tokenizer, encode_split

NEAR_EMPTY_WORDS = 3       # a response of fewer words than this teaches the model to say nothing



OUTLIER_Z = 3.5            # modified z-score (median/MAD) of response tokens: Iglewicz & Hoaglin's cut-off



NEAR_PROMPT_JACCARD = 0.8  # word-3-gram Jaccard of two prompts that count as near duplicates (as dedupe)



def audit_generation(splits: dict[str, pd.DataFrame], tok, max_length: int, seed: int) -> pd.DataFrame:
    """One row per (example, issue): id, split, issue, detail. Nothing is removed."""
    rows = []
    for s in SPLITS:
        df = splits[s]
        enc = encode_split(tok, df, max_length)
        n_tok = np.array([e.response_tokens for e in enc], dtype=float)
        med = np.median(n_tok) if len(n_tok) else 0.0
        mad = np.median(np.abs(n_tok - med)) if len(n_tok) else 0.0
        for i, (rid, resp, e) in enumerate(zip(df["id"], df["label"], enc)):
            if e.cut_tokens:
                rows.append((rid, s, "response_truncated",
                             f"{e.cut_tokens} of {e.response_tokens} response tokens cut by base.max_length "
                             f"{max_length}"))
            if len(str(resp).split()) < NEAR_EMPTY_WORDS:
                rows.append((rid, s, "near_empty_response", f"{len(str(resp).split())} word(s): {str(resp)[:40]!r}"))
            z = 0.6745 * (n_tok[i] - med) / mad if mad > 0 else 0.0
            if abs(z) > OUTLIER_Z:
                rows.append((rid, s, "length_outlier", f"{int(n_tok[i])} response tokens (median {med:g}, "
                                                       f"modified z {z:.1f})"))
    rows += _near_prompts(splits["train"], seed)
    return pd.DataFrame(rows, columns=["id", "split", "issue", "detail"])



def _near_prompts(train: pd.DataFrame, seed: int) -> list[tuple]:
    """Train prompts that are near duplicates (word-3-gram Jaccard >= 0.8) with different responses."""
    from datasketch import MinHashLSH

    from domaintune.data.textnorm import jaccard, minhash_signatures, minhashes, normalise_all, shingles

    norm = normalise_all(train["text"].astype(str).tolist())
    sets = [shingles(t, 3) for t in norm]
    if not sets:
        return []
    hashes = minhashes(minhash_signatures(sets, 128, seed), 128, seed)
    lsh = MinHashLSH(threshold=0.65, num_perm=128)
    for i, h in enumerate(hashes):
        lsh.insert(i, h, check_duplication=False)
    ids, resp = train["id"].tolist(), train["label"].tolist()
    out = []
    for i, h in enumerate(hashes):
        for j in sorted(lsh.query(h)):
            if j > i and resp[i] != resp[j] and jaccard(sets[i], sets[j]) >= NEAR_PROMPT_JACCARD:
                out.append((ids[j], "train", "near_duplicate_prompt",
                            f"prompt near {ids[i]!r} (Jaccard {jaccard(sets[i], sets[j]):.2f}), different response"))
    return out



def audit_summary(issues: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> dict:
    kinds = ("response_truncated", "near_empty_response", "near_duplicate_prompt", "length_outlier")
    counts = issues["issue"].value_counts()
    return {"task": "generation", "action": "report", "rows": {s: len(splits[s]) for s in SPLITS},
            "issues": {k: int(counts.get(k, 0)) for k in kinds}, "rows_with_issues": int(issues["id"].nunique()),
            "thresholds": {"near_empty_words": NEAR_EMPTY_WORDS, "length_outlier_modified_z": OUTLIER_Z,
                           "near_duplicate_prompt_jaccard": NEAR_PROMPT_JACCARD}}



def run_audit(args, base, label_audit=None) -> str:
    """The audit stage for generation: the SFT checks (reported, nothing removed), and with a declared label
    set `label_audit(splits)` (the audit stage's cleanlab audit on the response as the label, passed in by
    stages/audit.py) whose result -- reports, and train rows dropped or relabelled by audit.action -- is the
    output."""
    in_dir = Path(args.in_dir)
    splits, labels = read_dataset(in_dir)
    from domaintune.modeling.encoders import resolve_model

    tok = _tokenizer(resolve_model(base.model))
    issues = audit_generation(splits, tok, base.max_length, base.seed)
    summary = audit_summary(issues, splits)
    summary["dataset_hash_in"] = read_hashes(in_dir, splits, labels)["dataset"]
    result = label_audit(splits) if label_audit is not None else None
    if result is not None:
        summary["label_audit"] = result.metrics
    with atomic_output(args.out) as out, atomic_output(args.report) as rep, atomic_output(args.metrics) as met:
        summary["dataset_hash_out"] = write_dataset(out, result.splits if result else splits, labels)["dataset"]
        if (in_dir / "manifest.json").exists():
            shutil.copyfile(in_dir / "manifest.json", out / "upstream_manifest.json")
        rep.mkdir()
        issues.to_csv(rep / "generation_issues.csv", index=False)
        if result is not None:
            result.write_reports(rep)
        write_json(rep / "summary.json", {"max_length": base.max_length, "metrics": summary})
        write_json(met, summary)
    emb = Path(args.embeddings)  # a persistent DVC out of the stage: it must exist
    emb.mkdir(parents=True, exist_ok=True)
    if result is None:
        (emb / "README.txt").write_text("Embedding cache of the label audit; unused for base.task generation "
                                        "without evaluate.label_set.\n")
    line = "; ".join(f"{k} {v}" for k, v in summary["issues"].items()) + " (reported, nothing removed)"
    if result is not None:
        m = result.metrics
        line += (f"; label audit: {m['issues_found']} train rows flagged, dropped {m['rows_acted_on']['dropped']}, "
                 f"relabelled {m['rows_acted_on']['relabelled']}")
    return line

