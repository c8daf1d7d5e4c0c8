"""`domaintune serve` against hostile clients, on a real uvicorn on 127.0.0.1: one bad request among good
ones fails alone with a 4xx (lone surrogates, NaN/Infinity and huge integers are refused, naming the field,
before they join a batch; a batch that fails anyway is retried request by request), a client that goes away
is not counted as a 500, a body that never comes is answered 408 and its connection closed, big requests do
not hold a small one, and `serve` on a busy port stops at once, before loading the model."""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_serve import TEXTS, build_flaky, reference, settings

import domaintune.serve.app as serve_app
from domaintune.serve.app import build
from domaintune.serve.body import ApiError, check_values
from pipelines.cli import main
from pipelines.serve import ServerThread

INFER = "/v2/models/domaintune/infer"
JSON_HEADERS = {"content-type": "application/json"}


def count(metrics: str, labels: str, name: str = "domaintune_requests_total") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def infer_body(data: str = '["a"]', shape: str = "[1]", extra: str = "") -> bytes:
    return (f'{{{extra}"inputs": [{{"name": "text", "datatype": "BYTES", "shape": {shape}, '
            f'"data": {data}}}]}}').encode()


@pytest.fixture(scope="module")
def server(models):
    """Small limits, a 1 s body timeout."""
    s = settings(model_dir=models[0], max_texts=8, max_chars=2000, max_body_bytes=20_000, body_timeout_s=1.0)
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def batching(models):
    """Requests wait 300 ms for company, so concurrent ones share a batch; a text with "boom" in it fails the
    model pass it is in (a failure no check can foresee)."""
    s = settings(model_dir=models[0], max_wait_ms=300.0)
    built = build_flaky(s)
    with ServerThread(built.app, s) as url:
        yield url


def concurrently(url: str, requests: list[tuple[str, bytes]]) -> list[httpx.Response]:
    """POST each (path, raw body) from its own client thread, all released at once."""
    out: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def client(i):
        with httpx.Client(base_url=url, timeout=60) as c:
            start.wait()
            out[i] = c.post(requests[i][0], content=requests[i][1], headers=JSON_HEADERS)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_a_lone_surrogate_among_20_good_requests_fails_alone_with_a_422(batching, models):
    good = [f"where is my parcel {i}" for i in range(20)]
    bodies = [("/predict", json.dumps({"texts": [t]}).encode()) for t in good]
    bodies.insert(7, ("/predict", b'{"texts": ["\\ud800 hello"]}'))
    out = concurrently(batching, bodies)
    bad = out.pop(7)
    assert bad.status_code == 422, bad.text
    assert bad.json() == {"error": "not valid Unicode: a lone surrogate (U+D800) at character 0", "field": "texts[0]"}
    assert [r.status_code for r in out] == [200] * 20, [r.text for r in out if r.status_code != 200]
    ref = reference(models[0], good)
    assert np.allclose([r.json()["predictions"][0]["confidence"] for r in out], ref.max(1), atol=1e-5)
    metrics = httpx.get(f"{batching}/metrics").text
    assert count(metrics, "_count", "domaintune_batch_requests") <= 5  # the 20 shared a few batches


def test_a_batch_that_fails_is_retried_request_by_request(batching, models):
    """A failure the checks cannot foresee: only the request that fails alone gets the 500."""
    good = [f"reset my password {i}" for i in range(10)]
    bodies = [("/predict", json.dumps({"texts": [t]}).encode()) for t in good]
    bodies.insert(3, (INFER, infer_body('["boom", "fine"]', "[2]", '"id": "r-boom", ')))
    out = concurrently(batching, bodies)
    bad = out.pop(3)
    assert bad.status_code == 500
    assert bad.json() == {"error": "internal server error: RuntimeError: simulated kernel failure"}
    assert [r.status_code for r in out] == [200] * 10, [r.text for r in out if r.status_code != 200]
    ref = reference(models[0], good)
    assert np.allclose([r.json()["predictions"][0]["confidence"] for r in out], ref.max(1), atol=1e-5)


