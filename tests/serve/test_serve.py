"""`domaintune serve` on a real uvicorn on 127.0.0.1 with a tiny classifier: every endpoint, limits and bad
input, micro-batching, shadow mode, the CLI, and hot-swap on rollback under load on a small registry repo."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from _fake_pipeline import BIN, TINY_INTENTS, make_fake_repo, set_params, sh, tiny_rows
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from domaintune.registry import cache, plumbing, release, rollback, versions
from domaintune.serve.app import build
from domaintune.serve.settings import ServeSettings
from pipelines.serve import ServerThread

TEXTS = ["I want my money back for order 7", "reset my password please", "where is my parcel 12",
         "refund request for invoice 9", "package 3 has not arrived yet"]


def train_tiny_classifier(tiny_bert: Path, out: Path, temperature: float, noise: float = 0.0, seed: int = 0) -> Path:
    """A tiny classifier: the tiny random BERT with a logistic-regression head fitted on its embeddings of
    the tiny intents, saved as finetune does, with a temperature in model.json as export writes it."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from domaintune.core.io import read_json, write_json
    from domaintune.modeling.encoders import (
        build_classifier,
        embed_texts,
        load_encoder,
        load_tokenizer,
        save_classifier,
    )

    rows = tiny_rows(8)
    labels = sorted(TINY_INTENTS)
    enc, tok = load_encoder(str(tiny_bert)), load_tokenizer(str(tiny_bert))
    x = embed_texts(enc, tok, [r[1] for r in rows], max_length=32)
    head = LogisticRegression(C=100.0, max_iter=5000).fit(x, [labels.index(r[2]) for r in rows])
    model = build_classifier(enc, len(labels), "mean", 0.0)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(head.coef_ + noise * rng.normal(size=head.coef_.shape)))
        model.head.bias.copy_(torch.tensor(head.intercept_))
    meta = {"labels": labels, "pooling": "mean", "problem_type": "single_label", "method": "full",
            "max_length": 32, "dataset_hash": "tiny", "params": {}}
    save_classifier(model, tok, out, meta)
    write_json(out / "model.json", {**read_json(out / "model.json"), "temperature": temperature})
    return out


def reference(folder: Path, texts: list[str]) -> np.ndarray:
    from domaintune.predict.predictor import Predictor

    return Predictor.load(folder).predict_proba(texts)


def settings(**kw) -> ServeSettings:
    return ServeSettings(**{"port": 0, "poll_s": 0.2, "max_wait_ms": 2.0, **kw})


@pytest.fixture(scope="module")
def server(models):
    """One server on the folder of model a, small limits so they are cheap to hit."""
    s = settings(model_dir=models[0], max_texts=8, max_chars=2000, max_body_bytes=20_000, max_wait_ms=30.0,
                 infer_batch=3)  # batches run in length-sorted passes of 3: answers must come back in order
    with ServerThread(build(s).app, s) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_health_metadata_version(server, models):
    assert server.get("/v2/health/live").json() == {"live": True}
    r = server.get("/v2/health/ready")
    assert r.status_code == 200 and r.json()["ready"] and r.json()["last_error"] is None
    assert r.headers["X-Model-Version"] == "workspace"
    meta = server.get("/v2/models/domaintune").json()
    assert meta["name"] == "domaintune" and meta["versions"] == ["workspace"] and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["parameters"]["labels"] == sorted(TINY_INTENTS)
    assert server.get("/v2/models/domaintune/ready").json()["ready"] is True
    r = server.get("/v2/models/other")
    assert r.status_code == 404 and "no model 'other'" in r.json()["error"]
    v = server.get("/version").json()
    assert v["version"] == "workspace" and v["variant"] == "float32" and v["path"] == str(models[0])
    # --model: what the export says of itself (its model.json), marked unversioned
    assert v["dataset_hash"] == "tiny" and v["versioned"] is False and v["tag"] is None and v["shadow"] is None
    assert server.get("/nowhere").status_code == 404


