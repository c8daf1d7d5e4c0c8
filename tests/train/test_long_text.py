"""base.long_text end to end on a built set whose label evidence sits only after token max_length: chunks (and
head_tail, which keeps the last tokens) classify it, truncate cannot; a chunked model answers one row per
document through Predictor, `domaintune predict`'s predict_file and serve."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

MAX_LENGTH = 16  # 14 content tokens between [CLS] and [SEP]
FILLER = "the weekly report of the office says that nothing at all happened in the building this time"
EVIDENCE = {"billing": "refund", "login": "password"}


def docs(split: str, n: int, seed: int) -> pd.DataFrame:
    """Every document: the same filler (> max_length tokens), then one word that names the label; a few
    documents carry the filler twice, so documents differ in length and in their number of chunks."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = sorted(EVIDENCE)[i % 2]
        text = " ".join([FILLER] * int(rng.integers(1, 3)) + [EVIDENCE[label]])
        rows.append({"id": f"{split}-{i}", "text": text, "label": label, "split": split})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    from domaintune.core.params import BaseParams, FinetuneParams
    from domaintune.train.classifier import train_classifier

    root = tmp_path_factory.mktemp("long_text")
    train, val = docs("train", 24, 0), docs("validation", 12, 1)
    out = {}
    for mode in ("truncate", "chunks", "head_tail"):
        base = BaseParams(model=str(tiny_bert), max_length=MAX_LENGTH, long_text=mode, chunk_overlap=4, device="cpu")
        # chunks trains on each document's pooled windows (finetune.chunk_loss document): the log-mean-exp shares a
        # document's gradient among its windows at first (~1/n each), so the tiny random model takes 6 epochs
        ft = dataclasses.replace(FinetuneParams(), epochs=6 if mode == "chunks" else 4, batch_size=8, lr=1e-3,
                                 seeds=(0,), checkpoint_every=0)
        train_classifier(train, val, sorted(EVIDENCE), str(tiny_bert), base, ft, root / mode, progress=False)
        out[mode] = root / mode
    return out


def accuracy(folder, df) -> float:
    from domaintune.predict.predictor import Predictor

    return float(np.mean(np.array(Predictor.load(folder).predict(df["text"].tolist())) == df["label"].to_numpy()))


def test_evidence_after_max_length_is_found_by_chunks_and_lost_by_truncation(trained, tiny_bert):
    from domaintune.modeling.encoders import load_tokenizer

    test = docs("test", 12, 2)
    tok = load_tokenizer(str(tiny_bert))
    filler = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    assert filler > MAX_LENGTH  # the evidence lies past what truncation reads
    assert accuracy(trained["truncate"], test) <= 0.5  # every truncated input is the same: one answer for all
    assert accuracy(trained["chunks"], test) == 1.0
    assert accuracy(trained["head_tail"], test) == 1.0  # the last tokens are kept


def test_model_json_records_how_it_reads_documents(trained):
    from domaintune.core.io import read_json

    lt = read_json(trained["chunks"] / "model.json")["long_text"]
    assert lt["mode"] == "chunks" and lt["chunk_overlap"] == 4 and lt["max_chunks"] == 16
    assert lt["pooling"] in ("mean", "logsumexp", "max") and set(lt["pooling_validation_macro_f1"]) == \
        {"mean", "logsumexp", "max"}
    assert read_json(trained["truncate"] / "model.json")["long_text"]["mode"] == "truncate"


def test_predictor_answers_one_row_per_document_pooled_from_its_chunks(trained):
    from domaintune.evaluate.calibration import softmax
    from domaintune.modeling import chunks as C
    from domaintune.modeling.encoders import predict_logits
    from domaintune.predict.predictor import Predictor

    p = Predictor.load(trained["chunks"])
    texts = docs("test", 5, 3)["text"].tolist() + ["refund", ""]
    probs = p.predict_proba(texts)
    assert probs.shape == (len(texts), 2)
    enc = C.encode(p.tokenizer, texts, MAX_LENGTH, p.long_text)
    assert len(enc.doc) > len(texts)  # the long ones ran as several chunks
    per_chunk = predict_logits(p.model, p.tokenizer, texts, 4, MAX_LENGTH, long_text=p.long_text, per_input=True)[1]
    pool = {"mean": lambda z: z.mean(0), "max": lambda z: z.max(0),
            "logsumexp": lambda z: np.log(np.exp(z).mean(0))}[p.long_text.pooling]
    by_hand = [pool(per_chunk[enc.doc == d].astype(np.float64)) for d in range(len(texts))]
    np.testing.assert_allclose(p.logits(texts), np.array(by_hand), atol=1e-5)
    np.testing.assert_allclose(probs, softmax(np.array(by_hand), p.temperature), atol=1e-5)


