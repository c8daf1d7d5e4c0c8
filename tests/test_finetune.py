"""finetune stage on a tiny random BERT and a tiny keyword dataset (seconds per test)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from domaintune.data import read_json, write_dataset
from domaintune.params import BaseParams, FinetuneParams, ParamsError

WORDS = {
    "billing": ["invoice", "refund", "charge", "payment", "bill"],
    "login": ["password", "login", "account", "locked", "reset"],
    "shipping": ["parcel", "delivery", "courier", "tracking", "shipped"],
}
FILLER = ["my", "the", "please", "help", "with", "urgent", "today", "again", "problem", "issue"]


def make_rows(n_per_label: int, split: str, seed: int, multi: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    names = sorted(WORDS)
    for li, label in enumerate(names):
        for i in range(n_per_label):
            words = list(rng.choice(WORDS[label], 2)) + list(rng.choice(FILLER, int(rng.integers(2, 6))))
            lab = label
            if multi and i % 3 == 0:  # every third row also carries the next label
                other = names[(li + 1) % len(names)]
                words += list(rng.choice(WORDS[other], 2))
                lab = "|".join(sorted([label, other]))
            rng.shuffle(words)
            rows.append({"id": f"{split}-{label}-{i}", "text": " ".join(words), "label": lab, "split": split})
    return pd.DataFrame(rows)


def make_dataset(folder: Path, multi: bool = False, n_train: int = 12) -> Path:
    splits = {"train": make_rows(n_train, "train", 1, multi), "validation": make_rows(4, "validation", 2, multi),
              "test": make_rows(4, "test", 3, multi)}
    labels = sorted(set(splits["train"]["label"]))
    write_dataset(folder, splits, labels)
    return folder


def write_params(path: Path, **ft) -> Path:
    import yaml

    ft_all = {"epochs": 3, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0.0, "seeds": [0], "checkpoint_every": 0}
    ft_all.update(ft)
    path.write_text(yaml.safe_dump({"base": {"seed": 0, "max_length": 32}, "finetune": ft_all}))
    return path


def run_stage_cli(tmp_path: Path, tiny_bert: Path, data: Path, params: Path, out="model", extra=()) -> int:
    from stages.finetune import main

    return main(["--in", str(data), "--encoder", str(tiny_bert), "--out", str(tmp_path / out),
                 "--metrics", str(tmp_path / f"{out}.json"), "--checkpoints", str(tmp_path / "ckpt"),
                 "--live", str(tmp_path / f"{out}-live"), "--params", str(params), "--no-progress", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "audited")


def test_stage_lora_end_to_end(tmp_path, tiny_bert, data):
    """The dvc.yaml command line: trains LoRA, saves a loadable model with full meta and metrics."""
    from domaintune.modeling import load_classifier, predict_logits

    params = write_params(tmp_path / "params.yaml", method="lora", lora_r=4, lora_alpha=8)
    assert run_stage_cli(tmp_path, tiny_bert, data, params) == 0
    out = tmp_path / "model"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "head.safetensors").exists() and not list(out.rglob("*.bin"))
    model, tok, meta = load_classifier(out)
    assert meta["labels"] == read_json(data / "labels.json")
    assert meta["method"] == "lora" and meta["pooling"] == "mean" and meta["problem_type"] == "single_label"
    assert meta["base_encoder"] == str(tiny_bert)
    assert meta["dataset_hash"] == read_json(data / "hashes.json")["dataset"]
    assert meta["params"]["finetune"]["lora_r"] == 4 and meta["max_length"] == 32
    assert len(meta["history_epochs"]) == 3 and "val_macro_f1" in meta["history_epochs"][0]
    metrics = json.loads((tmp_path / "model.json").read_text())
    seed_m = metrics["per_seed"]["0"]
    assert metrics["trainable_params"] < metrics["total_params"] / 2
    assert seed_m["steps"] == 3 * 5  # 36 rows / batch 8 = 5 steps per epoch
    # The reloaded model reproduces the validation metrics recorded at training time.
    val = pd.read_parquet(data / "validation.parquet")
    logits = predict_logits(model, tok, val["text"].tolist(), max_length=32)
    acc = float((np.array(meta["labels"])[logits.argmax(1)] == val["label"].to_numpy()).mean())
    assert acc == pytest.approx(metrics["val_accuracy"])
    # DVCLive curves: per-step loss/lr/grad norm and per-epoch validation metrics.
    plots = tmp_path / "model-live" / "seed-0" / "plots" / "metrics"
    assert (plots / "train" / "loss.tsv").exists() and (plots / "train" / "grad_norm.tsv").exists()
    assert (plots / "val" / "macro_f1.tsv").exists()
    assert len((plots / "train" / "loss.tsv").read_text().strip().splitlines()) == 1 + 15
    # A finished run leaves no stale checkpoint behind.
    assert (tmp_path / "ckpt").is_dir() and not any((tmp_path / "ckpt").iterdir())


def _train(tiny_bert, data, **ft):
    """Train in-process via the core function; returns (model, result)."""
    from domaintune.data import read_dataset
    from domaintune.training import train_one

    splits, labels = read_dataset(data)
    base = BaseParams(seed=0, max_length=32)
    p = dict(epochs=3, batch_size=8, lr=5e-3, warmup_ratio=0.0, seeds=(0,), checkpoint_every=0, head_init="random")
    p.update(ft)
    model, tok, names, res = train_one(splits["train"], splits["validation"], labels, str(tiny_bert), base,
                                       FinetuneParams(**p), seed=0, progress=False)
    return model, res


def _original(tiny_bert):
    from safetensors.torch import load_file

    return load_file(str(tiny_bert / "model.safetensors"))


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "head"])
def test_each_method_trains_and_loss_goes_down(tiny_bert, data, method):
    # frozen random features learn slower: a larger LR for freeze/head keeps the test short
    model, res = _train(tiny_bert, data, method=method, freeze_layers=1, lr=5e-3 if method in ("full", "lora") else 2e-2)
    epochs = res["history"]["epochs"]
    assert epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"], epochs
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    orig = _original(tiny_bert)
    enc = {k: v for k, v in model.encoder.state_dict().items()}
    if method == "full":
        assert res["trainable_params"] == res["total_params"]
        assert not torch_equal(enc["encoder.layer.0.attention.self.query.weight"], orig, "encoder.layer.0.attention.self.query.weight")
    if method == "freeze":
        # embeddings and block 0 bit-identical; block 1 trained
        frozen = [k for k in orig if k.startswith("embeddings.") or k.startswith("encoder.layer.0.")]
        assert frozen and all(torch_equal(enc[k], orig, k) for k in frozen)
        assert not torch_equal(enc["encoder.layer.1.output.dense.weight"], orig, "encoder.layer.1.output.dense.weight")
    if method == "head":
        assert all(torch_equal(enc[k], orig, k) for k in orig)
        assert res["trainable_params"] == model.head.weight.numel() + model.head.bias.numel()


def torch_equal(t, orig, key):
    import torch

    return bool(torch.equal(t, orig[key]))


def test_lora_trains_only_adapters_and_head(tiny_bert, data):
    model, res = _train(tiny_bert, data, method="lora", lora_r=4, lora_alpha=8, target_modules=["query", "value"])
    orig = _original(tiny_bert)
    changed, same = [], []
    for name, t in model.encoder.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        (same if torch_equal(t, orig, key) else changed).append(key)
    assert not changed, changed
    assert len(same) == len(orig)
    lora_b = [t for n, t in model.encoder.state_dict().items() if "lora_B" in n]
    assert len(lora_b) == 2 * 2 and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: it trained
    n_lora = sum(t.numel() for n, t in model.encoder.state_dict().items() if "lora_" in n)
    assert res["trainable_params"] == n_lora + model.head.weight.numel() + model.head.bias.numel()
