"""The label audit of tagged sentences (base.task token_classification), the audit stage's work for a tagger.

1. Every train word is embedded by the frozen encoder (audit.encoder: base.model or a folder): the last hidden
   state of its first sub-word, sentences truncated at base.max_length (words past it are not audited).
2. Out-of-fold word probabilities: audit.folds folds grouped by sentence (a word is scored by a logistic
   regression, C = audit.C, that saw no word of its sentence), temperature-calibrated by NLL over all words
   (evaluate/audit.calibrate_probs), so audit.min_score means what it means for a classifier.
3. cleanlab.token_classification: filter.find_label_issues proposes (sentence, word) issues and
   rank.get_label_quality_scores scores every sentence (its worst word). A word is flagged when cleanlab
   proposes it AND 1 - p(given tag) >= audit.min_score AND the suggested tag (argmax) differs.
4. Reports: reports/audit/token_issues.csv (one row per flagged word: id, word index, word, given and suggested
   tag, p(given)), sentence_issues.csv (one row per sentence with a flagged word: its quality score, the
   suspicious words and suggested tags), summary.json. audit.action report keeps every sentence; drop removes
   the flagged train sentences; relabel is refused (a sentence's tags are not rewritten). Decisions
   (audit.decisions: id, decision accept|reject) override: reject keeps a sentence, accept drops it.
Only train sentences are audited and changed.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.core import device as devices
from domaintune.core.device import stage_device
from domaintune.core.errors import DataError, ParamsError, StageError
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import as_dict, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes, write_dataset
from domaintune.data.tokens import decode_rows
from domaintune.evaluate.audit import _fit_lr, _full_probs, calibrate_probs, resolve_encoder
from domaintune.modeling import encoders
from domaintune.modeling.tagger import word_logits

log = logging.getLogger("domaintune")


def word_embeddings(words: list[list[str]], encoder_path: str, max_length: int, batch_size: int, device: str):
    """Per sentence: [words, hidden] first-sub-word vectors of the frozen encoder, and which words were kept."""
    import torch

    encoders.set_threads()
    tok = encoders.load_tokenizer(encoder_path)
    enc = devices.place_for_inference(encoders.load_encoder(encoder_path), device).eval()
    hidden = enc.config.hidden_size

    def run(input_ids, mask):
        with torch.inference_mode():
            out = enc(input_ids=torch.from_numpy(input_ids).to(device),
                      attention_mask=torch.from_numpy(mask).to(device))
        return out.last_hidden_state.float().cpu().numpy()
    wl = word_logits(run, tok, words, hidden, max_length, batch_size)
    return wl.logits, wl.kept


def grouped_oof_probs(X: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int, folds: int, C: float, seed: int):
    """Out-of-fold probabilities [n, k]: folds split by sentence (GroupKFold over a seeded sentence order)."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    folds = int(min(folds, n_groups))
    if folds < 2:
        raise StageError(f"audit: {n_groups} train sentence(s): too few to cross-validate")
    perm = np.random.default_rng(seed).permutation(groups.max() + 1)
    probs = np.full((len(y), k), 1.0 / k)
    for tr, held in GroupKFold(n_splits=folds).split(X, y, perm[groups]):
        if len(np.unique(y[tr])) < 2:
            continue
        probs[held] = _full_probs(_fit_lr(X[tr], y[tr], C, seed), X[held], k)
    return probs, folds


def token_audit(train: pd.DataFrame, tags: list[str], encoder_path: str, params, base, device: str):
    """(token issues, sentence issues, metrics) of the train sentences (module doc)."""
    from cleanlab.token_classification.filter import find_label_issues
    from cleanlab.token_classification.rank import get_label_quality_scores

    words, _, gold = decode_rows(train)
    emb, kept = word_embeddings(words, encoder_path, base.max_length, params.batch_size, device)
    index = {t: i for i, t in enumerate(tags)}
    rows = [(s, w) for s in range(len(words)) for w in np.flatnonzero(kept[s])]
    X = np.concatenate([emb[s][kept[s]] for s in range(len(words))]).astype(np.float32)
    y = np.array([index[gold[s][w]] for s, w in rows])
    groups = np.array([s for s, _ in rows])
    probs, folds = grouped_oof_probs(X, y, groups, len(tags), params.folds, params.C, base.seed)
    temperature, apply = calibrate_probs(y, probs, np.ones(len(y), dtype=bool))
    probs = apply(probs)
    labels_s, probs_s, where = [], [], []
    for s in range(len(words)):
        sel = groups == s
        if sel.any():
            labels_s.append(y[sel])
            probs_s.append(probs[sel])
            where.append(s)
    found = find_label_issues(labels_s, probs_s) if labels_s else []
    sentence_scores, _ = get_label_quality_scores(labels_s, probs_s)
    word_pos = {s: np.flatnonzero(kept[s]) for s in where}
    out = []
    for i, j in found:
        s = where[i]
        p = probs_s[i][j]
        given, best = int(labels_s[i][j]), int(p.argmax())
        score = 1.0 - float(p[given])
        if score >= params.min_score and best != given:
            w = int(word_pos[s][j])
            out.append({"id": str(train["id"].iloc[s]), "word_index": w, "word": words[s][w], "given_tag": tags[given],
                        "suggested_tag": tags[best], "p_given": round(float(p[given]), 6), "score": round(score, 6),
                        "sentence_quality": round(float(sentence_scores[i]), 6), "text": train["text"].iloc[s]})
    issues = pd.DataFrame(out, columns=["id", "word_index", "word", "given_tag", "suggested_tag", "p_given", "score",
                                        "sentence_quality", "text"])
    sentences = (issues.groupby("id", sort=False)
                 .agg(sentence_quality=("sentence_quality", "first"), words=("word", list),
                      suggestions=("suggested_tag", list), given=("given_tag", list), text=("text", "first"))
                 .reset_index() if len(issues) else
                 pd.DataFrame(columns=["id", "sentence_quality", "words", "suggestions", "given", "text"]))
    if len(sentences):
        sentences["suspicious"] = [", ".join(f"{w!r}: {g} -> {s}" for w, g, s in zip(ws, gs, ss))
                                   for ws, gs, ss in zip(sentences["words"], sentences["given"],
                                                         sentences["suggestions"])]
        sentences = sentences.drop(columns=["words", "given", "suggestions"]).sort_values("sentence_quality")
    metrics = {"task": "token_classification", "words_scored": int(len(y)), "folds_used": folds,
               "temperature": float(temperature), "cleanlab_candidates": len(found), "issues_found": int(len(issues)),
               "sentences_flagged": int(len(sentences)),
               "words_past_max_length": int(sum((~k).sum() for k in kept))}
    return issues, sentences, metrics