def test_infer_and_predict_equal_the_predictor(server, models):
    ref = reference(models[0], TEXTS)
    labels = sorted(TINY_INTENTS)
    r = server.post("/v2/models/domaintune/infer",
                    json={"id": "r1", "inputs": [{"name": "text", "shape": [5], "datatype": "BYTES", "data": TEXTS}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "domaintune" and body["model_version"] == "workspace" and body["id"] == "r1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"]["data"] == [labels[i] for i in ref.argmax(1)] and out["label"]["shape"] == [5]
    assert np.allclose(out["confidence"]["data"], ref.max(1), atol=1e-5)
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (5, 3) and np.allclose(probs, ref, atol=1e-5)
    assert out["probabilities"]["parameters"]["labels"] == labels
    assert len(set(out["label"]["data"])) > 1  # the head was trained: not one constant answer
    # nested [n, 1] data and a subset of outputs
    r = server.post("/v2/models/domaintune/infer", json={
        "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [[TEXTS[0]], [TEXTS[1]]]}],
        "outputs": [{"name": "confidence"}]})
    assert [o["name"] for o in r.json()["outputs"]] == ["confidence"]
    r = server.post("/predict", json={"texts": TEXTS, "top_k": 2})
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "workspace"
    preds = r.json()["predictions"]
    for p, row in zip(preds, ref):
        assert p["label"] == labels[row.argmax()] and abs(p["confidence"] - row.max()) < 1e-5
        assert [t["label"] for t in p["top_k"]] == [labels[j] for j in np.argsort(-row)[:2]]
        # one vocabulary: the calibrated score is `confidence` over HTTP as in `domaintune predict`'s rows
        from domaintune.predict.batch import CLASSIFIER_COLUMNS

        assert set(p) == set(CLASSIFIER_COLUMNS) - {"text"}  # and the id, as in predict's rows
        assert all(set(t) == {"label", "confidence"} and abs(t["confidence"] - row[labels.index(t["label"])]) < 1e-5
                   for t in p["top_k"])
    assert len(server.post("/predict", json={"texts": ["x"]}).json()["predictions"][0]["top_k"]) == 3


BAD = [  # (path, raw body or json, status, words in the error)
    ("/predict", b"{not json", 422, "malformed JSON"),
    ("/predict", b"", 422, "empty request body"),
    ("/predict", b"\xff\xfe\x00", 422, "not UTF-8"),
    ("/predict", b"[" * 20_000 + b"]" * 20_000, 413, "over the limit"),
    ("/predict", b"[" * 5000 + b"]" * 5000, 422, "nested too deeply"),
    ("/predict", [], 422, "expected a JSON object"),
    ("/predict", {"text": ["a"]}, 422, "unknown field"),
    ("/predict", {}, 422, "missing field"),
    ("/predict", {"texts": []}, 422, "empty list"),
    ("/predict", {"texts": "one text"}, 422, "expected a list of strings"),
    ("/predict", {"texts": ["ok", 3]}, 422, "expected a string, got int"),
    ("/predict", {"texts": ["ok", None]}, 422, "expected a string, got NoneType"),
    ("/predict", {"texts": ["a"] * 9}, 413, "9 texts, the limit is 8"),
    ("/predict", {"texts": ["a", "b" * 2001]}, 413, "2001 characters"),
    ("/predict", {"texts": ["a"], "top_k": 0}, 422, "positive integer"),
    ("/predict", {"texts": ["a"], "top_k": True}, 422, "positive integer"),
    ("/predict", {"texts": ["é" * 1900] * 8}, 413, "over the limit"),  # chars within limits, bytes not
    ("/v2/models/domaintune/infer", {"inputs": []}, 422, "exactly one input"),
    ("/v2/models/domaintune/infer", {"inputs": [{"datatype": "FP32", "shape": [1], "data": [1.0]}]}, 422, "BYTES"),
    ("/v2/models/domaintune/infer", {"inputs": [{"datatype": "BYTES", "shape": [3], "data": ["a"]}]}, 422, "shape"),
    ("/v2/models/domaintune/infer", {"inputs": [{"datatype": "BYTES", "shape": [0], "data": []}]}, 422, "empty"),
    ("/v2/models/domaintune/infer", {"inputs": [{"datatype": "BYTES", "shape": [1], "data": [{"t": 1}]}]}, 422,
     "expected a string"),
    ("/v2/models/domaintune/infer", {"inputs": [{"datatype": "BYTES", "shape": [1], "data": ["a"]}],
                                     "outputs": [{"name": "logits"}]}, 422, "requested output"),
    ("/v2/models/domaintune/infer", "just a string", 422, "expected a JSON object"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_json_4xx(server, path, body, status, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = server.post(path, headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
        st.sampled_from(["texts", "top_k", "inputs", "outputs", "datatype", "shape", "data", "id"]) | st.text(max_size=6),
        inner, max_size=5),
    max_leaves=25)


@given(body=JSON)
@hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_json_body_gets_an_answer_below_500(server, body):
    for path in ("/predict", "/v2/models/domaintune/infer"):
        r = server.post(path, json=body)
        assert r.status_code in (200, 413, 422), (path, body, r.text)
        assert r.status_code == 200 or "error" in r.json()


def test_limits_hold_without_content_length_and_server_survives(server):
    def chunks():  # chunked transfer: the body limit is enforced while reading, not from the header
        yield b'{"texts": ["'
        for _ in range(30):
            yield b"a" * 1000
        yield b'"]}'

    r = server.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert server.post("/predict", json={"texts": ["still fine"]}).status_code == 200
    text = server.get("/metrics").text
    assert metric(text, "domaintune_rejected_requests_total", '{reason="413"}') >= 1
    assert "domaintune_requests_total" in text and 'status="500"' not in text


def test_concurrent_requests_are_batched(server, models):
    """16 clients at once: the micro-batcher (30 ms window here) puts several requests in one model pass."""
    before = server.get("/metrics").text
    n_batches0 = metric(before, "domaintune_batch_requests_count")
    single0 = metric(before, "domaintune_batch_requests_bucket", '{le="1.0"}')
    texts = [f"where is my parcel {i}" for i in range(16)]
    results, start = {}, threading.Barrier(16)

    def client(i):
        with httpx.Client(base_url=str(server.base_url), timeout=30) as c:
            start.wait()
            results[i] = c.post("/predict", json={"texts": [texts[i]]})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values())
    ref = reference(models[0], texts)
    for i, r in results.items():
        assert abs(r.json()["predictions"][0]["confidence"] - ref[i].max()) < 1e-5  # each got its own answer
    after = server.get("/metrics").text
    batches = metric(after, "domaintune_batch_requests_count") - n_batches0
    single = metric(after, "domaintune_batch_requests_bucket", '{le="1.0"}') - single0
    assert batches < 16 and single < batches, f"{batches} batches for 16 requests, {single} of one request"
    assert metric(after, "domaintune_batch_requests_sum") - metric(before, "domaintune_batch_requests_sum") == 16


def test_serve_batches_by_a_token_budget_and_answers_in_request_order(models):
    """--infer-batch 4 --max-batch-tokens 24: the served predictor cuts each batch by the budget (texts of up to
    32 tokens run alone), and the answers come back in request order, equal to a plain Predictor's."""
    from pipelines.cli import build_parser
    from pipelines.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--model", str(models[0]), "--infer-batch", "4",
                                      "--max-batch-tokens", "24"])
    s = settings_from_args(args)
    assert (s.infer_batch, s.max_batch_tokens) == (4, 24)
    with pytest.raises(ValueError, match="max_batch_tokens=0"):
        ServeSettings(max_batch_tokens=0)
    built = build(settings(model_dir=models[0], infer_batch=4, max_batch_tokens=24, max_wait_ms=20.0))
    pred = built.holder.current.predictor
    assert (pred.batch_size, pred.max_batch_tokens) == (4, 24)
    shapes = []
    pred.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                         with_kwargs=True)
    texts = [TEXTS[4], "x " * 200, TEXTS[1], "ok", " ".join(TEXTS), TEXTS[0], "", TEXTS[2]]
    with ServerThread(built.app, settings(model_dir=models[0])) as url:
        r = httpx.post(url + "/predict", json={"texts": texts, "top_k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    ref = reference(models[0], texts)
    got = [{p["label"]: p["confidence"] for p in row["top_k"]} for row in r.json()["predictions"]]
    labels = sorted(TINY_INTENTS)
    for row, want in zip(got, ref):
        assert all(abs(row[labels[j]] - want[j]) < 1e-5 for j in range(len(labels)))
    assert all(n <= 4 and (n * width <= 24 or n == 1) for n, width in shapes), shapes
    assert (1, 32) in shapes and sum(n for n, _ in shapes) == len(texts)


def test_shadow_answers_with_served_and_logs_both(models, tmp_path):
    a, b = models
    log_path = tmp_path / "shadow.jsonl"
    s = settings(model_dir=a, shadow=str(b), shadow_log=log_path, log_text="plain")
    texts = [t.format(n=n) for n in range(3) for ts in TINY_INTENTS.values() for t in ts]
    ref_a, ref_b = reference(a, texts), reference(b, texts)
    labels = sorted(TINY_INTENTS)
    assert (ref_a.argmax(1) != ref_b.argmax(1)).any() and (ref_a.argmax(1) == ref_b.argmax(1)).any()
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/version").json()["shadow"]["version"] == "dir:b"
        got = []
        for i in range(0, len(texts), 4):
            r = c.post("/predict", json={"texts": texts[i:i + 4]})
            assert r.headers["X-Model-Version"] == "workspace"
            got += r.json()["predictions"]
    # the server stopped: every shadow batch taken was written
    assert [p["label"] for p in got] == [labels[i] for i in ref_a.argmax(1)]
    assert np.allclose([p["confidence"] for p in got], ref_a.max(1), atol=1e-5)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert sorted(r["text"] for r in rows) == sorted(texts)
    by_text = {r["text"]: r for r in rows}
    for i, t in enumerate(texts):
        row = by_text[t]
        assert row["served"]["version"] == "workspace" and row["shadow"]["version"] == "dir:b"
        assert row["served"]["label"] == labels[ref_a[i].argmax()] and row["shadow"]["label"] == labels[ref_b[i].argmax()]
        assert abs(row["shadow"]["confidence"] - ref_b[i].max()) < 1e-5
        assert row["agree"] == (row["served"]["label"] == row["shadow"]["label"])
    disagree = int((ref_a.argmax(1) != ref_b.argmax(1)).sum())
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "shadow-report", str(log_path), "--json"],
                       capture_output=True, text=True, env=os.environ)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["rows"] == len(texts) and rep["disagreements"] == disagree
    assert rep["agreement"] == round(1 - disagree / len(texts), 4)
    assert sum(c["disagreements"] for c in rep["per_class"]) == 2 * disagree  # each one involves two classes
    mism = ref_a.argmax(1) != ref_b.argmax(1)
    assert rep["confidence_on_disagreements"]["shadow"]["mean"] == round(float(ref_b.max(1)[mism].mean()), 4)
    text = subprocess.run([sys.executable, "-m", "pipelines.cli", "shadow-report", str(log_path)],
                          capture_output=True, text=True, env=os.environ).stdout
    assert f"{disagree} disagreements" in text and "per class" in text


