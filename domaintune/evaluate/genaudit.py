"""The audit of prompt -> response data (base.task generation): what hurts SFT, reported, nothing removed:
responses cut by base.max_length (in tokens), near-empty responses, near-duplicate train prompts with
different responses, response-length outliers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from domaintune.data.dataset import SPLITS
from domaintune.data.textnorm import jaccard, minhash_signatures, minhashes, normalise_all, shingles
from domaintune.modeling.causal import encode_split

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
