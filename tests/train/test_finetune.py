"""finetune stage on a tiny random BERT and a tiny keyword dataset (seconds per test)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from domaintune.core.io import read_json
from domaintune.core.params import BaseParams, FinetuneParams
from domaintune.data.dataset import write_dataset

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
    from domaintune.modeling.encoders import load_classifier, predict_logits

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
    plots = tmp_path / "model-live" / "plots" / "metrics"
    assert (plots / "train" / "loss.tsv").exists() and (plots / "train" / "grad_norm.tsv").exists()
    assert (plots / "val" / "macro_f1.tsv").exists()
    assert len((plots / "train" / "loss.tsv").read_text().strip().splitlines()) == 1 + 15
    # A finished run leaves no stale checkpoint behind.
    assert (tmp_path / "ckpt").is_dir() and not [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]


def _train(tiny_bert, data, **ft):
    """Train in-process via the core function; returns (model, result)."""
    from domaintune.data.dataset import read_dataset
    from domaintune.train.classifier import train_one

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
    # Tiny random model, 36 rows: each method gets an LR/epochs that learns in a few steps.
    lr, epochs = {"full": (5e-3, 3), "lora": (5e-2, 3), "freeze": (3e-2, 4), "head": (2e-2, 3)}[method]
    model, res = _train(tiny_bert, data, method=method, freeze_layers=1, lr=lr, epochs=epochs)
    hist = res["history"]
    assert hist["epochs"][-1]["train_loss"] < 0.9 * hist["epochs"][0]["train_loss"], hist["epochs"]
    assert hist["epochs"][-1]["val_loss"] < hist["initial"]["val_loss"]
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
    if method == "lora":
        assert_only_adapters_trained(model, res, orig)


def assert_only_adapters_trained(model, res, orig):
    """LoRA: every base weight bit-identical, adapters (B starts at zero) and head trained."""
    changed, same = [], []
    for name, t in model.encoder.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key not in orig:  # the unused pooler is created at load time, not in the checkpoint
            continue
        (same if torch_equal(t, orig, key) else changed).append(key)
    assert not changed, changed
    assert len(same) == len(orig)
    lora_b = [t for n, t in model.encoder.state_dict().items() if "lora_B" in n]
    assert len(lora_b) == 2 * 2 and all(t.abs().sum() > 0 for t in lora_b)  # query+value in 2 blocks
    n_lora = sum(t.numel() for n, t in model.encoder.state_dict().items() if "lora_" in n)
    assert res["trainable_params"] == n_lora + model.head.weight.numel() + model.head.bias.numel()


def torch_equal(t, orig, key):
    import torch

    return bool(torch.equal(t, orig[key]))


def test_multi_label_end_to_end(tmp_path, tiny_bert):
    """Labels joined by "|": one sigmoid per label, BCE; meta records the separator and threshold."""
    from domaintune.modeling.encoders import load_classifier, predict_logits

    data = make_dataset(tmp_path / "ml", multi=True)
    params = write_params(tmp_path / "params.yaml", method="full", problem_type="multi_label", lr=3e-3,
                          epochs=4)
    assert run_stage_cli(tmp_path, tiny_bert, data, params) == 0
    model, tok, meta = load_classifier(tmp_path / "model")
    assert meta["problem_type"] == "multi_label" and meta["labels"] == sorted(WORDS)
    assert meta["label_separator"] == "|" and meta["threshold"] == 0.5
    metrics = json.loads((tmp_path / "model.json").read_text())
    assert {"val_micro_f1", "val_macro_f1", "val_accuracy"} <= set(metrics)
    assert metrics["per_seed"]["0"]["final_train_loss"] < metrics["per_seed"]["0"]["first_train_loss"]
    hist = meta["history_epochs"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] or hist[-1]["val_micro_f1"] > hist[0]["val_micro_f1"]
    val = pd.read_parquet(data / "validation.parquet")
    logits = predict_logits(model, tok, val["text"].tolist(), max_length=32)
    assert logits.shape == (len(val), 3)


def test_resume_after_crash_equals_uninterrupted(tmp_path, tiny_bert, data, monkeypatch):
    from safetensors.torch import load_file

    from domaintune.train.engine import CRASH_ENV, TrainingCrash

    # 36 rows / batch 8 = 5 steps per epoch, 10 in all; checkpoints every 2 steps; crash at step 7.
    params = write_params(tmp_path / "params.yaml", method="full", epochs=2, checkpoint_every=2, head_dropout=0.2)
    assert run_stage_cli(tmp_path, tiny_bert, data, params, out="straight") == 0

    monkeypatch.setenv(CRASH_ENV, "7")
    with pytest.raises(TrainingCrash):
        run_stage_cli(tmp_path, tiny_bert, data, params, out="resumed")
    assert not (tmp_path / "resumed").exists()  # no partial output
    keys = [p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]
    assert len(keys) == 1
    state = json.loads((tmp_path / "ckpt" / keys[0] / "last" / "state.json").read_text())
    assert state["step"] == 6 and state["epoch"] == 1 and state["pos"] == 1
    assert not list((tmp_path / "ckpt").rglob("*.bin")) and not list((tmp_path / "ckpt").rglob("*.pt"))

    # A crashed run with other params never reuses (and clears) the stale checkpoint.
    other = write_params(tmp_path / "other.yaml", method="full", epochs=2, checkpoint_every=2, head_dropout=0.2,
                         lr=4e-3)
    with pytest.raises(TrainingCrash):
        run_stage_cli(tmp_path, tiny_bert, data, other, out="other")
    after = [p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]
    assert after != keys
    assert keys[0] not in after  # the stale checkpoint is removed, not just left beside the new one

    # Back to the first params: crash again at step 7, then resume without the crash hook.
    with pytest.raises(TrainingCrash):
        run_stage_cli(tmp_path, tiny_bert, data, params, out="resumed")
    monkeypatch.delenv(CRASH_ENV)
    assert run_stage_cli(tmp_path, tiny_bert, data, params, out="resumed") == 0
    a = load_file(str(tmp_path / "straight" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "encoder" / "model.safetensors"))
    import torch

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = load_file(str(tmp_path / "straight" / "head.safetensors")), load_file(str(tmp_path / "resumed" / "head.safetensors"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    ma, mb = json.loads((tmp_path / "straight.json").read_text()), json.loads((tmp_path / "resumed.json").read_text())
    assert ma["val_macro_f1"] == mb["val_macro_f1"] and mb["per_seed"]["0"]["steps"] == 10


def test_gradual_unfreezing_trains_top_blocks_first(tmp_path, tiny_bert, data, monkeypatch):
    """Epoch 0 of 2 trains the head and the top block only: the checkpoint taken then shows it."""
    from safetensors.torch import load_file

    from domaintune.train.engine import CRASH_ENV, TrainingCrash

    params = write_params(tmp_path / "params.yaml", method="full", epochs=2, checkpoint_every=4,
                          gradual_unfreeze=True)
    monkeypatch.setenv(CRASH_ENV, "5")
    with pytest.raises(TrainingCrash):
        run_stage_cli(tmp_path, tiny_bert, data, params)
    (key,) = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]
    w = load_file(str(key / "last" / "model.safetensors"))
    orig = _original(tiny_bert)
    bottom = [k for k in orig if k.startswith(("embeddings.", "encoder.layer.0."))]
    top = [k for k in orig if k.startswith("encoder.layer.1.")]
    assert all(torch_equal(w["encoder." + k], orig, k) for k in bottom)
    assert any(not torch_equal(w["encoder." + k], orig, k) for k in top)


def test_stabilisers_run_and_shape_the_schedule(tiny_bert, data):
    """Cosine schedule with warmup, layer-wise LR decay, label smoothing, class weights, CLS pooling."""
    from domaintune.modeling.adapters import encoder_layers
    from domaintune.train.classifier import _param_groups

    model, res = _train(tiny_bert, data, method="full", scheduler="cosine", warmup_ratio=0.2, epochs=2,
                        layerwise_lr_decay=0.5, label_smoothing=0.1, class_weights=True, pooling="cls",
                        head_init="probe")
    lrs = [s["lr"] for s in res["history"]["steps"]]
    assert lrs[0] < lrs[1] and lrs[1] == pytest.approx(5e-3)  # 2 warmup steps of 10
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.1 * max(lrs)  # cosine decay
    assert all(np.isfinite(s["grad_norm"]) for s in res["history"]["steps"])
    # Layer-wise decay: embeddings (depth 0) get lr * 0.5^3, block 0 * 0.5^2, block 1 * 0.5, head * 1.
    ft = FinetuneParams(lr=1.0, layerwise_lr_decay=0.5)
    groups = _param_groups(model, list(model.named_parameters()), ft, len(encoder_layers(model.encoder)))
    by_depth = {g["depth"]: g["lr"] for g in groups}
    assert by_depth == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    no_decay = [n for g in groups if g["weight_decay"] == 0 for n in g["names"]]
    assert no_decay and all("bias" in n or "LayerNorm" in n for n in no_decay)


def test_seeds_early_stopping_and_best_restore(tmp_path, tiny_bert, data):
    params = write_params(tmp_path / "params.yaml", method="head", seeds=[0, 1], lr=2e-2, epochs=3)
    assert run_stage_cli(tmp_path, tiny_bert, data, params) == 0
    m = json.loads((tmp_path / "model.json").read_text())
    assert set(m["per_seed"]) == {"0", "1"} and m["val_macro_f1_std"] >= 0
    f1s = [m["per_seed"][s]["validation"]["macro_f1"] for s in ("0", "1")]
    assert m["val_macro_f1_mean"] == pytest.approx(np.mean(f1s)) and m["val_macro_f1"] == max(f1s)
    assert m["val_macro_f1_std"] == pytest.approx(np.std(f1s, ddof=1))  # sample std, as training._std
    for s in ("0", "1"):
        meta = read_json(tmp_path / "model" / "seeds" / s / "model.json")
        assert meta["seed"] == int(s)
        # the kept weights are those of the best epoch
        assert meta["validation"]["macro_f1"] == max(e["val_macro_f1"] for e in meta["history_epochs"])
    assert read_json(tmp_path / "model" / "model.json")["seed"] == m["best_seed"]
    live = tmp_path / "model-live"
    assert (live / "plots" / "metrics" / "train" / "loss.tsv").exists()
    assert all((live / "seeds" / s / "plots" / "metrics" / "val" / "macro_f1.tsv").exists() for s in ("0", "1"))

    # Early stopping: an LR too small to change predictions stops after `patience` flat epochs.
    from domaintune.data.dataset import read_dataset
    from domaintune.train.classifier import train_one

    splits, labels = read_dataset(data)
    _, _, _, res = train_one(splits["train"], splits["validation"], labels, str(tiny_bert), BaseParams(max_length=32),
                             FinetuneParams(method="head", lr=1e-9, epochs=5, early_stopping_patience=1,
                                            checkpoint_every=0), seed=0, progress=False)
    assert res["stopped_early"] and len(res["history"]["epochs"]) == 2


def test_qlora_runs_or_skips_with_reason(tmp_path, tiny_bert, data):
    """4-bit NF4 base + LoRA trains (loss down), and the adapter saves and loads over the base."""
    from domaintune.modeling.adapters import qlora_backend_error

    err = qlora_backend_error()
    if err:
        pytest.skip(f"qlora: {err}")
    from domaintune.modeling.encoders import load_classifier, save_classifier

    model, res = _train(tiny_bert, data, method="qlora", lr=5e-2, lora_r=4, lora_alpha=8)
    kinds = [type(m).__name__ for m in model.encoder.modules()]
    assert kinds.count("Linear4bit") == 2 * 6  # q, k, v, attn-out, intermediate, output in 2 blocks
    epochs = res["history"]["epochs"]
    assert epochs[-1]["train_loss"] < 0.9 * epochs[0]["train_loss"]
    assert epochs[-1]["val_loss"] < res["history"]["initial"]["val_loss"]
    from transformers import AutoTokenizer

    save_classifier(model, AutoTokenizer.from_pretrained(tiny_bert), tmp_path / "q",
                    {"labels": sorted(WORDS), "pooling": "mean", "problem_type": "single_label", "method": "qlora",
                     "max_length": 32, "base_encoder": str(tiny_bert)})
    loaded, _, meta = load_classifier(tmp_path / "q")
    assert meta["adapter"] == "adapter" and loaded.head.out_features == 3


@pytest.mark.parametrize("override, message", [
    ({"method": "lora", "target_modules": ["qkv_proj"]}, "module 'qkv_proj' is not in the model; available Linear modules: ["),
    ({"lora_r": 0}, "finetune.lora_r: must be > 0"),
    ({"seeds": []}, "finetune.seeds: must list at least one seed"),
    ({"method": "prefix"}, "finetune.method: must be one of"),
    ({"method": "freeze", "freeze_layers": 5}, "finetune.freeze_layers: 5 > the model's 2 layers"),
])
def test_bad_params_fail_before_training(tmp_path, tiny_bert, data, capsys, override, message):
    params = write_params(tmp_path / "params.yaml", **override)
    assert run_stage_cli(tmp_path, tiny_bert, data, params) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.json").exists()


def test_qlora_without_backend_fails_clearly(tmp_path, tiny_bert, data, capsys, monkeypatch):
    from domaintune.train import classifier as training

    monkeypatch.setattr(training, "qlora_backend_error", lambda: "bitsandbytes cannot be imported: test")
    params = write_params(tmp_path / "params.yaml", method="qlora")
    assert run_stage_cli(tmp_path, tiny_bert, data, params) == 2
    assert "qlora needs bitsandbytes 4-bit support: bitsandbytes cannot be imported: test" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_unknown_label_names_file_row_field(tmp_path, tiny_bert, capsys):
    data = make_dataset(tmp_path / "bad")
    val = pd.read_parquet(data / "validation.parquet")
    val.loc[3, "label"] = "refunds"
    val.to_parquet(data / "validation.parquet", index=False)
    assert run_stage_cli(tmp_path, tiny_bert, data, write_params(tmp_path / "p.yaml", method="head")) == 2
    assert "validation.parquet: row 3: field 'label': label 'refunds' is not in labels.json" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_qlora_refuses_unsupported_layer_shape_up_front(tmp_path, data, capsys):
    """A 32-wide model cannot run bitsandbytes' 4-bit CPU kernels on AVX512 machines: refused on every CPU,
    before training, naming the layer and the rule (not a traceback from inside bitsandbytes)."""
    import torch
    from transformers import BertConfig, BertModel

    from domaintune.modeling.encoders import load_tokenizer, resolve_model

    narrow = tmp_path / "narrow_bert"
    torch.manual_seed(0)
    tok = load_tokenizer(resolve_model("minilm"))
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(narrow)
    tok.save_pretrained(narrow)
    params = write_params(tmp_path / "params.yaml", method="qlora", device="cpu")
    assert run_stage_cli(tmp_path, narrow, data, params) == 2
    err = capsys.readouterr().err
    assert "qlora on CPU needs every quantised Linear's in_features to be a multiple of 64" in err
    assert "layer 0 'attention.self.query' has in_features 32" in err
    assert "Traceback" not in err and not (tmp_path / "model").exists()