def test_predict_file_and_serve_return_one_row_per_long_document(trained, tmp_path):
    import httpx

    from domaintune.predict import batch as bp
    from domaintune.predict.predictor import Predictor
    from domaintune.serve.app import build
    from domaintune.serve.settings import ServeSettings
    from pipelines.serve import ServerThread

    df = docs("test", 6, 4)
    src = tmp_path / "in.csv"
    df[["id", "text"]].to_csv(src, index=False)
    p = Predictor.load(trained["chunks"])
    with open(tmp_path / "out.jsonl", "w") as f:
        res = bp.predict_file(p, src, f, "jsonl", progress_stream=open("/dev/null", "w"))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert res["predicted"] == len(df) == len(rows)
    assert [r["label"] for r in rows] == df["label"].tolist()

    s = ServeSettings(model_dir=trained["chunks"], port=0, poll_s=0.2, max_wait_ms=2.0)
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/predict", json={"texts": df["text"].tolist()})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [x["label"] for x in preds] == df["label"].tolist()
    np.testing.assert_allclose([x["confidence"] for x in preds], p.predict_proba(df["text"].tolist()).max(1),
                               atol=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_window_packs_keep_documents_whole_within_the_window_budget(seed):
    """finetune.chunk_loss document: a batch of documents is cut into micro-batches of whole documents, each with
    at most `budget` windows unless one document alone has more; every document once, in order."""
    from domaintune.train.classifier import window_packs

    rng = np.random.default_rng(seed)
    windows = rng.integers(1, 12, size=40)
    docs = rng.permutation(40)[: int(rng.integers(1, 40))]
    budget = int(rng.integers(1, 20))
    packs = window_packs(docs, windows, budget)
    assert np.concatenate(packs).tolist() == docs.tolist()
    for p in packs:
        assert len(p) >= 1 and (windows[p].sum() <= budget or len(p) == 1)
    for a, b in zip(packs, packs[1:]):  # greedy: a pack closes only when the next document would not fit
        assert windows[a].sum() + windows[b[0]] > budget


def test_document_loss_is_on_each_documents_pooled_windows(tiny_bert):
    """Under chunks (chunk_loss document, the default) a training batch is documents: their windows run together,
    each document's logits are the log-mean-exp of its windows' (the predictor's logsumexp pooling) and the loss
    is the cross-entropy of those against the document labels. chunk_loss window keeps a row per window."""
    import torch

    from domaintune.core.params import BaseParams, FinetuneParams
    from domaintune.modeling import chunks as C
    from domaintune.train.classifier import FinetuneRun, collate

    train, val = docs("train", 10, 0), docs("validation", 4, 1)
    base = BaseParams(model=str(tiny_bert), max_length=MAX_LENGTH, long_text="chunks", chunk_overlap=4, device="cpu")
    ft = dataclasses.replace(FinetuneParams(), batch_size=8, seeds=(0,), checkpoint_every=0, label_smoothing=0.0,
                             head_dropout=0.0)
    run = FinetuneRun(train, val, sorted(EVIDENCE), str(tiny_bert), base, ft, seed=0, device="cpu")
    assert run.doc_level and run.doc_windows.sum() == len(run.ids) > len(train)
    assert run.steps_per_epoch == int(np.ceil(len(train) / run.batch_units))
    run.model.eval()
    idx = np.array([3, 0, 7])
    with torch.no_grad():
        loss = float(run.objective(run.model, idx))
        per_doc = []
        for d in idx:
            rows = np.flatnonzero(run.row_doc == d)
            ids, mask = collate([run.ids[i] for i in rows], run.pad_id)
            per_doc.append(run.model(input_ids=ids, attention_mask=mask).float().numpy())
    pooled = C.pool_logits(np.concatenate(per_doc), np.repeat(np.arange(len(idx)), [len(z) for z in per_doc]),
                           len(idx), "logsumexp")
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(pooled), torch.from_numpy(run.y_train[idx]))
    assert loss == pytest.approx(float(expected), rel=1e-5)
    window = FinetuneRun(train, val, sorted(EVIDENCE), str(tiny_bert), base,
                         dataclasses.replace(ft, chunk_loss="window"), seed=0, device="cpu")
    assert not window.doc_level and window.steps_per_epoch == int(np.ceil(len(window.ids) / 8))