HOSTILE = [  # (path, raw body, field, words in the error): each was a 500 before it was checked
    ("/predict", b'{"texts": ["\\ud800 hello"]}', "texts[0]", "lone surrogate (U+D800)"),
    ("/predict", b'{"texts": ["ok", "raw \xed\xa0\x80 bytes"]}', "texts[1]", "lone surrogate (U+D800) at character 4"),
    ("/predict", b'{"texts": ["ok"], "\\udc00": 1}', "\\udc00", "this key is not valid Unicode"),
    ("/predict", b'{"texts": ["ok"], "top_k": ' + b"7" * 5000 + b"}", "top_k", "integer of 5000 digits"),
    (INFER, infer_body(extra='"id": "\\udfff", '), "id", "lone surrogate (U+DFFF)"),
    (INFER, infer_body(extra='"id": NaN, '), "id", "NaN is not allowed"),
    (INFER, infer_body(extra='"id": Infinity, '), "id", "Infinity is not allowed"),
    (INFER, infer_body(extra='"id": -Infinity, '), "id", "-Infinity is not allowed"),
    (INFER, infer_body(extra='"id": 1e999, '), "id", "overflows to infinity"),
    (INFER, infer_body(shape="[" + "1" * 5000 + "]"), "inputs[0].shape[0]", "integer of 5000 digits"),
    (INFER, infer_body(data='[["\\ud83d"]]'), "inputs[0].data[0][0]", "lone surrogate (U+D83D)"),
    (INFER, infer_body(extra='"id": {"\\ud800x": 1}, '), "id.\\ud800x", "this key is not valid Unicode"),
]


@pytest.mark.parametrize("path,body,field,words", HOSTILE, ids=[f"{i}-{h[2]}" for i, h in enumerate(HOSTILE)])
def test_values_no_route_can_answer_are_a_422_naming_the_field(server, path, body, field, words):
    r = server.post(path, content=body, headers=JSON_HEADERS)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and words in r.json()["error"], r.json()


def test_valid_unicode_and_big_but_finite_numbers_still_pass(server):
    r = server.post("/predict", content='{"texts": ["\\ud83d\\ude00 NaN Infinity 1e999 🙂 ok"], "top_k": 2}'.encode(),
                    headers=JSON_HEADERS)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 2
    r = server.post(INFER, content=infer_body(extra='"id": 9223372036854775807, '), headers=JSON_HEADERS)
    assert r.status_code == 200 and r.json()["id"] == 2**63 - 1


def test_the_check_of_a_body_is_bounded():
    """Lists of plain values are checked in bulk; a body nesting more than max_nested values in lists and
    objects that hold lists or objects is refused as too large, so checking never costs much more than parsing."""
    check_values([[1, "é", 2.5]] * 100 + [list(range(100_000))], max_nested=200)
    with pytest.raises(ApiError) as exc:
        check_values({"a": [[1]] * 201}, max_nested=200)
    assert (exc.value.status, exc.value.field) == (413, "a")
    with pytest.raises(ApiError) as exc:
        check_values([list(range(100_000)) + [2**63]])
    assert (exc.value.status, exc.value.field) == (422, "[0][100000]")


HOSTILE_TEXT = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=12)
HOSTILE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**40, max_value=10**40) | st.floats() | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["texts", "top_k", "inputs", "outputs", "datatype", "shape", "data", "id"]) | HOSTILE_TEXT,
        inner, max_size=5),
    max_leaves=20)
VALID = st.fixed_dictionaries({"texts": st.lists(HOSTILE_TEXT, min_size=1, max_size=3)})


@given(body=HOSTILE_JSON | VALID, raw=st.booleans())
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_hostile_body_gets_an_answer_below_500(server, body, raw):
    """Lone surrogates escaped (\\ud800) or as raw bytes, NaN, Infinity and integers past 64 bits, anywhere."""
    content = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass") if raw else json.dumps(body).encode()
    for path in ("/predict", INFER):
        r = server.post(path, content=content, headers=JSON_HEADERS)
        assert r.status_code in (200, 413, 422), (path, content, r.text)
        assert r.status_code == 200 or "error" in r.json()