def read_token_decisions(path: str | Path | None, train_ids: set) -> dict[str, str]:
    """audit.decisions for sentences: id -> accept | reject (a corrected_label is refused: tags are not rewritten)."""
    if not path or not Path(path).is_file():
        return {}
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if df.empty:
        return {}
    for col in ("id", "decision"):
        if col not in df.columns:
            raise DataError(path, None, col, f"column missing; columns found: {list(df.columns)}")
    out = {}
    for row, r in enumerate(df.itertuples(index=False), 1):
        if r.decision not in ("accept", "reject"):
            raise DataError(path, row, "decision",
                            f"{r.decision!r}: use accept (drop the sentence) or reject (keep it)")
        if getattr(r, "corrected_label", ""):
            raise DataError(path, row, "corrected_label", "a tagged sentence is not relabelled by a decision; "
                            "accept drops it, reject keeps it (fix its tags in the source)")
        if r.id not in train_ids:
            raise DataError(path, row, "id", f"{r.id!r} is not a train sentence")
        out[r.id] = r.decision
    return out


def audit_stage(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "audit")
    if params.action == "relabel":
        raise ParamsError("params.yaml: audit.action: relabel is not offered for base.task token_classification "
                          "(use report or drop: a flagged sentence is kept or dropped whole)")
    in_dir = Path(io.in_dir)
    splits, tags = read_dataset(in_dir)
    decisions = read_token_decisions(io.decisions if io.decisions is not None else params.decisions,
                                     set(splits["train"]["id"].astype(str)))
    encoder_path = resolve_encoder(params, base)
    issues, sentences, m = token_audit(splits["train"], tags, encoder_path, params, base, stage_device(base))
    flagged = set(sentences["id"]) if len(sentences) else set()
    drop = (flagged if params.action == "drop" else set()) | {i for i, d in decisions.items() if d == "accept"}
    drop -= {i for i, d in decisions.items() if d == "reject"}
    train = splits["train"]
    kept_train = train[~train["id"].astype(str).isin(drop)].reset_index(drop=True)
    if len(train) and not len(kept_train):
        raise StageError("audit would drop every train sentence; nothing written")
    m.update({"action": params.action, "sentences_dropped": int(len(train) - len(kept_train)),
              "decisions": {"applied": len(decisions)}, "rows_acted_on": {"dropped": int(len(train) - len(kept_train)),
                                                                         "relabelled": 0},
              "encoder": params.encoder if params.encoder != "base" else f"base:{base.model}",
              "dataset_hash_in": read_hashes(in_dir, splits, tags)["dataset"]})
    with atomic_output(io.out) as out, atomic_output(io.report) as rep:
        m["dataset_hash_out"] = write_dataset(out, {**splits, "train": kept_train}, tags)["dataset"]
        if (in_dir / "manifest.json").exists():
            shutil.copyfile(in_dir / "manifest.json", out / "upstream_manifest.json")
        rep.mkdir()
        issues.to_csv(rep / "token_issues.csv", index=False)
        sentences.to_csv(rep / "sentence_issues.csv", index=False)
        write_json(rep / "summary.json", {"params": as_dict(params), "seed": base.seed, "encoder_path": encoder_path,
                                          "flag_rule": "cleanlab.token_classification find_label_issues and "
                                          f"1 - p(given tag) >= {params.min_score} and suggested tag != given",
                                          "metrics": m})
        with atomic_output(io.metrics) as met:
            write_json(met, m)
    emb = Path(io.embeddings)  # a persistent DVC out of the stage: it must exist
    emb.mkdir(parents=True, exist_ok=True)
    (emb / "README.txt").write_text("Embedding cache of the classifier's label audit; the token audit embeds words "
                                    "afresh each run (base.task token_classification).\n")
    return (f"{m['issues_found']} suspicious words in {m['sentences_flagged']} train sentences "
            f"(cleanlab proposed {m['cleanlab_candidates']}); action {params.action}: dropped {m['sentences_dropped']}")
