"""The promotion loop over six simulated weeks: does a scheduled retrain ever make the served model worse?

    DOMAINTUNE_BANKING77=/path/to/banking77 nice -n 19 flock /tmp/heavy.lock .venv/bin/python bench/loop.py
    # -> bench/results/loop.json and a table on stdout

Data (BANKING77, ../shared/datasets/banking77 or DOMAINTUNE_BANKING77, read in place): train.csv shuffled
with base.seed, ids fixed per row ("b77-<row of train.csv>"). Week 1's source is the first 4,000 rows; each
later week appends the next 1,000 labelled rows. Two defects:
  week 3  30% of that week's 1,000 new rows have their labels shuffled among them (mostly wrong); they stay
          in the source afterwards, as a bad batch of labels would
  week 5  that week's export truncates every text of the source to its first 5 words (the whole export is
          broken that week; week 6's is whole again)
The future test set is BANKING77's test.csv (3,080 rows), never trained or validated on, scored with its
true labels: every week's served model is measured on it.

Splits: each week's source goes through the product's split function (domaintune.data.ingest.
hash_split (sticky) with ingest.split's shares and base.seed, what ingest does to a source with no split
column), and the rows that existed the week before and changed split are counted.

Models, a substitution: six full fine-tunes of MiniLM take hours on 2 CPU cores, so each week's model is
the starting point of the product's `finetune.method: head` with `head_init: probe`: the linear probe
(domaintune.train.classifier.probe_head, C = finetune.probe_C) on the frozen bundled MiniLM's mean-pooled
embeddings (domaintune.modeling.encoders.embed_texts, base.max_length) of the week's train split, with a
temperature fitted on the week's validation split by the evaluate stage's fit_temperature. Every distinct
text (full and truncated) is embedded once and cached in $DOMAINTUNE_BENCH_CACHE (the full texts share
bench/drift_coverage.py's cache file). The decision code is the product's own; only the training is cheap.

Two policies on the SAME weekly models:
  publish = promote   (the behaviour before #23) every week's model is served.
  gate                the product's: week 1 is promoted (no champion). Each later week the challenger is
                      compared with the served champion as pipelines/promote.compare does: score_pair on
                        new_rows       the week's test split less every row the champion trained or
                                       validated on (evaluate.compare.fair_rows: id or row_key)
                        champion_test  the champion's own test split less the challenger's train/validation rows
                      and pipelines/promote.judge decides (release.max_regression, max_ece_increase,
                      bootstrap_resamples, base.seed).
                      The guard: after a promotion, the next week's new rows are the live traffic (texts the
                      served model meets before they are labelled): the new champion serves them, the one it
                      replaced shadows them, 20% come back with feedback labels (their true labels), and
                      monitor.guard.judge(rows, new="served") rolls back when the new champion is `worse`.
                      The guard of week w's promotion runs in week w+1, before that week's retrain.
A week's served_accuracy is that of the model served at the end of the week (after its guard and gate).
Diagnostics, acted on by neither policy: challenger_minus_champion_future (the week's model minus the champion
it was compared with, on the future test set: was a rejection right?) and baseline_guard_would_say (the guard
on publish = promote's swaps, the model published last week against the one before it, on this week's live
rows: would it have caught the bad weeks?).
The target: the gate's served accuracy never drops by more than 0.005 from one week to the next.
"""
from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pandas as pd
from _common import REPO, cpu

OUT = REPO / "bench" / "results" / "loop.json"
WEEKS = 6
FIRST_ROWS = 4_000
WEEKLY_ROWS = 1_000
NOISY_WEEK, NOISY_SHARE = 3, 0.30
TRUNCATED_WEEK, TRUNCATE_WORDS = 5, 5
FEEDBACK_SHARE = 0.20
TARGET_DROP = 0.005


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def truncate(text: str) -> str:
    return " ".join(text.split()[:TRUNCATE_WORDS])


