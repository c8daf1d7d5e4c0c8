"""Little data and continual retraining through the finetune stage's command line (tiny random BERT):
finetune.method setfit, finetune.augment, finetune.init (warm start), finetune.regularize, finetune.replay."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from test_finetune import make_rows, run_stage_cli, write_params

from domaintune.core.io import read_json
from domaintune.data.dataset import read_dataset, write_dataset
from domaintune.train import augment, regularize, warmstart


def dataset(folder: Path, splits: dict) -> Path:
    write_dataset(folder, splits, sorted(set(splits["train"]["label"])))
    return folder


@pytest.fixture(scope="module")
def v1_data(tmp_path_factory):
    """Three labels, 8 train rows each."""
    return dataset(tmp_path_factory.mktemp("v1") / "audited",
                   {"train": make_rows(8, "train", 1), "validation": make_rows(3, "validation", 2),
                    "test": make_rows(3, "test", 3)})


def relabel(df: pd.DataFrame, old: str, new: str, tag: str) -> pd.DataFrame:
    df = df.copy()
    hit = df["label"] == old
    df.loc[hit, "label"] = new
    df.loc[hit, "id"] = df.loc[hit, "id"].str.replace(old, new) + tag
    return df


@pytest.fixture(scope="module")
def v2_data(tmp_path_factory):
    """New rows: "shipping" is gone, "delivery" (new ids) is new; billing/login rows are new ids too."""
    def part(n, split, seed):
        df = relabel(make_rows(n, split, seed), "shipping", "delivery", "-v2")
        df["id"] = df["id"] + "-new"
        return df
    return dataset(tmp_path_factory.mktemp("v2") / "audited",
                   {"train": part(8, "train", 11), "validation": part(3, "validation", 12),
                    "test": part(3, "test", 13)})


@pytest.fixture(scope="module")
def v1_model(tmp_path_factory, tiny_bert, v1_data):
    """A version's classifier: full fine-tune, 1 epoch."""
    tmp = tmp_path_factory.mktemp("v1model")
    params = write_params(tmp / "params.yaml", epochs=1)
    assert run_stage_cli(tmp, tiny_bert, v1_data, params) == 0
    return tmp / "model"


def stage_run(tmp_path, tiny_bert, data, params, extra=()):
    return run_stage_cli(tmp_path, tiny_bert, data, params,
                         extra=("--extra-rows", str(tmp_path / "extra.parquet"), *extra))


# ---------------------------------------------------------------- setfit

def test_setfit_stage_tunes_encoder_on_pairs_then_head(tmp_path, tiny_bert, v1_data):
    """method setfit: the encoder moves in the contrastive phase (2 x iterations x rows pairs), then the head is
    fitted on it; the output is an ordinary classifier folder (model.json method setfit)."""
    from safetensors.torch import load_file

    from domaintune.modeling.encoders import load_classifier, predict_logits

    params = write_params(tmp_path / "params.yaml", method="setfit", setfit_iterations=2, setfit_batch_size=8,
                          setfit_lr=1e-3, epochs=1, lr=1e-2)
    assert stage_run(tmp_path, tiny_bert, v1_data, params) == 0
    m = read_json(tmp_path / "model.json")
    assert m["method"] == "setfit"
    assert m["setfit"]["pairs"] == 2 * 2 * 24 and m["setfit"]["positive_pairs"] == 2 * 24
    assert m["setfit"]["steps"] == 12 and m["trainable_params"] == 64 * 3 + 3  # phase 2: the head alone
    before = load_file(str(tiny_bert / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "encoder" / "model.safetensors"))
    moved = [k for k in before if k in after and not np.allclose(before[k].numpy(), after[k].numpy())]
    assert moved, "the contrastive phase changed no encoder weight"
    model, tok, meta = load_classifier(tmp_path / "model")
    assert meta["method"] == "setfit" and meta["labels"] == ["billing", "login", "shipping"]
    assert predict_logits(model, tok, ["refund my invoice"], max_length=32).shape == (1, 3)


def test_setfit_pairs_are_seeded_and_balanced():
    y = np.array([0, 0, 0, 1, 1, 2])
    a, b = augment_free_pairs(y, 7), augment_free_pairs(y, 7)
    assert np.array_equal(a, b) and not np.array_equal(a, augment_free_pairs(y, 8))
    assert all((y[i] == y[j]) == bool(t) for i, j, t in a)
    assert len(a) == 2 * 3 * len(y) and a[:, 2].sum() == 3 * len(y)


def augment_free_pairs(y, seed):
    from domaintune.train.setfit import contrastive_pairs

    return contrastive_pairs(y, 3, seed)


# ---------------------------------------------------------------- augmentation

SYNONYMS = "refund repayment reimbursement\npassword passcode, passphrase\nparcel package  # a comment\n"


