"""`domaintune serve` of an export that abstains (evaluate.abstain), on a real uvicorn on 127.0.0.1: an
out-of-scope text is answered `abstained: true` with the abstention label on /predict and the KServe v2 route,
on exactly the texts Predictor abstains on."""
from __future__ import annotations

import shutil

import httpx
import pytest
from _fake_pipeline import tiny_rows
from evalkit import OOS_TEXTS, add_abstention
from test_serve import TEXTS, settings

from domaintune.serve.app import build
from pipelines.serve import ServerThread


@pytest.fixture(scope="module")
def abstaining(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("abstain") / "export"
    shutil.copytree(models[0], folder)
    rows, val = tiny_rows(8), tiny_rows(6, start=300)
    add_abstention(folder, [r[1] for r in rows], [r[2] for r in rows], [r[1] for r in val], method="mahalanobis")
    s = settings(model_dir=folder)
    with ServerThread(build(s).app, s) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield folder, client


def test_serve_answers_out_of_scope_texts_with_the_abstention_label(abstaining):
    from domaintune.predict.predictor import Predictor

    folder, client = abstaining
    texts = TEXTS[:1] + OOS_TEXTS[:2]
    p = Predictor.load(folder)
    probs, abstained = p.predict_with_abstention(texts)
    expected = p.labels_with_abstention(probs, abstained)
    assert abstained.tolist() == [False, True, True]  # the fixture's premise: the foreign texts score low
    r = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [x["abstained"] for x in preds] == [False, True, True]
    assert [x["label"] for x in preds] == expected and preds[1]["label"] == "out_of_scope"
    assert preds[1]["top_k"][0]["label"] in p.labels  # the trained labels are still listed, with probabilities
    r = client.post("/v2/models/domaintune/infer",
                    json={"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["abstained"]["data"] == [False, True, True] and out["abstained"]["datatype"] == "BOOL"
    assert out["label"]["data"] == expected
    meta = client.get("/v2/models/domaintune").json()
    assert {"name": "abstained", "datatype": "BOOL", "shape": [-1]} in meta["outputs"]
    assert meta["parameters"]["abstain_label"] == "out_of_scope"

