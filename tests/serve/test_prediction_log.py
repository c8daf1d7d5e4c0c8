"""`domaintune serve`'s prediction log on a real uvicorn on 127.0.0.1: ids returned to the client and logged with
the version and calibrated probabilities; the shadow's answers under the same ids; `domaintune feedback` then
scores both versions from that log."""
from __future__ import annotations

import csv
import json
import re

import httpx
import numpy as np
from _fake_pipeline import TINY_INTENTS
from test_serve import TEXTS, reference, settings

from domaintune.evaluate.calibration import single_label_metrics
from domaintune.serve.app import build
from pipelines.serve import ServerThread

LABELS = sorted(TINY_INTENTS)


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_prediction_is_logged_under_the_id_the_client_gets(models, tmp_path):
    a = models[0]
    log = tmp_path / "p" / "serve.jsonl"
    s = settings(model_dir=a, prediction_log=log)
    ref = reference(a, TEXTS)
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        got = c.post("/predict", json={"texts": TEXTS[:3]}).json()["predictions"]
        mine = c.post("/predict", json={"texts": TEXTS[3:], "ids": ["ticket-1", 2]}).json()["predictions"]
        v2 = c.post("/v2/models/domaintune/infer", json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}],
            "parameters": {"ids": ["k1", "k2"]}}).json()
        v2_auto = c.post("/v2/models/domaintune/infer", json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": TEXTS[:1]}]}).json()
        for body, field in (({"texts": TEXTS[:2], "ids": ["x", "x"]}, "ids[1]"),
                            ({"texts": TEXTS[:2], "ids": ["x"]}, "ids"),
                            ({"texts": TEXTS[:1], "ids": [None]}, "ids[0]")):
            r = c.post("/predict", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, r.text
    auto = [p["id"] for p in got]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in auto) and len(set(auto)) == 3
    assert [p["id"] for p in mine] == ["ticket-1", "2"]
    assert v2["parameters"]["ids"] == ["k1", "k2"] and len(v2_auto["parameters"]["ids"]) == 1
    rows = lines(log)  # the server stopped: every answer sent is logged
    assert len(rows) == 3 + 2 + 2 + 1  # the refused requests log nothing
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {*auto, "ticket-1", "2", "k1", "k2", v2_auto["parameters"]["ids"][0]}
    for i, rid in enumerate([*auto, "ticket-1", "2"]):
        r = by_id[rid]
        assert r["version"] == "workspace" and r["role"] == "served" and r["source"] == "serve"
        assert list(r["probabilities"]) == LABELS
        assert np.allclose(list(r["probabilities"].values()), ref[i], atol=1e-5)
        assert r["label"] == LABELS[ref[i].argmax()] and abs(r["confidence"] - ref[i].max()) < 1e-5
        assert "text" not in r and len(r["text_sha256"]) == 64  # the server's log_text default: hashed


def test_a_shadow_is_logged_under_the_same_ids_and_feedback_scores_both_versions(models, tmp_path):
    """serve --shadow logs each text twice under one id (served and shadow, each with its version); feedback
    labels for those ids score each version with the evaluate stage's own metrics."""
    from pipelines.cli import main

    a, b = models
    repo = tmp_path / "repo"
    log = repo / "reports" / "predictions" / "serve.jsonl"
    s = settings(model_dir=a, shadow=str(b), shadow_log=tmp_path / "shadow.jsonl", prediction_log=log,
                 log_text="plain")
    texts = [t.format(n=n) for n in range(2) for ts in TINY_INTENTS.values() for t in ts]
    truth = [lab for n in range(2) for lab, ts in TINY_INTENTS.items() for _ in ts]
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        ids = [p["id"] for i in range(0, len(texts), 5)
               for p in c.post("/predict", json={"texts": texts[i:i + 5]}).json()["predictions"]]
    rows = lines(log)
    assert len(rows) == 2 * len(texts)
    assert sorted((r["id"], r["role"], r["version"]) for r in rows) == sorted(
        [(i, "served", "workspace") for i in ids] + [(i, "shadow", "dir:b") for i in ids])
    shadow_ids = {r["id"] for r in lines(tmp_path / "shadow.jsonl")}
    assert shadow_ids == set(ids)  # the shadow log names the same ids
    fb = tmp_path / "labels.csv"
    with fb.open("w", newline="") as fh:
        csv.writer(fh).writerows([("id", "label"), *zip(ids, truth)])
    assert main(["feedback", str(fb), "--repo", str(repo)]) == 0
    got = json.loads((repo / "metrics" / "feedback.json").read_text())["versions"]
    y = np.array([LABELS.index(t) for t in truth])
    for version, folder in (("workspace", a), ("dir:b", b)):
        want = single_label_metrics(reference(folder, texts), y, len(LABELS))
        assert got[version]["rows"] == len(texts)
        for k in ("accuracy", "macro_f1", "ece"):
            assert abs(got[version][k] - want[k]) < 1e-4, (version, k)
    assert got["workspace"]["accuracy"] != got["dir:b"]["accuracy"]
    # the log stored the texts (log_text plain): every labelled row joins the feedback source
    with (repo / "labels" / "feedback" / "feedback.csv").open(newline="") as fh:
        assert [tuple(r.values()) for r in csv.DictReader(fh)] == list(zip(ids, texts, truth))


def test_serve_auto_runs_the_recorded_fastest_variant_and_names_it(models, tmp_path, caplog):
    """The default --variant auto: on an export whose recorded speeds make onnx the fastest passing variant, the
    server loads onnx, and /version, /v2/health/ready, the model metadata and every prediction log line name it;
    an export without speeds (model a's folder as finetune writes it) runs float32, said in one notice.
    Before: serve always loaded float32 unless told otherwise."""
    import shutil

    from domaintune.core.io import read_json, write_json
    from domaintune.export import artifacts
    from domaintune.modeling.encoders import load_classifier
    from domaintune.predict.predictor import Predictor

    folder = tmp_path / "export"
    shutil.copytree(models[0], folder)
    model, tok, meta = load_classifier(folder)
    artifacts.write_onnx(folder, model, tok, read_json(folder / "model.json"))
    write_json(folder / "export_report.json", {"speed": {"variants": {
        "float32": {"texts_per_s": 100.0, "passed_gates": True},
        "onnx": {"texts_per_s": 300.0, "passed_gates": True}}}})
    log = tmp_path / "serve.jsonl"
    s = settings(model_dir=folder, prediction_log=log)
    assert s.variant == "auto"  # the default
    ref = Predictor.load(folder, variant="onnx").predict_proba(TEXTS)
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        v = c.get("/version").json()
        assert v["variant"] == "onnx"
        assert v["variant_choice"] == "onnx (auto: fastest passing, 300 texts/s measured at export)"
        assert c.get("/v2/health/ready").json()["variant"] == "onnx"
        assert c.get("/v2/models/domaintune").json()["platform"] == "onnxruntime"
        got = c.post("/predict", json={"texts": TEXTS}).json()["predictions"]
    assert np.allclose([p["confidence"] for p in got], ref.max(1), atol=1e-5)
    assert [r["variant"] for r in lines(log)] == ["onnx"] * len(TEXTS)
    with caplog.at_level("WARNING", logger="domaintune"):
        s = settings(model_dir=models[0])
        with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
            v = c.get("/version").json()
    assert v["variant"] == "float32" and v["variant_choice"] == "float32 (auto: no speeds recorded in the export)"
    assert sum("no variant speeds recorded" in r.getMessage() for r in caplog.records) == 1