def test_eda_is_deterministic_per_seed_and_traceable(tmp_path, v1_data):
    (tmp_path / "syn.txt").write_text(SYNONYMS)
    train = read_dataset(v1_data)[0]["train"]
    aug = {"copies": 4, "swap": 0.2, "insert": 0.2, "delete": 0.2, "synonym": 0.3,
           "synonyms": str(tmp_path / "syn.txt"), "back_translation": []}
    a, b, c = (augment.augment_rows(train, aug, s) for s in (0, 0, 1))
    pd.testing.assert_frame_equal(a, b)
    assert not a["text"].equals(c["text"])
    assert set(a["source_id"]) <= set(train["id"]) and a["id"].is_unique
    src = train.set_index("id")
    assert (a["label"].to_numpy() == src.loc[a["source_id"], "label"].to_numpy()).all()
    assert set(a["origin"]) == {"eda:swap", "eda:insert", "eda:delete", "eda:synonym"}
    syn = a[a["origin"] == "eda:synonym"]
    assert syn["text"].str.contains("repayment|reimbursement|passcode|passphrase|package").all()
    # a row's augmentations depend on its id and the seed only, not on the other rows
    one = augment.augment_rows(train.iloc[[5]], aug, 0)
    pd.testing.assert_frame_equal(one, a[a["source_id"] == train["id"].iloc[5]].reset_index(drop=True))


def test_back_translation_code_path_with_tiny_random_marian(tmp_path):
    """Code path only: two tiny random Marian models (built here, no hub) with the bundled tokenizer; the text
    they produce is noise."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    from domaintune.modeling.encoders import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("minilm"))
    for name in ("fwd", "bwd"):
        torch.manual_seed(len(name) + ord(name[0]))
        cfg = MarianConfig(vocab_size=tok.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.cls_token_id,
                           forced_eos_token_id=tok.sep_token_id)
        MarianMTModel(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    train = pd.DataFrame({"id": ["a", "b"], "text": ["refund my bill", "reset my password"], "label": ["x", "y"]})
    aug = {"copies": 0, "swap": 0, "insert": 0, "delete": 0, "synonym": 0, "synonyms": "",
           "back_translation": [str(tmp_path / "fwd"), str(tmp_path / "bwd")]}
    out = augment.augment_rows(train, aug, 0, max_length=8)
    assert set(out["origin"]) <= {"back_translation"} and set(out["source_id"]) <= {"a", "b"}
    assert (out["text"] != train.set_index("id").loc[out["source_id"], "text"].to_numpy()).all()
    pd.testing.assert_frame_equal(out, augment.augment_rows(train, aug, 0, max_length=8))


# ---------------------------------------------------------------- warm start, EWC, replay, augment (one run)

def fake_materialise(monkeypatch, folders: dict):
    """The registry's materialise, answering from local folders; records its calls."""
    import stages.finetune as stage

    calls = []

    def materialise(root, name=None, out="models/export", **_):
        calls.append((name, out))
        return SimpleNamespace(path=folders[out], tag=f"domaintune@{name or 'v1.0.0'}",
                               version=SimpleNamespace(version=name or "v1.0.0"))
    monkeypatch.setattr(stage.release, "materialise", materialise)
    return calls


def test_warm_start_ewc_replay_augment_through_the_stage(tmp_path, tiny_bert, v1_data, v2_data, v1_model,
                                                         monkeypatch):
    """finetune.init v1.0.0: the stage main materialises the version's export and data (the registry, faked
    here), the run starts from its weights (kept labels' head rows), drops the vanished label with a note,
    adds the new one, mixes in exactly the recorded replay rows, augments train only, and records it all."""
    from domaintune.modeling.encoders import load_classifier

    calls = fake_materialise(monkeypatch, {"models/export": v1_model, "data/audited": v1_data})
    params = write_params(tmp_path / "params.yaml", epochs=1, init="v1.0.0", regularize="ewc",
                          regularize_strength=1.0, ewc_rows=8, replay=0.5,
                          augment={"copies": 1, "swap": 0.2, "delete": 0.2})
    assert stage_run(tmp_path, tiny_bert, v2_data, params) == 0
    assert calls == [("v1.0.0", "models/export"), ("v1.0.0", "data/audited")]
    m = read_json(tmp_path / "model.json")
    ws = m["warm_start"]
    assert ws["version"] == "v1.0.0" and ws["labels_dropped"] == ["shipping"] and ws["labels_new"] == ["delivery"]
    assert ws["labels_kept"] == 2
    assert m["regularize"]["kind"] == "ewc" and m["regularize"]["strength"] == 1.0
    extra = pd.read_parquet(tmp_path / "extra.parquet")
    v1_train, v2 = read_dataset(v1_data)[0]["train"], read_dataset(v2_data)[0]
    # replay: round(0.5 x 24) = 12 drawn by base.seed from v1's rows whose label is still there
    replay = extra[extra["origin"] == "replay:v1.0.0"]
    usable = v1_train[v1_train["label"] != "shipping"]
    expected = warmstart.sample(usable, 12, 0)
    assert list(replay["source_id"]) == list(expected["id"]) and list(replay["text"]) == list(expected["text"])
    # augmentation: train rows only, never validation or test
    aug = extra[extra["origin"].str.startswith("eda:")]
    assert len(aug) > 0 and set(aug["source_id"]) <= set(v2["train"]["id"])
    assert not set(extra["source_id"]) & (set(v2["validation"]["id"]) | set(v2["test"]["id"]))
    assert m["train_rows"] == {"dataset": 24, "extra": len(extra), "total": 24 + len(extra)}
    assert m["extra_rows"]["replay"]["rows"] == 12 and m["extra_rows"]["augmented"] == len(aug)
    _, _, meta = load_classifier(tmp_path / "model")
    assert meta["warm_start"]["version"] == "v1.0.0" and meta["extra_rows"]["sha256"] == m["extra_rows"]["sha256"]
    assert meta["labels"] == ["billing", "delivery", "login"]