def weekly_sources(seed: int) -> tuple[list[pd.DataFrame], pd.DataFrame, pd.DataFrame, list[str], dict]:
    """(each week's exported source [id, text, label], the full pool with true labels, the future test set,
    the label names, what the defects did)."""
    from banking77 import DATA

    train = pd.read_csv(DATA / "train.csv")
    test = pd.read_csv(DATA / "test.csv")
    names = sorted(train["category"].astype(str).unique())
    order = np.random.default_rng(seed).permutation(len(train))
    pool = pd.DataFrame({"id": [f"b77-{i}" for i in order], "text": train["text"].astype(str).to_numpy()[order],
                         "true_label": train["category"].astype(str).to_numpy()[order]})
    pool["label"] = pool["true_label"]
    start = FIRST_ROWS + WEEKLY_ROWS * (NOISY_WEEK - 2)
    rng = np.random.default_rng(seed + NOISY_WEEK)
    noisy = start + np.sort(rng.choice(WEEKLY_ROWS, int(WEEKLY_ROWS * NOISY_SHARE), replace=False))
    col = pool.columns.get_loc("label")
    pool.iloc[noisy, col] = rng.permutation(pool.iloc[noisy, col].to_numpy())
    wrong = int((pool["label"] != pool["true_label"]).sum())
    sources = []
    for week in range(1, WEEKS + 1):
        src = pool.iloc[:rows_in(week)][["id", "text", "label"]].copy()
        if week == TRUNCATED_WEEK:
            src["text"] = src["text"].map(truncate)
        sources.append(src.reset_index(drop=True))
    future = pd.DataFrame({"id": [f"b77-test-{i}" for i in range(len(test))], "text": test["text"].astype(str),
                           "label": test["category"].astype(str)})
    defects = {NOISY_WEEK: f"labels of {len(noisy)} of the week's {WEEKLY_ROWS:,} new rows shuffled among them "
                           f"({wrong} now wrong; they stay in the source)",
               TRUNCATED_WEEK: f"export truncated every text of the source to its first {TRUNCATE_WORDS} words"}
    return sources, pool, future, names, defects


def rows_in(week: int) -> int:
    return FIRST_ROWS + WEEKLY_ROWS * (week - 1)


def split(src: pd.DataFrame, shares: dict, seed: int) -> pd.Series:
    """The product's split of a source with no split column (as ingest makes it)."""
    from domaintune.data.ingest import hash_split

    total = sum(shares.values())
    fractions = {s: shares[s] / total for s in ("validation", "test") if shares.get(s, 0) > 0}
    return hash_split(src[["id", "label"]], fractions, seed)


def all_embeddings(texts: list[str], truncated: list[str], base, ft) -> dict[str, np.ndarray]:
    """text -> the frozen MiniLM's mean-pooled embedding (the product's embed_texts; cached per text set)."""
    from drift_coverage import embeddings

    # drift_coverage embeds with the bundled MiniLM, max_length 128, mean pooling: what params.yaml says today
    if (base.model, base.max_length, ft.pooling) != ("minilm", 128, "mean"):
        raise SystemExit(f"bench/loop.py embeds like bench/drift_coverage.py (minilm, 128 tokens, mean pooling); "
                         f"params.yaml has {base.model}, {base.max_length}, {ft.pooling}")

    emb = embeddings("banking77", texts)  # every full text of BANKING77: drift_coverage's cache file
    emb.update(embeddings(f"banking77-first{TRUNCATE_WORDS}words", truncated))
    return emb


class Model:
    """One week's model: probe head + temperature, and the rows it trained, validated and was tested on."""

    def __init__(self, week: int, src: pd.DataFrame, splits: pd.Series, emb: dict, names: list[str], ft, seed: int):
        from domaintune.data.textnorm import row_keys
        from domaintune.evaluate.calibration import fit_temperature
        from domaintune.train.classifier import probe_head

        self.week, self.version, self.names, self.emb = week, f"v{week}", names, emb
        index = {n: i for i, n in enumerate(names)}
        part = {s: src[splits.to_numpy() == s].reset_index(drop=True) for s in ("train", "validation", "test")}
        self.test = part["test"]
        seen = pd.concat([part["train"], part["validation"]])
        self.seen_ids, self.seen_keys = set(seen["id"].astype(str)), set(row_keys(seen["text"].tolist()))
        t = time.perf_counter()
        self.W, self.b = probe_head(self.features(part["train"]["text"]), part["train"]["label"].map(index).to_numpy(),
                                    ft.problem_type, len(names), ft.probe_C, seed)
        val_logits = self.logits(part["validation"]["text"])
        self.temperature = float(fit_temperature(val_logits,
                                                 part["validation"]["label"].map(index).to_numpy())["temperature"])
        self.sizes = {s: len(df) for s, df in part.items()}
        log(f"week {week}: head on {self.sizes['train']:,} rows in {time.perf_counter() - t:.0f} s, "
            f"T = {self.temperature:.3f}")

    def features(self, texts) -> np.ndarray:
        return np.stack([self.emb[t] for t in texts])

    def logits(self, texts) -> np.ndarray:
        return self.features(texts) @ self.W.T.astype(np.float64) + self.b

    def predict(self, texts) -> tuple[list[str], np.ndarray]:
        """Labels and calibrated confidences."""
        from domaintune.evaluate.calibration import softmax

        probs = softmax(self.logits(texts), self.temperature)
        return [self.names[i] for i in probs.argmax(axis=1)], probs.max(axis=1)

    def accuracy(self, df: pd.DataFrame) -> float:
        labels, _ = self.predict(df["text"])
        return float(np.mean(np.asarray(labels) == df["label"].to_numpy()))


