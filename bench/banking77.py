"""BANKING77 for the benchmarks: the data, and the default fine-tune trained once and cached.

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/banking77.py   # train (or find) the cached model

Data: ../shared/datasets/banking77 (train.csv 10,003 rows / test.csv 3,080, 77 intents), or the
folder named by DOMAINTUNE_BANKING77. It is read in place, never copied into the repo.
BANKING77 has no validation split, so 10% of train (stratified, base.seed) is held out to fit
the temperature (and for finetune's model selection); test is never touched until scoring.

`cached_finetune(...)` trains the default fine-tune (params.yaml's base + finetune sections,
through domaintune.train.classifier.train_classifier, what the finetune stage runs), fits the
temperature on validation with the evaluate stage's own core, and keeps the result in
$DOMAINTUNE_BENCH_CACHE (default ~/.cache/domaintune-bench) under a key made of the params
and the data files' hashes, so later benches reuse it (a fine-tune is ~15 min on 2 cores).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(os.environ.get("DOMAINTUNE_BANKING77", REPO.parent / "shared" / "datasets" / "banking77"))


def cache_root() -> Path:
    return Path(os.environ.get("DOMAINTUNE_BENCH_CACHE", Path.home() / ".cache" / "domaintune-bench"))


def load_banking77(seed: int, data: Path | None = None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """{train, validation, test} frames (id, text, label, split) and the sorted label names."""
    from sklearn.model_selection import train_test_split

    data = Path(data or DATA)
    if not (data / "train.csv").exists():
        raise FileNotFoundError(f"BANKING77 not found at {data} (set DOMAINTUNE_BANKING77)")
    train = pd.read_csv(data / "train.csv")
    test = pd.read_csv(data / "test.csv")
    tr, va = train_test_split(train, test_size=0.1, stratify=train["category"], random_state=seed)

    def frame(df, name):
        return pd.DataFrame({"id": [f"{name}-{i}" for i in df.index], "text": df["text"].astype(str).to_numpy(),
                             "label": df["category"].astype(str).to_numpy(), "split": name}).reset_index(drop=True)

    splits = {"train": frame(tr, "train"), "validation": frame(va, "validation"), "test": frame(test, "test")}
    return splits, sorted(train["category"].astype(str).unique())


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def finetune_key(base, ft, data: Path) -> str:
    """Cache key: every param that shapes the model, and the exact data files."""
    from domaintune.core.params import as_dict

    # finetune.optimizer only chooses for base.task generation (the classifier always trains with AdamW), and
    # outlier_exposure at 0 trains nothing extra: left out, so adding them kept the key of the cached fine-tune
    ft_key = {k: v for k, v in as_dict(ft).items()
              if k != "optimizer" and not (k == "outlier_exposure" and v == 0)}
    blob = json.dumps({"base": as_dict(base), "finetune": ft_key,
                       "data": {n: _file_sha256(Path(data) / n) for n in ("train.csv", "test.csv")}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_finetune(params_path: Path | str = REPO / "params.yaml", data: Path | None = None,
                    log=print) -> tuple[Path, dict]:
    """(folder of the fine-tuned classifier, info with calibration and train metrics), trained at most once.

    The folder holds model/ (a domaintune classifier folder, LoRA merged if any) and
    calibration.json (the evaluate stage's temperature fit on the validation split).
    """
    from domaintune.core.params import load_params

    data = Path(data or DATA)
    base, ft, ev = load_params(params_path, "base", "finetune", "evaluate")
    root = cache_root() / f"banking77-finetune-{finetune_key(base, ft, data)}"
    if (root / "info.json").exists():
        log(f"banking77: reusing the cached fine-tune {root}")
        return root, json.loads((root / "info.json").read_text())
    splits, labels = load_banking77(base.seed, data)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = _train_and_calibrate(splits, labels, base, ft, ev, tmp, log)
        (tmp / "info.json").write_text(json.dumps(info, indent=2, default=float) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root, info


def _train_and_calibrate(splits, labels, base, ft, ev, out: Path, log) -> dict:
    from domaintune.core.params import as_dict
    from domaintune.evaluate.classifier import evaluate_logits, model_logits
    from domaintune.modeling.encoders import resolve_model, set_threads
    from domaintune.train.classifier import train_classifier

    set_threads()
    log(f"banking77: fine-tuning ({ft.method}, {ft.epochs} epochs) on {len(splits['train'])} rows; "
        "this takes ~15 min on 2 cores")
    t0 = time.perf_counter()
    encoder = resolve_model(base.model)
    train_metrics = train_classifier(splits["train"], splits["validation"], labels, encoder, base, ft,
                                     out / "model", base_encoder=encoder, progress=False)
    train_s = time.perf_counter() - t0
    meta, logits = model_logits(out / "model", splits, 64)
    res = evaluate_logits(splits["validation"], splits["test"], logits["validation"], logits["test"],
                          list(meta["labels"]), ev)
    (out / "calibration.json").write_text(json.dumps(res.calibration, indent=2, default=float) + "\n")
    log(f"banking77: trained in {train_s:.0f} s; test accuracy {res.after['accuracy']:.4f}, "
        f"ECE {res.before['ece']:.4f} -> {res.after['ece']:.4f} (T = {res.calibration['temperature']:.3f})")
    return {"train_seconds": round(train_s, 1), "train_metrics": train_metrics, "calibration": res.calibration,
            "test_before": res.before, "test_after": res.after, "base": as_dict(base), "finetune": as_dict(ft)}


if __name__ == "__main__":
    folder, info = cached_finetune()
    print(folder)
    print(json.dumps({k: info[k] for k in ("train_seconds", "test_after")}, indent=2, default=float))
