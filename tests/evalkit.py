"""Helpers for evaluate/export/calibration tests: tiny datasets, tiny saved classifiers, calibrated logits.

Models are built from the session's tiny random BERT (conftest.tiny_bert) and
saved with domaintune.modeling.encoders.save_classifier, i.e. exactly the layout the
finetune stage writes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from domaintune.data.dataset import write_dataset
from domaintune.evaluate import calibration as cal

LABELS = ["billing", "login", "shipping"]
WORDS = {
    "billing": ["refund", "invoice", "charged", "payment", "card", "twice", "price"],
    "login": ["password", "reset", "account", "locked", "sign", "email", "code"],
    "shipping": ["parcel", "delivery", "late", "courier", "tracking", "address", "box"],
}


def calibrated_logits(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) logits and labels drawn from their softmax: calibrated (temperature 1) by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(n, k))
    p = cal.softmax(logits)
    y = np.array([rng.choice(k, p=row) for row in p])
    return logits, y


def make_split(name: str, n_per_class: int, labels=LABELS, seed: int = 0) -> pd.DataFrame:
    import random

    rng = random.Random(f"{name}-{seed}")
    rows = []
    for lab in labels:
        for i in range(n_per_class):
            words = rng.sample(WORDS[lab], k=rng.randint(2, 6)) + ["please", "help"][: rng.randint(0, 2)]
            rows.append({"id": f"{name}-{lab}-{i}", "text": " ".join(words), "label": lab, "split": name})
    return pd.DataFrame(rows)


def make_dataset(folder: Path, n_val: int = 10, n_test: int = 10, labels=LABELS) -> Path:
    splits = {"train": make_split("train", 5, labels), "validation": make_split("validation", n_val, labels),
              "test": make_split("test", n_test, labels)}
    write_dataset(folder, splits, list(labels))
    return folder


def make_model(tiny_bert: Path, out: Path, labels=LABELS, lora: bool = False, seed: int = 0,
               problem_type: str = "single_label") -> Path:
    """Save a tiny classifier; with lora=True a LoRA adapter with non-zero (random) B matrices."""
    import torch

    from domaintune.modeling.encoders import build_classifier, load_encoder, load_tokenizer, save_classifier

    torch.manual_seed(seed)
    enc = load_encoder(str(tiny_bert))
    meta = {"labels": list(labels), "pooling": "mean", "problem_type": problem_type,
            "method": "lora" if lora else "full", "max_length": 32, "base_encoder": str(tiny_bert),
            "dataset_hash": "test", "params": {"lr": 1e-4}}
    if lora:
        from peft import LoraConfig, get_peft_model

        enc = get_peft_model(enc, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
        with torch.no_grad():  # peft initialises B to zero (adapter = identity); make it matter
            for name, p in enc.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    model = build_classifier(enc, len(labels), "mean", 0.0)
    with torch.no_grad():  # random tiny encoders give near-identical logits; a bigger head spreads them
        model.head.weight.normal_(0, 2.0)
    save_classifier(model, load_tokenizer(str(tiny_bert)), out, meta)
    return out


def write_params(path: Path, **sections) -> Path:
    """A params.yaml with the repo's defaults overridden per section."""
    repo = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((repo / "params.yaml").read_text())
    for sec, over in sections.items():
        data.setdefault(sec, {}).update(over)
    path.write_text(yaml.safe_dump(data))
    return path


# Texts none of the tiny labels covers (evaluate.abstain tests).
OOS_TEXTS = ["what is the weather like in paris tomorrow", "recommend a good pizza recipe for dinner",
             "who won the football match yesterday evening", "play some relaxing jazz music now",
             "translate good morning into japanese", "how tall is the eiffel tower"]


def add_abstention(folder: Path, train_texts: list[str], train_labels: list[str], in_texts: list[str],
                   method: str = "mahalanobis", recall: float = 0.9, label: str = "out_of_scope",
                   oos_texts: list[str] | None = None) -> dict:
    """Give a saved classifier (or export) folder an abstention as the evaluate stage fits it: model.json
    "abstain" and, for mahalanobis, abstain.safetensors (class means and shrunk covariance from the float32
    model's vectors of `train_texts`; for trained, the detector of `train_texts` against `oos_texts`), the threshold
    keeping `recall` of `in_texts`. Returns the abstain entry."""
    from domaintune.core.io import read_json, write_json
    from domaintune.evaluate import abstain as ab
    from domaintune.predict.predictor import Predictor

    p = Predictor.load(folder)
    meta = read_json(folder / "model.json")
    y = np.array([p.labels.index(lab) for lab in train_labels])
    tr_logits, tr_vec = p.logits(train_texts, mean_pooled=True)
    in_logits, in_vec = p.logits(in_texts, mean_pooled=True)
    oos = ab.Split(*p.logits(oos_texts, mean_pooled=True)) if oos_texts else None
    abstainer, _ = ab.fit_abstention(method, recall, label, p.temperature, len(p.labels),
                                     ab.Split(tr_logits, tr_vec, y), ab.Split(in_logits, in_vec), oos)
    abstainer.save_arrays(folder)
    meta["abstain"] = abstainer.to_json()
    write_json(folder / "model.json", meta)
    return meta["abstain"]