def scored_set(df: pd.DataFrame, excluded: int, champ: Model, chall: Model, release, seed: int) -> dict:
    """One comparison set's evidence, as pipelines/promote._compare_rows builds it."""
    from pipelines.promote import score_pair

    out = {"rows": len(df), "excluded": excluded}
    if len(df):
        a_lab, a_conf = champ.predict(df["text"])
        b_lab, b_conf = chall.predict(df["text"])
        out.update(score_pair(df["label"].tolist(), a_lab, a_conf, b_lab, b_conf, release.bootstrap_resamples, seed))
    return out


def gate(champ: Model, chall: Model, release, seed: int) -> tuple[bool, str, dict]:
    from domaintune.evaluate.compare import fair_rows
    from pipelines.promote import judge

    mask, out_new = fair_rows(chall.test, champ.seen_ids, champ.seen_keys)
    mask_old, out_old = fair_rows(champ.test, chall.seen_ids, chall.seen_keys)
    evidence = {"champion": champ.version,
                "sets": {"new_rows": scored_set(chall.test[mask], out_new, champ, chall, release, seed),
                         "champion_test": scored_set(champ.test[mask_old], out_old, champ, chall, release, seed)},
                "max_regression": release.max_regression, "max_ece_increase": release.max_ece_increase}
    ok, reason = judge(evidence)
    return ok, reason, evidence


def guard_check(new: Model, old: Model, live: pd.DataFrame, release, seed: int) -> dict:
    """The guard on one week's live traffic: `new` serves, `old` shadows, FEEDBACK_SHARE comes back labelled."""
    from domaintune.monitor import guard

    new_lab, new_conf = new.predict(live["text"])
    old_lab, old_conf = old.predict(live["text"])
    rows = [{"id": i, "served": {"version": new.version, "label": a, "confidence": float(ca)},
             "shadow": {"version": old.version, "label": b, "confidence": float(cb)}}
            for i, a, ca, b, cb in zip(live["id"], new_lab, new_conf, old_lab, old_conf)]
    rng = np.random.default_rng(seed + new.week)
    pick = rng.choice(len(live), int(len(live) * FEEDBACK_SHARE), replace=False)
    labels = {live["id"].iat[i]: live["true_label"].iat[i] for i in pick}
    verdict = guard.judge(rows, "served", release.max_regression, labels, release.bootstrap_resamples, seed)
    return {"judged": new.version, "against": old.version, "action": "rollback" if verdict["worse"] else "keep",
            **{k: verdict[k] for k in ("diff", "low", "high", "basis", "labelled", "requests", "agreement")}}


def compact(evidence: dict) -> dict:
    out = {}
    for name, s in evidence["sets"].items():
        out[name] = {"rows": s["rows"], "excluded": s["excluded"]}
        for metric in ("accuracy", "macro_f1"):
            if metric in s:
                out[name][metric] = {k: round(s[metric][k], 4) for k in ("a", "b", "diff", "low", "high")}
        if "ece" in s:
            out[name]["ece"] = {k: round(v, 4) for k, v in s["ece"].items()}
    return out


def max_drop(values: list[float]) -> float:
    return max([0.0] + [a - b for a, b in zip(values, values[1:])])