def test_a_client_that_disconnects_is_counted_as_499_not_500(server):
    host, port = server.base_url.host, server.base_url.port
    before = server.get("/metrics").text
    for _ in range(3):  # a body announced, a part sent, then gone
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"texts\": [")
            time.sleep(0.05)
    labels = '{endpoint="/predict",method="POST",status="%s"}'
    deadline = time.monotonic() + 10
    while count(metrics := server.get("/metrics").text, labels % 499) - count(before, labels % 499) < 3:
        assert time.monotonic() < deadline, f"3 disconnects not counted as 499:\n{metrics}"
        time.sleep(0.05)
    assert count(metrics, labels % 500) == count(before, labels % 500) == 0
    assert server.post("/predict", json={"texts": ["still fine"]}).status_code == 200


def test_a_body_that_never_comes_is_answered_408_and_closed(server):
    host, port = server.base_url.host, server.base_url.port
    with socket.create_connection((host, port)) as s:
        s.settimeout(15)
        t0 = time.monotonic()
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):  # until the server closes the connection
            answer += chunk
        took = time.monotonic() - t0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), answer
    assert json.loads(body) == {"error": "request body not received within 1 s (0 bytes came)"}
    assert took >= 1.0, took  # the server waited its body timeout; s.settimeout(15) bounds it from above
    metrics = server.get("/metrics").text
    assert count(metrics, '{reason="408"}', "domaintune_rejected_requests_total") >= 1


def test_five_maximum_size_requests_do_not_hold_a_one_text_request(models):
    """A model pass costs time in proportion to its characters (here 20 us each: a full request, 8 texts of
    2,000 characters, takes 0.32 s). With 4,000 characters per batch, the big requests take turns, and the
    one-text request sent after them joins the next batch instead of waiting for all five."""
    s = settings(model_dir=models[0], max_texts=8, max_chars=2000, max_body_bytes=40_000, max_batch=8,
                 max_batch_chars=4000)
    built = build(s)
    predictor = built.holder.current.predictor
    real = predictor.predict_proba

    def costly(texts):
        time.sleep(sum(map(len, texts)) * 2e-5)
        return real(texts)

    predictor.predict_proba = costly
    bigs = [[f"{TEXTS[(i + j) % 5]} {j} " + "x" * (1990 - len(TEXTS[(i + j) % 5])) for j in range(8)]
            for i in range(5)]
    done: dict = {}

    def client(key, texts):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/predict", json={"texts": texts})
            done[key] = (time.monotonic(), r)

    with ServerThread(built.app, s) as url:
        threads = [threading.Thread(target=client, args=(i, texts)) for i, texts in enumerate(bigs)]
        for t in threads:
            t.start()
        time.sleep(0.15)  # the big ones are in
        sent = time.monotonic()
        client("small", ["reset my password"])
        for t in threads:
            t.join()
    small_at, small = done.pop("small")
    assert small.status_code == 200 and all(r.status_code == 200 for _, r in done.values())
    first_big = min(at for at, _ in done.values())
    assert small_at < first_big, f"the small request took {small_at - sent:.2f} s, the first big one ended " \
                                 f"{first_big - sent:.2f} s after it was sent"
    for i, texts in enumerate(bigs):  # each big request, answered over several batches, in its own order
        got = [p["confidence"] for p in done[i][1].json()["predictions"]]
        assert np.allclose(got, reference(models[0], texts).max(1), atol=1e-5)


def test_serve_on_a_busy_port_stops_before_loading_the_model(models, monkeypatch, capsys):
    monkeypatch.setattr(serve_app, "build", lambda settings: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        assert main(["serve", "--model", str(models[0]), "--port", str(port)]) == 2
        assert time.monotonic() - t0 < 5
    assert capsys.readouterr().err.strip().splitlines() == [
        f"domaintune serve: cannot listen on 127.0.0.1:{port}: Address already in use"]
