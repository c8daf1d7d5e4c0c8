"""Benchmark: our exact dedupe (normalise + SHA-256 + within-split + cross-split) vs pandas drop_duplicates.

One million seeded synthetic support-ticket rows: ~14% exact copies, ~8%
case/whitespace/Unicode-width variants (duplicates only after normalisation),
~3% one-word near copies, most rows with a non-ASCII word; split 80/10/10
at random so copies also leak across splits. Labels follow the original text, so there are no label conflicts and
both paths must keep exactly the same number of rows.

Each variant runs in its own subprocess (same data, regenerated from the
seed) so its peak RSS (ru_maxrss) is its own; the parent runs them one after
the other in the same invocation and writes bench/results/dedupe.json.

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/dedupe.py            # 1M rows
    .venv/bin/python bench/dedupe.py --rows 20000 --near-rows 5000 --out /tmp/d.json  # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABELS = 50
_FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in "abcdefghijklmnopqrstuvwxyz"}


def synth(n: int, seed: int) -> dict[str, pd.DataFrame]:
    """n rows in three splits; same (n, seed) -> the same rows."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(8000)]
    # non-ASCII words NFKC/casefold must handle, as the most frequent words: a worst case for
    # normalisation (most rows take the Unicode path), kept as in bench/results/dedupe.json
    vocab[:6] = ["café", "naïve", "rôle", "straße", "ﬁle", "déjà"]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    kinds = rng.choice(4, size=n, p=[0.75, 0.14, 0.08, 0.03])  # original, exact copy, variant, near copy
    n_orig = int((kinds == 0).sum()) + int(n > 0 and kinds[0] != 0)  # a copy kind in row 0 takes an original too
    lengths = rng.integers(6, 30, size=n_orig)
    words = rng.choice(len(vocab), size=int(lengths.sum()), p=zipf)
    cuts = np.cumsum(lengths)[:-1]
    originals = [" ".join(vocab[w] for w in chunk) for chunk in np.split(words, cuts)]
    orig_label = rng.integers(0, LABELS, size=n_orig)
    texts, labels = [], []
    oi = 0
    src = rng.integers(0, 1 << 62, size=n)
    for k, r in zip(kinds, src):
        if k == 0 or oi == 0:
            texts.append(originals[oi])
            labels.append(orig_label[oi])
            oi += 1
            continue
        j = int(r % oi)
        t = originals[j]
        if k == 2:
            v = r % 4
            t = (t.upper() if v == 0 else "  " + t.replace(" ", " \t ") + " " if v == 1
                 else t.replace(" ", "\u00a0", 2) if v == 2 else "".join(_FULLWIDTH.get(c, c) for c in t))
        elif k == 3:
            ws = t.split(" ")
            ws[int(r % len(ws))] = vocab[int(r % 997) + 6]
            t = " ".join(ws)
        texts.append(t)
        labels.append(orig_label[j])
    split = rng.choice(np.array(["train", "validation", "test"]), size=n, p=[0.8, 0.1, 0.1])
    df = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": texts,
                       "label": [f"intent_{x:02d}" for x in labels], "split": split})
    return {s: df[df["split"] == s].reset_index(drop=True) for s in ("train", "validation", "test")}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def variant(name: str, rows: int, seed: int) -> dict:
    from domaintune.core.params import DedupeParams
    from domaintune.data.dedupe import dedupe
    from domaintune.data.textnorm import normalise_all, sha256_all

    t0 = time.perf_counter()
    splits = synth(rows, seed)
    gen_s = time.perf_counter() - t0
    n = sum(len(df) for df in splits.values())
    out: dict = {"variant": name, "rows": n, "generate_s": round(gen_s, 2)}
    if name == "pandas":
        # The baseline gets the normalised text for free (computed before its clock and memory start).
        df = pd.concat(splits.values(), ignore_index=True)
        df["norm"] = normalise_all(df["text"])
        base_rss = maxrss_mb()
        t0 = time.perf_counter()
        within = df.drop_duplicates(subset=["split", "norm"])
        t_within = time.perf_counter() - t0
        train = set(within.loc[within["split"] == "train", "norm"])
        val = within[within["split"] == "validation"]
        val = val[~val["norm"].isin(train)]
        test = within[within["split"] == "test"]
        test = test[~test["norm"].isin(train | set(val["norm"]))]
        kept = int((within["split"] == "train").sum()) + len(val) + len(test)
        total = time.perf_counter() - t0
        out.update(drop_duplicates_s=round(t_within, 3), total_s=round(total, 3), kept=kept,
                   kept_within_split=len(within))
    elif name == "ours":
        base_rss = maxrss_mb()
        texts = pd.concat(splits.values(), ignore_index=True)["text"]
        t0 = time.perf_counter()
        norm = normalise_all(texts)
        t_norm = time.perf_counter() - t0
        t0 = time.perf_counter()
        sha256_all(norm)
        t_hash = time.perf_counter() - t0
        del norm
        t0 = time.perf_counter()
        res = dedupe(splits, DedupeParams(near_duplicates=False), seed)
        total = time.perf_counter() - t0
        counts = res.removed["reason"].value_counts().to_dict()
        out.update(normalise_s=round(t_norm, 3), sha256_s=round(t_hash, 3), total_s=round(total, 3),
                   kept=sum(len(df) for df in res.splits.values()),
                   kept_within_split=n - counts.get("exact_duplicate", 0) - counts.get("label_conflict", 0),
                   removed={k: int(v) for k, v in counts.items()})
    elif name == "near":
        import datasketch  # noqa: F401  (import once, outside the clock: it pulls in scipy)

        base_rss = maxrss_mb()
        p = DedupeParams(near_duplicates=True)
        t0 = time.perf_counter()
        exact = dedupe(splits, DedupeParams(near_duplicates=False), seed)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = dedupe(splits, p, seed)
        total = time.perf_counter() - t0
        counts = res.removed["reason"].value_counts().to_dict()
        out.update(total_s=round(total, 3), exact_only_s=round(t_exact, 3),
                   near_part_s=round(total - t_exact, 3), kept=sum(len(df) for df in res.splits.values()),
                   exact_kept=sum(len(df) for df in exact.splits.values()),
                   removed={k: int(v) for k, v in counts.items()},
                   params={"jaccard_threshold": p.jaccard_threshold, "num_perm": p.num_perm,
                           "shingle_size": p.shingle_size})
    else:
        raise SystemExit(f"unknown variant {name}")
    out["rows_per_s"] = round(n / out["total_s"])
    out["peak_rss_mb"] = round(maxrss_mb(), 1)
    out["peak_rss_over_data_mb"] = round(maxrss_mb() - base_rss, 1)
    return out