def run() -> dict:
    from domaintune.core.params import load_params
    from domaintune.modeling.encoders import set_threads

    started = time.perf_counter()
    set_threads()
    base, ingest_p, ft, release = load_params(REPO / "params.yaml", "base", "ingest", "finetune", "release")
    seed = base.seed
    sources, pool, future, names, defects = weekly_sources(seed)
    truncated = sources[TRUNCATED_WEEK - 1]["text"].tolist()
    emb = all_embeddings(pool["text"].tolist() + future["text"].tolist(), truncated, base, ft)
    result = {"complete": False, "cpu": cpu("run under nice -n 19 on cores shared with other jobs: seconds are not speed measurements"), "dataset": "BANKING77 (train.csv as the weekly stream, test.csv as "
              "the future test set)", "seed": seed, "split": {k: ingest_p.split[k] for k in ingest_p.split},
              "release": {"max_regression": release.max_regression, "max_ece_increase": release.max_ece_increase,
                          "bootstrap_resamples": release.bootstrap_resamples},
              "model": f"finetune.method head, head_init probe: linear probe (C={ft.probe_C}) on frozen "
                       f"mean-pooled {base.model} embeddings, temperature fitted on validation (a substitution "
                       "for six full fine-tunes, hours on 2 CPU cores; the decisions are the product's code)",
              "feedback_share": FEEDBACK_SHARE, "future_test_rows": len(future), "weeks": []}
    champion, replaced, previous_split, published = None, None, None, []
    for week in range(1, WEEKS + 1):
        src = sources[week - 1]
        splits = split(src, ingest_p.split, seed)
        moved = None
        if previous_split is not None:
            now = pd.Series(splits.to_numpy(), index=src["id"].to_numpy())
            moved = int((now.loc[previous_split.index] != previous_split).sum())
        previous_split = pd.Series(splits.to_numpy(), index=src["id"].to_numpy())
        guard_ev = None
        if replaced is not None:  # the last promotion meets this week's new rows live, before they are labelled
            live = pool.iloc[rows_in(week - 1):rows_in(week)]
            guard_ev = guard_check(champion, replaced, live, release, seed)
            if guard_ev["action"] == "rollback":
                champion = replaced
            replaced = None
        would = None
        if len(published) >= 2:  # diagnostic: the guard on publish = promote's last swap (not acted on)
            live = pool.iloc[rows_in(week - 1):rows_in(week)]
            would = guard_check(published[-1], published[-2], live, release, seed)
        model = Model(week, src, splits, emb, names, ft, seed)
        published.append(model)
        if champion is None:
            ok, reason, evidence, versus = True, "first version: no champion to compare with", None, None
        else:
            ok, reason, evidence = gate(champion, model, release, seed)
            versus = round(model.accuracy(future) - champion.accuracy(future), 4)
        if ok:
            champion, replaced = model, champion
        served_acc, own_acc = champion.accuracy(future), model.accuracy(future)
        row = {"week": week, "rows": len(src), "defect": defects.get(week), "split_sizes": model.sizes,
               "rows_moved_between_splits": moved, "promoted": ok, "decision_reason": reason,
               "served_version": champion.version, "served_accuracy": round(served_acc, 4),
               "baseline_served_version": model.version, "baseline_served_accuracy": round(own_acc, 4),
               "guard": guard_ev["action"] if guard_ev else None, "guard_evidence": guard_ev,
               "gate_evidence": compact(evidence) if evidence else None,
               "challenger_minus_champion_future": versus, "baseline_guard_would_say": would}
        result["weeks"].append(row)
        log(f"week {week}: {'promoted' if ok else 'rejected'} {model.version} ({reason}); serving "
            f"{champion.version} at {served_acc:.4f}; publish=promote {own_acc:.4f}"
            + (f"; guard {guard_ev['action']} {guard_ev['judged']}" if guard_ev else ""))
    served = [w["served_accuracy"] for w in result["weeks"]]
    baseline = [w["baseline_served_accuracy"] for w in result["weeks"]]
    result["target"] = {"max_week_to_week_drop": TARGET_DROP, "served_max_drop": round(max_drop(served), 4),
                        "baseline_max_drop": round(max_drop(baseline), 4),
                        "met": max_drop(served) <= TARGET_DROP, "baseline_drops": max_drop(baseline) > TARGET_DROP}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["complete"] = len(result["weeks"]) == WEEKS
    return result


def table(result: dict) -> str:
    lines = ["| week | rows | defect | gate | served | served acc | publish=promote acc | guard | rows moved |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in result["weeks"]:
        defect = re.sub(r" \(.*", "", w["defect"]) if w["defect"] else ""
        guard = f"{w['guard']} {w['guard_evidence']['judged']}" if w["guard"] else ""
        moved = "" if w["rows_moved_between_splits"] is None else f"{w['rows_moved_between_splits']:,}"
        lines.append(f"| {w['week']} | {w['rows']:,} | {defect} | {'promoted' if w['promoted'] else 'rejected'} "
                     f"v{w['week']} | {w['served_version']} | {w['served_accuracy']:.4f} | "
                     f"{w['baseline_served_accuracy']:.4f} | {guard} | {moved} |")
    t = result["target"]
    lines.append(f"\nmax week-to-week drop: served {t['served_max_drop']:.4f} (target <= {t['max_week_to_week_drop']}, "
                 f"{'met' if t['met'] else 'MISSED'}); publish=promote {t['baseline_max_drop']:.4f}")
    return "\n".join(lines)


def main() -> int:
    result = run()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(table(result))
    for w in result["weeks"]:
        print(f"week {w['week']}: {w['decision_reason']}")
    print(f"wrote {OUT} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