def test_shadow_report_bad_log(tmp_path):
    log_path = tmp_path / "bad.jsonl"
    good = {"served": {"label": "a", "confidence": 0.9}, "shadow": {"label": "b", "confidence": 0.6}}
    log_path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "shadow": {"label": "b"}}) + "\n")
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "shadow-report", str(log_path)],
                       capture_output=True, text=True, env=os.environ)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"domaintune shadow-report: {log_path}: row 2: field 'shadow.confidence': must be a number in [0, 1], got None"]


def test_serve_help_is_light():
    code = ("import sys, pipelines.cli as c\n"
            "for argv in (['serve', '--help'], ['shadow-report', '--help']):\n"
            "    try: c.main(argv)\n"
            "    except SystemExit: pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi', 'uvicorn', 'numpy', 'dvc'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "--max-wait-ms" in proc.stdout and "--shadow" in proc.stdout and "shadow-report" in proc.stdout


def test_cli_serve_refuses_clearly(tmp_path, capsys):
    from pipelines.cli import main

    sh(tmp_path, "git", "init", "-q")
    assert main(["serve", "--repo", str(tmp_path), "--port", "0"]) == 2  # every CLI error is exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"domaintune serve: error: {tmp_path}: no version is served")
    assert main(["serve", "--repo", str(tmp_path), "--max-batch", "0", "--max-wait-ms", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "domaintune serve: serve settings: invalid max_batch=0, max_wait_ms=-1.0"
    (tmp_path / "notamodel").mkdir()
    assert main(["serve", "--model", str(tmp_path / "notamodel")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("domaintune serve: cannot load the model:") and "model.json" in err[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_binds_loopback_and_stops(models, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=os.environ)
    assert r.returncode == 2 and r.stderr.strip() == f"domaintune serve: --model {tmp_path / 'nope'}: no such folder"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", str(models[0]),
                             "--port", str(port), "--repo", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"texts": ["reset my password"]}, timeout=30)
        assert r.status_code == 200 and r.headers["X-Model-Version"] == "workspace"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    # every prediction is logged by default, under --repo, with the id the client got
    logged = (tmp_path / "reports" / "predictions" / "serve.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in logged] == [r.json()["predictions"][0]["id"]]
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says how it ended
    assert proc.returncode in (0, -15), out
    assert f"Uvicorn running on http://127.0.0.1:{port}" in out and "Application shutdown complete" in out


# ----------------------------------------------------------------------------- following the registry

@pytest.fixture(scope="module")
def registry_repo(models, tmp_path_factory):
    """A fake git + DVC + GTO repo whose export is the tiny classifier: v1.0.0 (T=1), v1.1.0 (T=5/3),
    v1.2.0 (T=7/3), then rolled back so v1.1.0 is served and v1.2.0 was never materialised."""
    root = make_fake_repo(tmp_path_factory.mktemp("serve_reg") / "proj", classifier=models[0])
    for epochs in (3, 5, 7):
        set_params(root, {"finetune.epochs": epochs})
        sh(root, str(BIN / "dvc"), "repro", "-q")
        versions.publish(root, f"epochs {epochs}", stage="prod")
    rollback.rollback(root, "v1.1.0")
    assert versions.served_version(root) == "v1.1.0"
    return root


def _cache_object(root: Path, version: str, relpath: str) -> Path:
    v = versions.get_version(root, version)
    folder = cache.cache_dir(root)
    out = next(o for o in plumbing.lock_outs(root, v.commit) if o.path == "models/export")
    entries = json.loads(cache.cache_path(folder, out.md5).read_text())
    return cache.cache_path(folder, next(e["md5"] for e in entries if e["relpath"] == relpath))


class Load:
    """Client threads posting /predict without pause; every response and failure is kept."""

    def __init__(self, url: str, threads: int = 3):
        self.url, self.stop, self.failures = url, threading.Event(), []
        self.seen: list[list[tuple[str, str, float]]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            k = 0
            while not self.stop.is_set():
                text = TEXTS[k % len(TEXTS)]
                k += 1
                try:
                    r = c.post("/predict", json={"texts": [text]})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text}")
                    continue
                self.seen[i].append((r.headers["X-Model-Version"], text, r.json()["predictions"][0]["confidence"]))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def wait_for(cond, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_follows_rollback_under_load_and_keeps_serving_on_a_corrupt_version(registry_repo, caplog):
    root = registry_repo
    s = settings(repo=root, poll_s=0.2, retry_s=60, retry_max_s=60)  # no retry within the test (see the next one)
    built = build(s)
    assert built.holder.current.version == "v1.1.0"
    with ServerThread(built.app, s) as url, httpx.Client(base_url=url, timeout=30) as c, Load(url) as load:
        wait_for(lambda: sum(map(len, load.seen)) >= 10, what="first responses")
        v = c.get("/version").json()
        assert v["tag"] == "domaintune@v1.1.0" and v["dataset_hash"] == versions.get_version(root, "v1.1.0").record[
            "dataset_hash"] and v["metrics"]["ece"] == 0.1 and v["versioned"] is True
        assert set(v["metrics"]) <= {"accuracy", "macro_f1", "ece"}  # the headline; ?full=1 has every metric
        assert c.get("/version", params={"full": 1}).json()["metrics"]["evaluate"]["after"]["ece"] == 0.1
        rollback.rollback(root, "v1.0.0")  # what `domaintune rollback v1.0.0` does
        wait_for(lambda: c.get("/version").json()["version"] == "v1.0.0", what="the swap to v1.0.0")
        n = sum(map(len, load.seen))
        wait_for(lambda: sum(map(len, load.seen)) >= n + 10, what="responses after the swap")
        # A promotion to a version whose cache object is corrupt: refused, v1.0.0 keeps serving.
        obj = _cache_object(root, "v1.2.0", "head.safetensors")
        good = obj.read_bytes()
        obj.chmod(0o644)
        obj.write_bytes(good[:-4] + b"\0\0\0\0")
        try:
            from gto.api import assign

            assign(str(root), plumbing.ARTIFACT, plumbing.SERVED_STAGE, version="v1.2.0", message="promote v1.2.0",
                   force=True)  # it was in prod before the rollback
            wait_for(lambda: c.get("/v2/health/ready").json()["last_error"] is not None, what="the refusal")
            n = sum(map(len, load.seen))
            wait_for(lambda: sum(map(len, load.seen)) >= n + 10, what="responses after the refusal")
        finally:
            obj.write_bytes(good)
        ready = c.get("/v2/health/ready").json()
        metrics = c.get("/metrics").text
    assert load.failures == []
    assert ready["ready"] and ready["version"] == "v1.0.0" and ready["swaps"] == 1
    err = ready["last_error"]
    assert err["version"] == "v1.2.0" and err["kept"] == "v1.0.0"
    assert "models/export/head.safetensors" in err["error"] and "does not match" in err["error"]
    assert metric(metrics, "domaintune_model_load_failures_total") == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "domaintune.serve" and r.levelname == "ERROR"]
    assert any("v1.2.0 failed to load or verify (1 in a row); still serving v1.0.0" in m and "head.safetensors" in m
               for m in logged), logged
    assert metric(metrics, "domaintune_model_info", '{role="served",variant="float32",version="v1.0.0"}') == 1
    # Each client saw v1.1.0 then v1.0.0, never back; each answer is the one of the version it names.
    ref = {ver: dict(zip(TEXTS, reference(root / f".domaintune/releases/domaintune@{ver}/models/export",
                                          TEXTS).max(1))) for ver in ("v1.0.0", "v1.1.0")}
    for seen in load.seen:
        order = [ver for ver, _, _ in seen]
        assert order == sorted(order, reverse=True) and set(order) == {"v1.1.0", "v1.0.0"}
        for ver, text, conf in seen:
            assert abs(conf - ref[ver][text]) < 1e-5
    assert ref["v1.0.0"][TEXTS[0]] != pytest.approx(ref["v1.1.0"][TEXTS[0]], abs=1e-3)  # T differs


def test_shadow_a_published_version(registry_repo):
    """`serve --shadow v1.0.0`: the candidate is materialised from the registry; the log (default path
    reports/shadow/v1.0.0.jsonl) holds both versions' predictions, the answers are the served version's."""
    root = registry_repo
    served = versions.served_version(root)
    assert served != "v1.0.0"
    s = settings(repo=root, shadow="v1.0.0", log_text="plain")
    log_path = root / "reports/shadow/v1.0.0.jsonl"
    log_path.unlink(missing_ok=True)
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/version").json()["shadow"]["tag"] == "domaintune@v1.0.0"
        r = c.post("/predict", json={"texts": TEXTS})
        assert r.headers["X-Model-Version"] == served
    releases = root / ".domaintune/releases"
    ref_served = reference(releases / f"domaintune@{served}/models/export", TEXTS)
    ref_shadow = reference(releases / "domaintune@v1.0.0/models/export", TEXTS)
    assert np.allclose([p["confidence"] for p in r.json()["predictions"]], ref_served.max(1), atol=1e-5)
    rows = {json.loads(line)["text"]: json.loads(line) for line in log_path.read_text().splitlines()}
    assert set(rows) == set(TEXTS)
    for i, t in enumerate(TEXTS):
        assert rows[t]["served"]["version"] == served and rows[t]["shadow"]["version"] == "v1.0.0"
        assert abs(rows[t]["served"]["confidence"] - ref_served[i].max()) < 1e-5
        assert abs(rows[t]["shadow"]["confidence"] - ref_shadow[i].max()) < 1e-5
        assert rows[t]["agree"]  # same head, other temperature: same labels, other confidences


def build_flaky(s: ServeSettings):
    """build(s) whose model fails every pass that holds a text with "boom" in it (a failure no check of the
    request can foresee)."""
    built = build(s)
    predictor = built.holder.current.predictor
    real = predictor.predict_proba

    def flaky(texts):
        if any("boom" in t for t in texts):
            raise RuntimeError("simulated kernel failure")
        return real(texts)

    predictor.predict_proba = flaky
    return built


def test_a_failing_model_pass_is_a_json_500_and_the_server_lives_on(models):
    s = settings(model_dir=models[0])
    built = build_flaky(s)
    with ServerThread(built.app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", json={"texts": ["boom"]})
        assert r.status_code == 500
        assert r.json() == {"error": "internal server error: RuntimeError: simulated kernel failure"}
        assert c.post("/predict", json={"texts": ["reset my password"]}).status_code == 200
        assert metric(c.get("/metrics").text, "domaintune_requests_total",
                      '{endpoint="/predict",method="POST",status="500"}') == 1


def test_the_server_heals_after_a_failed_swap_and_prunes_old_releases(registry_repo):
    """A promoted version whose cache object is corrupt is refused (the old one keeps serving) and tried again
    with back-off; once the object is repaired it is swapped in and last_error cleared. After the swap the
    materialised releases are pruned: the served one and the `keep_releases` (1) most recently used others stay;
    a folder that is no release is left alone."""
    from gto.api import assign

    root = registry_repo
    if versions.served_version(root) != "v1.2.0":  # run alone (the fixture serves v1.1.0) or after other tests
        assign(str(root), plumbing.ARTIFACT, plumbing.SERVED_STAGE, version="v1.2.0", message="serve v1.2.0",
               force=True)
    assert versions.served_version(root) == "v1.2.0"
    releases = root / ".domaintune/releases"
    for i, v in enumerate(("v1.0.0", "v1.1.0", "v1.2.0")):  # used in this order
        release.materialise(root, v)
        os.utime(releases / f"domaintune@{v}/release.json", (1e9 + i, 1e9 + i))
    (releases / "notes").mkdir(exist_ok=True)
    (releases / ".domaintune@v0.9.0.pruned-1").mkdir(exist_ok=True)  # a prune interrupted while deleting
    s = settings(repo=root, poll_s=0.1, retry_s=0.2, retry_max_s=0.4, keep_releases=1)
    obj = _cache_object(root, "v1.1.0", "head.safetensors")
    good = obj.read_bytes()
    try:
        with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c, Load(url) as load:
            obj.chmod(0o644)
            obj.write_bytes(good[:-4] + b"\0\0\0\0")
            try:
                assign(str(root), plumbing.ARTIFACT, plumbing.SERVED_STAGE, version="v1.1.0",
                       message="promote v1.1.0", force=True)
                wait_for(lambda: (c.get("/v2/health/ready").json()["last_error"] or {}).get("failures", 0) >= 3,
                         what="three tries of v1.1.0")
                failing = c.get("/v2/health/ready").json()
                assert c.get("/version").json()["version"] == "v1.2.0"
            finally:
                obj.parent.mkdir(parents=True, exist_ok=True)
                if obj.exists():
                    obj.chmod(0o644)
                obj.write_bytes(good)  # the object repaired: no restart, no new registry event
            wait_for(lambda: c.get("/version").json()["version"] == "v1.1.0", what="the retry after the repair")
            healed = c.get("/v2/health/ready").json()
            metrics = c.get("/metrics").text
        assert load.failures == []
        err = failing["last_error"]
        assert err["version"] == "v1.1.0" and err["kept"] == "v1.2.0" and "head.safetensors" in err["error"]
        assert err["retry_in_s"] == 0.4  # 0.2 s after the first failure, then twice that, capped at 0.4 s
        assert healed["ready"] and healed["version"] == "v1.1.0" and healed["last_error"] is None
        assert healed["swaps"] == 1 and metric(metrics, "domaintune_model_load_failures_total") >= 3
        assert sorted(p.name for p in releases.iterdir()) == ["domaintune@v1.1.0", "domaintune@v1.2.0", "notes"]
        assert {v for v, _, _ in load.seen[0]} <= {"v1.2.0", "v1.1.0"}
    finally:
        assign(str(root), plumbing.ARTIFACT, plumbing.SERVED_STAGE, version="v1.2.0", message="back to v1.2.0",
               force=True)
        shutil.rmtree(releases / "notes", ignore_errors=True)


def test_serve_right_after_make_run_serves_the_workspace_export_unversioned(models, tmp_path, caplog):
    """No version promoted yet: serve the project's models/export, say so in one log line and in /version
    (with the dataset hash and headline metrics the workspace holds), instead of stopping."""
    root = tmp_path / "repo"
    sh(tmp_path, "git", "init", "-q", str(root))
    shutil.copytree(models[0], root / "models" / "export")
    (root / "metrics").mkdir()
    (root / "metrics" / "evaluate.json").write_text(json.dumps({"after": {"accuracy": 0.9, "macro_f1": 0.8,
                                                                          "ece": 0.05}}))
    s = settings(repo=root)
    with caplog.at_level("WARNING", logger="domaintune.serve"):
        built = build(s)
    assert [r.getMessage() for r in caplog.records if "unversioned" in r.getMessage()]
    with ServerThread(built.app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        v = c.get("/version").json()
        assert v["version"] == "workspace" and v["versioned"] is False and v["dataset_hash"] == "tiny"
        assert v["metrics"] == {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.05}
        assert c.post("/predict", json={"texts": ["where is my parcel"]}).status_code == 200


@pytest.mark.parametrize("how", ["hash", "none"])
def test_shadow_log_stores_text_as_the_log_text_setting_says(models, tmp_path, how):
    """The shadow log follows the server's one text-storage setting: hashed by default, or no text at all;
    shadow-report reads it either way."""
    import hashlib

    from domaintune.serve.shadow import summarise

    a, b = models
    log_path = tmp_path / "shadow.jsonl"
    s = settings(model_dir=a, shadow=str(b), shadow_log=log_path, **({} if how == "hash" else {"log_text": how}))
    texts = ["where is my parcel", "reset my password please", "refund my order"]
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/predict", json={"texts": texts}).status_code == 200
    raw = log_path.read_text()
    rows = [json.loads(line) for line in raw.splitlines()]
    assert len(rows) == 3 and not any(t in raw for t in texts) and all("text" not in r for r in rows)
    want = {hashlib.sha256(t.encode()).hexdigest() for t in texts} if how == "hash" else {None}
    assert {r.get("text_sha256") for r in rows} == want
    assert summarise(log_path)["rows"] == 3


@pytest.mark.parametrize("variant, platform", [("float32", "pytorch"), ("int8", "pytorch"), ("onnx", "onnxruntime"),
                                               ("onnx-int8", "onnxruntime"), ("openvino-int8", "openvino")])
def test_model_metadata_names_the_runtime_of_each_variant(variant, platform):
    from types import SimpleNamespace

    from domaintune.serve.app import model_metadata

    meta = model_metadata(SimpleNamespace(variant=variant, task="generation", version="v1"))
    assert meta["platform"] == platform and meta["parameters"]["variant"] == variant


def test_serve_without_abstention_adds_no_field(server):
    """method none: the answers are today's (no `abstained` field, no extra v2 output)."""
    r = server.post("/predict", json={"texts": TEXTS[:2]})
    assert all(set(x) == {"id", "label", "confidence", "top_k"} for x in r.json()["predictions"])
    r = server.post("/v2/models/domaintune/infer",
                    json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": TEXTS[:1]}]})
    assert [o["name"] for o in r.json()["outputs"]] == ["label", "confidence", "probabilities"]