def run_child(name: str, rows: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", name, "--rows", str(rows), "--seed", str(seed)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--near-rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dedupe.json"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(variant(args.variant, args.rows, args.seed)))
        return
    ours = run_child("ours", args.rows, args.seed)
    pandas_ = run_child("pandas", args.rows, args.seed)
    near = run_child("near", args.near_rows, args.seed)
    assert ours["kept_within_split"] == pandas_["kept_within_split"], (ours, pandas_)
    assert ours["kept"] == pandas_["kept"], (ours, pandas_)
    result = {
        "benchmark": "exact dedupe of synthetic support tickets: ours vs pandas drop_duplicates",
        "rows": ours["rows"],
        "seed": args.seed,
        "agree_on_rows_kept": ours["kept"] == pandas_["kept"],
        "rows_kept": ours["kept"],
        "ours": ours,
        "pandas_drop_duplicates": pandas_,
        "ratio_pandas_rows_per_s_over_ours": round(pandas_["rows_per_s"] / ours["rows_per_s"], 2),
        "ratio_pandas_over_ours_without_normalise": round(
            pandas_["rows_per_s"] / (ours["rows"] / (ours["total_s"] - ours["normalise_s"])), 2),
        "near_duplicates_lsh": near,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "pandas": pd.__version__,
                    "numpy": np.__version__, "platform": platform.platform(), "processor": platform.processor()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
