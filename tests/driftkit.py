"""Tiny drift fixtures shared by the monitor, task and generation tests: templated texts per class, German
off-domain texts, a tiny calibrated classifier export."""
from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

TEMPLATES = {
    "billing": ["I was charged twice for invoice {n}", "refund my payment of {n} dollars please",
                "why is my bill {n} this month", "the card payment failed again"],
    "login": ["cannot log in to my account", "password reset link does not work",
              "my account is locked after {n} tries", "two factor code never arrives"],
    "shipping": ["where is my parcel {n}", "the delivery is late by {n} days",
                 "package arrived damaged", "change the shipping address please"],
}
GERMAN = ("Sehr geehrte Damen und Herren, die Lieferung Nummer {a} vom {b}.{c}.2025 ist beschädigt, "
          "Größe {d}, bitte um Rückerstattung von {e} Euro.")


def tiny_splits(n_per_class: int = 12, seed: int = 0) -> tuple[dict[str, pd.DataFrame], list[str]]:
    rng = random.Random(seed)
    rows = []
    for label, temps in TEMPLATES.items():
        for _ in range(n_per_class):
            rows.append((label, rng.choice(temps).format(n=rng.randint(2, 999))))
    rng.shuffle(rows)
    splits = {"train": [], "validation": [], "test": []}
    for i, (label, text) in enumerate(rows):
        name = "train" if i % 6 < 4 else ("validation" if i % 6 == 4 else "test")
        splits[name].append({"id": f"r{i}", "text": text, "label": label, "split": name})
    return {k: pd.DataFrame(v) for k, v in splits.items()}, sorted(TEMPLATES)


def german(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [GERMAN.format(a=rng.randint(10000, 99999), b=rng.randint(1, 28), c=rng.randint(1, 12),
                          d=rng.randint(30, 50), e=rng.randint(100, 999)) for _ in range(n)]


def save_tiny_classifier(tiny_bert: Path, out: Path, labels: list[str], temperature: float = 1.5) -> Path:
    import torch

    from domaintune.modeling.encoders import build_classifier, load_encoder, load_tokenizer, save_classifier

    torch.manual_seed(0)
    model = build_classifier(load_encoder(str(tiny_bert)), len(labels), "mean", 0.0)
    save_classifier(model, load_tokenizer(str(tiny_bert)), out,
                    {"labels": labels, "pooling": "mean", "problem_type": "single_label", "method": "full",
                     "max_length": 64, "temperature": temperature})
    return out


DRIFT_YAML = "drift: {batch_size: 16, pca_components: 3, calibration_resamples: 60}\n"
