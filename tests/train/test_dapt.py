"""dapt stage: masking, packing, MLM head, pass-through, bad input, and the stage end to end on a tiny BERT."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.params import BaseParams, DaptParams
from domaintune.data.dataset import write_dataset
from domaintune.train import dapt as dapt_lib
from domaintune.train import mlm
from stages import dapt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core box: a second intra-op thread only adds
    # synchronisation waits (measured: 60x slower per op under load).
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tiny_bert):
    from domaintune.modeling.encoders import load_tokenizer

    return load_tokenizer(str(tiny_bert))


@pytest.fixture(scope="module")
def vocab(tok):
    return mlm.Vocab.from_tokenizer(tok)


def _frame(texts, split):
    return pd.DataFrame({"id": [f"{split}-{i}" for i in range(len(texts))], "text": texts,
                         "label": ["x"] * len(texts), "split": [split] * len(texts)})


# A tiny repetitive domain: the model can learn it in a few dozen steps.
TRAIN = [f"my card {w} was declined at the checkout again" for w in ("visa", "debit", "credit", "gold")] * 5 + \
        [f"please reset the password of my {w} account" for w in ("online", "mobile", "business", "joint")] * 5
CORPUS = [f"the refund for my {w} order never arrived" for w in ("last", "first", "big", "small", "late")] * 6
VALID = ["where is my parcel tracking number"]
TEST = ["how do I close my savings account"]


@pytest.fixture()
def dataset(tmp_path):
    folder = tmp_path / "audited"
    write_dataset(folder, {"train": _frame(TRAIN, "train"), "validation": _frame(VALID, "validation"),
                           "test": _frame(TEST, "test")}, ["x"])
    corpus = tmp_path / "unlabelled.txt"
    # distinct lines (duplicates are removed) plus one blank and one copy of a test text
    lines = [f"{t} number {i}" for i, t in enumerate(CORPUS)] + ["", TEST[0]]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, corpus


def _params(corpus, **kw):
    base = dict(corpus=(str(corpus),), block_size=24, batch_size=8, max_steps=40, lr=2e-3, warmup_ratio=0.1,
                heldout_fraction=0.2, head_warmup_steps=10, head_warmup_lr=1e-2)
    base.update(kw)
    return DaptParams(**base)


# ----------------------------------------------------------------------------- packing and masking


def test_pack_blocks_exact_size_and_nothing_lost(vocab):
    lists = [[1000 + i for i in range(n)] for n in (5, 17, 3, 40, 1)]
    ids, attn = mlm.pack_blocks(lists, 16, vocab)
    assert ids.shape[1] == 16 and attn.shape == ids.shape
    assert (ids[:, 0] == vocab.cls_id).all()
    stream = [t for ids_ in lists for t in ids_ + [vocab.sep_id]]
    assert ids.shape[0] == math.ceil(len(stream) / 15)
    # every token of every text, in order, each text closed by [SEP]
    assert ids[:, 1:][attn[:, 1:] == 1].tolist() == stream
    # only the last block is padded, with [PAD] and mask 0
    assert attn[:-1].all() and not attn[-1].all()
    assert (ids[-1][attn[-1] == 0] == vocab.pad_id).all()


def test_whole_word_masking_masks_whole_words_never_specials(tok, vocab):
    texts = ["unbelievably unaffordable cryptocurrency transactions", "hello world", "antidisestablishmentarianism"]
    lists = tok(texts * 8, add_special_tokens=False)["input_ids"]
    ids, attn = mlm.pack_blocks(lists, 64, vocab)
    assert vocab.continuation[ids].any(), "test text must contain multi-piece words"
    rng = np.random.default_rng(0)
    picked = total = 0
    replaced = kept = randomised = 0
    for _ in range(300):
        masked, labels = mlm.whole_word_mask(ids, attn, vocab, 0.15, rng)
        sel = labels != mlm.IGNORE
        assert (labels[sel] == ids[sel]).all()
        assert not vocab.special[ids[sel]].any() and (attn[sel] == 1).all()  # never [CLS]/[SEP]/[PAD]
        assert sel.any(axis=1).all()  # every block gets a masked word
        assert (masked[~sel] == ids[~sel]).all()  # untouched where not picked
        # a continuation piece is picked exactly when the piece before it is
        cont = vocab.continuation[ids[:, 1:]] & (attn[:, 1:] == 1) & ~vocab.special[ids[:, :-1]]
        assert (sel[:, 1:][cont] == sel[:, :-1][cont]).all()
        picked += sel.sum()
        total += ((attn == 1) & ~vocab.special[ids]).sum()
        replaced += (masked[sel] == vocab.mask_id).sum()
        kept += (masked[sel] == ids[sel]).sum()
        randomised += ((masked[sel] != ids[sel]) & (masked[sel] != vocab.mask_id)).sum()
    # the at-least-one-word rule lifts the rate a little above 0.15 on short blocks
    assert 0.12 < picked / total < 0.22
    assert 0.75 < replaced / picked < 0.85 and 0.06 < kept / picked < 0.14 and 0.06 < randomised / picked < 0.14


def test_mask_without_words_labels_nothing(vocab):
    ids = np.array([[vocab.cls_id, vocab.sep_id, vocab.pad_id, vocab.pad_id]])
    masked, labels = mlm.whole_word_mask(ids, np.array([[1, 1, 0, 0]]), vocab, 0.5, np.random.default_rng(0))
    assert (labels == mlm.IGNORE).all() and (masked == ids).all()


# ----------------------------------------------------------------------------- corpus


def test_build_corpus_counts_every_removed_line_and_excludes_eval_texts():
    files = {"c.txt": [(1, "a refund"), (2, ""), (3, "A  Refund"), (4, "eval text"), (5, "new text")]}
    c = mlm.build_corpus(["train one", "train one"], files, exclude_texts=["Eval text"])
    assert c.texts == ["train one", "a refund", "new text"]
    assert c.counts == {"train_texts": 2, "corpus_lines": 5, "blank": 1, "duplicate": 2, "matches_eval_text": 1,
                        "used": 3, "removed": 4}
    assert [r["source"] for r in c.removed] == ["train.parquet:row 1", "c.txt:line 2", "c.txt:line 3", "c.txt:line 4"]


def test_heldout_split_is_seeded_and_disjoint():
    a = mlm.split_heldout(50, 0.2, seed=3)
    b = mlm.split_heldout(50, 0.2, seed=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert len(a[1]) == 10 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 50


def test_corpus_file_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.txt.*not found"):
        mlm.read_corpus_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        mlm.read_corpus_file(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nbro\xffken\n")
    with pytest.raises(DataError, match=r"bad.txt: row 2: bytes that are not UTF-8 at byte offset"):
        mlm.read_corpus_file(bad)
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"one\r\ntwo\n")
    assert mlm.read_corpus_file(ok) == [(1, "one"), (2, "two")]


# ----------------------------------------------------------------------------- model


def test_mlm_head_initialised_tied_and_loss_matches_transformers(tiny_bert, tok, vocab):
    import torch

    model, source = mlm.load_mlm_model(str(tiny_bert), seed=0)
    assert source.startswith("initialised")
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight  # decoder tied to embeddings
    ids, attn = mlm.pack_blocks(tok(["a card was declined", "reset my password"], add_special_tokens=False)["input_ids"],
                                 8, vocab)
    masked, labels = mlm.whole_word_mask(ids, attn, vocab, 0.3, np.random.default_rng(1))
    model.eval()
    with torch.no_grad():
        ours = mlm.mlm_loss(model, torch.from_numpy(masked), torch.from_numpy(attn), torch.from_numpy(labels))
        ref = model(input_ids=torch.from_numpy(masked), attention_mask=torch.from_numpy(attn),
                    labels=torch.from_numpy(labels)).loss
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    # the same seed gives the same fresh head
    again, _ = mlm.load_mlm_model(str(tiny_bert), seed=0)
    assert torch.equal(again.cls.predictions.transform.dense.weight, head.transform.dense.weight)


def test_block_size_beyond_model_positions_is_a_params_error(tiny_bert):
    with pytest.raises(ParamsError, match=r"dapt.block_size: 256 exceeds the model's max_position_embeddings 128"):
        mlm.check_block_size(str(tiny_bert), 256)


# ----------------------------------------------------------------------------- the stage


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_stage_trains_loss_goes_down_and_encoder_loads(tiny_bert, dataset, tmp_path):
    import torch

    from domaintune.modeling.encoders import load_encoder, load_tokenizer

    folder, corpus = dataset
    out, metrics_path = tmp_path / "dapt", tmp_path / "metrics" / "dapt.json"
    m = dapt_lib.run(folder, out, metrics_path, BaseParams(model=str(tiny_bert), seed=7), _params(corpus))
    assert json.loads(metrics_path.read_text()) == m
    assert m["steps"] == 40 and m["tokens_seen"] > 0 and m["samples_per_s"] > 0
    assert m["loss_after"] < m["loss_before"] - 1.0, m  # it learns the domain
    # the fresh head was fitted on the frozen body first, and that alone lowers the loss
    assert m["head_warmup_steps"] == 10 and m["loss_before"] < m["loss_fresh_head"]
    assert m["perplexity_after"] == pytest.approx(math.exp(m["loss_after"]), rel=1e-3)
    assert m["heldout_texts"] > 0 and m["heldout_masked_tokens"] > 0
    # the saved body loads as a plain encoder and differs from the base
    enc = load_encoder(str(out))
    assert type(enc).__name__ == "BertModel"
    base, new = _state(tiny_bert), _state(out)
    assert set(base) <= set(new)
    assert not torch.equal(base["embeddings.word_embeddings.weight"], new["embeddings.word_embeddings.weight"])
    assert load_tokenizer(str(out))("hello")["input_ids"] == load_tokenizer(str(tiny_bert))("hello")["input_ids"]
    info = json.loads((out / mlm.INFO_FILE).read_text())
    assert info["base_model"] == str(tiny_bert) and info["params"]["max_steps"] == 40 and info["seed"] == 7
    # 32 of the 40 train texts are repeats; the blank and the copy of the test text are dropped
    assert info["corpus"]["duplicate"] == 32 and info["corpus"]["blank"] == 1
    assert info["corpus"]["matches_eval_text"] == 1 and info["corpus"]["used"] == 8 + 30
    assert (out / mlm.HEAD_FILE).is_file()

    # A second round that starts from models/dapt continues with its trained MLM head.
    model, source = mlm.load_mlm_model(str(out), seed=0)
    assert source.endswith(mlm.HEAD_FILE)
    second = dapt_lib.run(folder, tmp_path / "round2", tmp_path / "round2.json", BaseParams(model=str(out), seed=7),
                      _params(corpus, max_steps=0))
    assert second["head_warmup_steps"] == 0  # a loaded head needs no warm-up
    assert second["loss_before"] == second["loss_fresh_head"] < m["loss_before"]  # it starts where round 1 ended
    from safetensors.torch import load_file

    saved = load_file(str(out / mlm.HEAD_FILE))
    assert torch.equal(model.cls.predictions.transform.dense.weight, saved["predictions.transform.dense.weight"])
    assert torch.equal(model.cls.predictions.decoder.bias, saved["predictions.bias"])


def test_heldout_loss_is_deterministic(tiny_bert, dataset, tmp_path):
    folder, corpus = dataset
    base = BaseParams(model=str(tiny_bert), seed=5)
    a = dapt_lib.run(folder, tmp_path / "a", tmp_path / "a.json", base, _params(corpus, max_steps=0))
    b = dapt_lib.run(folder, tmp_path / "b", tmp_path / "b.json", base, _params(corpus, max_steps=3))
    assert a["loss_before"] == b["loss_before"]  # same texts, same fixed mask, same head init
    assert a["loss_after"] == a["loss_before"]  # zero steps change nothing
    other = dapt_lib.run(folder, tmp_path / "c", tmp_path / "c.json", BaseParams(model=str(tiny_bert), seed=6),
                     _params(corpus, max_steps=0))
    assert other["loss_before"] != a["loss_before"]  # the seed really drives split and mask


def test_epochs_replace_max_steps(tiny_bert, dataset, tmp_path):
    folder, corpus = dataset
    m = dapt_lib.run(folder, tmp_path / "e", tmp_path / "e.json", BaseParams(model=str(tiny_bert)),
                 _params(corpus, epochs=2, max_steps=1000))
    assert m["steps"] == 2 * math.ceil(m["train_blocks"] / 8)
    assert m["epochs"] == pytest.approx(m["steps"] * 8 / m["train_blocks"], abs=1e-3)


def test_disabled_is_a_bit_identical_pass_through(tiny_bert, dataset, tmp_path):
    import torch

    from domaintune.modeling.encoders import load_encoder

    folder, corpus = dataset
    out = tmp_path / "dapt"
    m = dapt_lib.run(folder, out, tmp_path / "m.json", BaseParams(model=str(tiny_bert)), _params(corpus, enabled=False))
    assert m == {"enabled": False, "steps": 0}
    assert (out / "model.safetensors").read_bytes() == (tiny_bert / "model.safetensors").read_bytes()
    a, b = load_encoder(str(tiny_bert)).state_dict(), load_encoder(str(out)).state_dict()
    body = [k for k in a if not k.startswith("pooler.")]  # the tiny checkpoint has no pooler: AutoModel inits one
    assert body and all(torch.equal(a[k], b[k]) for k in body)
    assert json.loads((out / mlm.INFO_FILE).read_text())["pass_through"] == "copied"


def test_cli_bad_input_exits_2_and_leaves_no_output(tiny_bert, dataset, tmp_path, capsys):
    folder, corpus = dataset
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["model"] = str(tiny_bert)
    out, metrics = tmp_path / "dapt", tmp_path / "dapt.json"
    cases = [
        ({"corpus": [str(tmp_path / "nope.txt")]}, "nope.txt: corpus file not found"),
        ({"corpus": [str(corpus)], "block_size": 512}, "dapt.block_size: 512 exceeds"),
        ({"corpus": [str(corpus)], "mlm_probability": 1.5}, "dapt.mlm_probability"),
    ]
    for override, message in cases:
        p = tmp_path / "params.yaml"
        p.write_text(yaml.safe_dump({**params, "dapt": {**params["dapt"], **override}}))
        code = dapt.main(["--params", str(p), "--in", str(folder), "--out", str(out), "--metrics", str(metrics)])
        assert code == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not metrics.exists()
        assert not list(tmp_path.glob(".dapt*"))  # no temporary leftovers either


def test_dvc_stage_matches_cli_and_lists_corpus_deps():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["dapt"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())["dapt"]
    assert stage["cmd"] == ("python -m stages.dapt --in data/audited --out models/dapt --metrics metrics/dapt.json "
                            "--checkpoints models/dapt_checkpoints --live reports/dapt/live")
    for path in params.get("corpus") or []:
        assert path in stage["deps"], f"dapt.corpus file {path} must be a dapt dep in dvc.yaml"
    DaptParams(**params)  # the shipped section parses


def test_resume_after_crash_equals_uninterrupted_and_live_curves(tiny_bert, dataset, tmp_path, monkeypatch):
    """The engine's exact resume under DAPT: crash after step 13 (checkpoints every 5), re-run, identical weights
    and metrics; DVCLive holds the MLM loss per step and held-out perplexity before, during and after."""
    from domaintune.train.engine import CRASH_ENV, TrainingCrash

    folder, corpus = dataset
    base = BaseParams(model=str(tiny_bert), seed=3)
    params = _params(corpus, max_steps=16, checkpoint_every=5)
    ref = dapt_lib.run(folder, tmp_path / "ref", tmp_path / "ref.json", base, params, live_dir=tmp_path / "live_ref",
                   checkpoint_root=tmp_path / "ck_ref", progress=False)
    ckpt = tmp_path / "ck"
    monkeypatch.setenv(CRASH_ENV, "13")
    with pytest.raises(TrainingCrash):
        dapt_lib.run(folder, tmp_path / "out", tmp_path / "m.json", base, params, checkpoint_root=ckpt, progress=False)
    monkeypatch.delenv(CRASH_ENV)
    assert not (tmp_path / "out").exists()
    saved = [d for d in ckpt.iterdir() if d.is_dir()]
    assert len(saved) == 1 and json.loads((saved[0] / "last" / "state.json").read_text())["engine"]["step"] == 10
    m = dapt_lib.run(folder, tmp_path / "out", tmp_path / "m.json", base, params, live_dir=tmp_path / "live",
                 checkpoint_root=ckpt, progress=False)
    assert [d.name for d in ckpt.iterdir()] == ["README.txt"]  # finished: its checkpoint is gone
    drop = ("samples_per_s", "train_seconds", "seconds", "head_warmup_seconds")
    assert {k: v for k, v in m.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}
    a, b = _state(tmp_path / "out"), _state(tmp_path / "ref")
    import torch

    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for live in (tmp_path / "live", tmp_path / "live_ref"):
        loss = (live / "plots" / "metrics" / "train" / "mlm_loss.tsv").read_text().splitlines()
        ppl = (live / "plots" / "metrics" / "heldout" / "perplexity.tsv").read_text().splitlines()
        assert len(loss) == 1 + 16  # header + every step, the resumed run's curve continuous
        assert [line.split("\t")[0] for line in ppl[1:]] == ["0", "5", "10", "15", "16"]
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "mlm_loss.tsv").read_text() == \
        (tmp_path / "live_ref" / "plots" / "metrics" / "train" / "mlm_loss.tsv").read_text()
    assert float(ppl[1].split("\t")[1]) == pytest.approx(m["perplexity_before"], rel=1e-3)
    assert float(ppl[-1].split("\t")[1]) == pytest.approx(m["perplexity_after"], rel=1e-3)