def test_map_head_keeps_old_rows_and_fresh_rows_for_new_labels(tiny_bert):
    import torch

    from domaintune.modeling.encoders import build_classifier, load_encoder

    model = build_classifier(load_encoder(str(tiny_bert)), 3)
    fresh = model.head.weight.detach().clone()
    old = {"weight": torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64), "bias": torch.tensor([7.0, 8.0])}
    changes = warmstart.map_head(model, ["a", "c", "new"], ["c", "gone"], old)
    assert changes == {"labels_kept": 1, "labels_new": ["a", "new"], "labels_dropped": ["gone"]}
    assert torch.equal(model.head.weight[1], old["weight"][0]) and float(model.head.bias[1].detach()) == 7.0
    assert torch.equal(model.head.weight[0], fresh[0]) and torch.equal(model.head.weight[2], fresh[2])


def test_warm_start_refuses_a_version_with_another_encoder_shape(tmp_path, tiny_bert, v2_data, capsys):
    other = tmp_path / "v0" / "encoder"
    other.mkdir(parents=True)
    cfg = json.loads((tiny_bert / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32, intermediate_size=64)))
    (other.parent / "model.json").write_text(json.dumps({"labels": ["billing"], "problem_type": "single_label"}))
    params = write_params(tmp_path / "params.yaml", epochs=1, init="v0.9.0")
    rc = stage_run(tmp_path, tiny_bert, v2_data, params,
                   extra=("--init-model", str(other.parent), "--init-version", "v0.9.0"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "finetune.init v0.9.0: its encoder differs" in err[0] and "hidden_size 32 vs 64" in err[0]
    assert not (tmp_path / "model").exists() and not (tmp_path / "extra.parquet").exists()


# ---------------------------------------------------------------- the penalties

def test_ewc_and_l2sp_penalties_are_zero_at_the_start_and_grow_as_weights_move(tiny_bert):
    import torch

    from domaintune.modeling.encoders import build_classifier, load_encoder, load_tokenizer

    torch.manual_seed(0)
    model = build_classifier(load_encoder(str(tiny_bert)), 2)
    tok = load_tokenizer(str(tiny_bert))
    names = list(regularize.encoder_params(model))
    fisher = regularize.diagonal_fisher(model, tok, ["refund my bill", "reset password", "parcel late"] * 2,
                                        np.array([0, 1, 0, 1, 0, 1]), names, batch_size=2, max_length=16)
    assert set(fisher) == set(names)
    assert np.isclose(sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values()), 1.0)
    assert all(not p.grad is not None for p in model.parameters())  # the Fisher left no gradients behind
    for kind, f in (("ewc", fisher), ("l2sp", None)):
        pen = regularize.Penalty(kind, 0.5, regularize.encoder_params(model), f)
        assert float(pen()) == 0.0
        direction = {n: torch.randn_like(p) for n, p in pen.params.items()}
        values = []
        for step in (1e-3, 2e-3, 4e-3):
            with torch.no_grad():
                for n, p in pen.params.items():
                    p.copy_(pen.start[n] + step * direction[n])
            values.append(float(pen()))
        assert 0 < values[0] < values[1] < values[2]
        assert values[1] / values[0] == pytest.approx(4.0, rel=1e-3)  # quadratic in the distance moved
        with torch.no_grad():
            for n, p in pen.params.items():
                p.copy_(pen.start[n])
    pen = regularize.Penalty("ewc", 0.5, regularize.encoder_params(model), fisher)
    pen().backward()  # differentiable: it is added to the training loss
