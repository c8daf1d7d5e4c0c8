"""`domaintune serve` on a generation export, on a real uvicorn on 127.0.0.1: the OpenAI-compatible
/v1/completions and /v1/chat/completions, plain and streamed (server-sent events), max_tokens, stop,
bad bodies, limits, batching, the version header and /metrics; the classifier's routes refuse it and
the /v1 routes refuse a classifier. `domaintune predict` on the same export writes the responses, and
predict, serve and monitor accept the same folders and refuse a folder that is no export with the
same line: they all open models through domaintune.tasks.load_predictor."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from test_serve import metric, settings, train_tiny_classifier

from domaintune.data import chat
from domaintune.serve.app import build
from pipelines.serve import ServerThread

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "support_replies" / "pairs.csv"
MESSAGES = [{"role": "system", "content": "You answer support tickets."},
            {"role": "user", "content": "My parcel has not arrived, where is it?"}]
PROMPTS = ["I was charged twice for order 7", "reset my password please"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random Llama saved as the generation export stage saves one (greedy, 12 new tokens)."""
    from domaintune.core.io import write_json
    from domaintune.export.generation import save_export
    from domaintune.modeling import tinyllm
    from domaintune.modeling.causal import load_causal_lm

    root = tmp_path_factory.mktemp("serve_generation")
    df = pd.read_csv(PAIRS)
    m, tok = load_causal_lm(str(tinyllm.save(root / "tiny", df["prompt"].tolist() + df["response"].tolist(), seed=0)))
    out = root / "export"
    save_export(m, tok, out, 12)
    write_json(out / "export_info.json", {"task": "generation", "method": "full", "base_model": "tiny",
                                          "max_length": 128})
    return out


@pytest.fixture(scope="module")
def local(export):
    """The same export in this process, through the one loader: what every answer must equal."""
    from domaintune.tasks import load_predictor

    return load_predictor(export)


@pytest.fixture(scope="module")
def server(export):
    s = settings(model_dir=export, max_texts=4, max_chars=4000, max_body_bytes=40_000, max_new_tokens=32,
                 max_wait_ms=50.0)
    with ServerThread(build(s).app, s) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def sse(r: httpx.Response) -> list:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [block for block in r.text.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def first_stop(text: str) -> str:
    """A two-character piece of `text` (no replacement character) to stop at, not at its start."""
    for k in range(1, len(text) - 1):
        if "\ufffd" not in text[k:k + 2] and text[k:k + 2].strip():
            return text[k:k + 2]
    pytest.skip(f"generated text {text!r} has no usable stop piece")


def test_row_tracker_streams_only_text_that_cannot_become_a_stop_string():
    """Per token: a stop string split across tokens is never streamed in part, an incomplete UTF-8 character
    waits for its other bytes, the deltas add up to the response, and a row stops at its budget or eos."""
    from domaintune.predict.generation import RowTracker

    pieces = {1: "Hello", 2: " wo", 3: "rld", 4: " ##", 5: "#", 6: "\ufffd", 7: "é", 9: "<eos>"}

    def decode(tokens):  # token 6 then 7: the two bytes of "é" (decoded alone, the first is U+FFFD)
        text = "".join(pieces[t] for t in tokens if t != 9)
        return text.replace("\ufffdé", "é")

    sent: dict[int, list[str]] = {}
    t = RowTracker(decode, [10, 10, 2, 10], [["###"], [], [], []], {9}, lambda r, d: sent.setdefault(r, []).append(d))
    for token in (1, 2, 4, 5):  # "Hello wo ###": "##" waits, "#" completes the stop
        t.add(0, token)
    assert t.finish[0] == "stop" and t.text[0] == "Hello wo " and sent[0] == ["Hello", " wo", " "]
    assert t.add(0, 3) is True and len(t.tokens[0]) == 4  # a finished row takes no more
    t.add(1, 1)
    t.add(1, 6)
    assert "".join(sent[1]) == "Hello"  # the lone first byte is held
    t.add(1, 7)
    assert "".join(sent[1]) == "Helloé"
    assert t.add(1, 9) and t.finish[1] == "stop" and t.text[1] == "Helloé" and len(t.tokens[1]) == 4
    t.add(2, 1)
    assert t.add(2, 2) and t.finish[2] == "length" and t.text[2] == "Hello wo" and "".join(sent[2]) == "Hello wo"
    t.add(3, 4)
    t.close_all()
    assert t.finish[3] == "length" and "".join(sent[3]) == t.text[3] == " ##"


def test_chat_completion_is_the_exports_greedy_reply_to_the_chat_template(server, local):
    r = server.post("/v1/chat/completions", json={"model": "domaintune", "messages": MESSAGES, "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "workspace"
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "domaintune" and body["system_fingerprint"] == "workspace"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    want = local.generate([chat.dump(MESSAGES)], max_new_tokens=8)[0]  # rendered with the chat template
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason
    prompt_ids = local.encode([chat.dump(MESSAGES)])[0]
    assert local.tokenizer.decode(prompt_ids).startswith("<s><|system|>\nYou answer support tickets.<|end|>")
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": want.completion_tokens,
                             "total_tokens": len(prompt_ids) + want.completion_tokens}


def test_completions_answer_each_prompt_with_the_exports_defaults(server, local):
    r = server.post("/v1/completions", json={"prompt": PROMPTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    want = local.generate(PROMPTS)  # max_new_tokens 12 and greedy: the export's generation_config.json
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [g.text for g in want]
    assert [c["finish_reason"] for c in body["choices"]] == [g.finish_reason for g in want]
    assert body["usage"]["completion_tokens"] == sum(g.completion_tokens for g in want) <= 2 * 12
    assert body["usage"]["prompt_tokens"] == sum(g.prompt_tokens for g in want)
    single = server.post("/v1/completions", json={"prompt": PROMPTS[1], "temperature": 0}).json()
    assert single["choices"][0]["text"] == want[1].text


@pytest.mark.parametrize("max_tokens", [1, 3, 7])
def test_max_tokens_bounds_the_tokens_generated(server, local, max_tokens):
    r = server.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": max_tokens}).json()
    [choice], used = r["choices"], r["usage"]["completion_tokens"]
    assert 1 <= used <= max_tokens
    want = local.generate([PROMPTS[0]], max_new_tokens=max_tokens)[0]  # the same greedy run, in-process
    assert (used, choice["text"]) == (want.completion_tokens, want.text)
    assert (used == max_tokens) == (choice["finish_reason"] == "length")
    s = server.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": max_tokens, "stream": True})
    deltas = [e["choices"][0]["text"] for e in sse(s)[:-1] if e["choices"][0]["finish_reason"] is None]
    assert len(deltas) <= max_tokens and "".join(deltas) == choice["text"]  # at most one delta per token


def test_stop_cuts_the_response_before_the_first_stop_string(server, local):
    full = local.generate([PROMPTS[0]], max_new_tokens=16)[0].text
    stop = first_stop(full)
    cut = full[:full.index(stop)]
    r = server.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16, "stop": [stop, "zzzz"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == cut and choice["finish_reason"] == "stop"
    events = sse(server.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16, "stop": stop,
                                                      "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut  # nothing past the stop is streamed
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    chat_full = local.generate([chat.dump(MESSAGES)], max_new_tokens=16)[0].text
    chat_stop = first_stop(chat_full)
    r = server.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 16, "stop": chat_stop})
    assert r.json()["choices"][0]["message"]["content"] == chat_full[:chat_full.index(chat_stop)]


def test_chat_streams_openai_chunks_ending_with_done(server, local):
    plain = server.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 10}).json()
    r = server.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 10, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "workspace"
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "domaintune" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    *middle, last, usage = chunks
    content = [c["choices"][0]["delta"]["content"] for c in middle[1:]]
    assert all(c["choices"][0]["finish_reason"] is None for c in middle) and all(content)
    assert "".join(content) == plain["choices"][0]["message"]["content"]
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": plain["choices"][0]["finish_reason"]}]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]


def test_sampling_follows_temperature_top_p_and_seed(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.5, "top_p": 0.95}
    a = server.post("/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    b = server.post("/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    others = {server.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"] for s in range(4)}
    greedy = server.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    assert a == b and len(others | {greedy}) > 1  # a seed repeats its draw; draws differ from greedy and each other


BAD = [  # (path, body, status, the field named)
    ("/v1/chat/completions", {}, 422, "messages"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 422, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 422,
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, 422, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2.5}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 422, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 422, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, 422, "top_p"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": ["a", ""]}, 422, "stop[1]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": ["a"] * 5}, 422, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, 422, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": []}, 422, "tools"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, 422, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "seed": True}, 422, "seed"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 33}, 413, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES * 3}, 413, "messages"),
    ("/v1/completions", {}, 422, "prompt"),
    ("/v1/completions", {"prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 422, "prompt"),
    ("/v1/completions", {"prompt": ["ok", None]}, 422, "prompt[1]"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 422, "echo"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x" * 4001}, 413, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 5}, 413, "prompt"),
    ("/v1/completions", {"prompt": "refund " * 500, "max_tokens": 8}, 422, "max_tokens"),  # over the context
    ("/v1/completions", {"prompt": "refund " * 500, "stream": True}, 422, "max_tokens"),   # before any event
    ("/v1/completions", b"{not json", 422, None),
    ("/v1/completions", [], 422, None),
]


@pytest.mark.parametrize("path,body,status,field", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_bodies_are_refused_naming_the_field_in_openais_error_shape(server, path, body, status, field):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = server.post(path, headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error" and err["message"]
    assert r.headers["X-Model-Version"] == "workspace"


def test_long_prompt_error_names_the_context(server):
    r = server.post("/v1/completions", json={"prompt": "refund " * 500, "max_tokens": 8})
    assert re.search(r"prompt 0 has \d+ tokens; with max_new_tokens 8 that is over the model's context of 512",
                     r.json()["error"]["message"])


def test_classifier_routes_refuse_a_generation_export_and_the_rest_answers(server):
    for path, body in (("/predict", {"texts": ["x"]}),
                       ("/v2/models/domaintune/infer",
                        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})):
        r = server.post(path, json=body)
        assert r.status_code == 404, r.text
        assert "is a generation export" in r.json()["error"] and "/v1/chat/completions" in r.json()["error"]
    assert server.get("/v2/health/ready").json()["ready"] is True
    assert server.get("/version").json()["task"] == "generation"
    meta = server.get("/v2/models/domaintune").json()
    assert meta["parameters"]["task"] == "generation" and "/v1/completions" in meta["parameters"]["endpoints"]
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["domaintune"]


def test_v1_routes_refuse_a_classifier(tiny_bert, tmp_path):
    folder = train_tiny_classifier(tiny_bert, tmp_path / "clf", temperature=1.0)
    s = settings(model_dir=folder)
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MESSAGES})):
            r = c.post(path, json=body)
            assert r.status_code == 404, r.text
            assert "is a classification export" in r.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 404
        assert c.post("/predict", json={"texts": ["reset my password"]}).status_code == 200


def test_concurrent_requests_share_batches_and_metrics_count_tokens(server, local):
    before = server.get("/metrics").text
    n_batches0 = metric(before, "domaintune_batch_requests_count")
    tokens0 = metric(before, "domaintune_tokens_total", '{kind="completion"}')
    prompts = [f"where is my parcel {i}" for i in range(8)]
    results, start = {}, threading.Barrier(8)

    def client(i):
        with httpx.Client(base_url=str(server.base_url), timeout=60) as c:
            start.wait()
            results[i] = c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 6 + i % 3})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 and r.headers["X-Model-Version"] == "workspace" for r in results.values())
    for i, r in results.items():  # each request got its own answer, within its own budget
        want = local.generate([prompts[i]], max_new_tokens=6 + i % 3)[0]
        assert r.json()["choices"][0]["text"] == want.text
    after = server.get("/metrics").text
    assert metric(after, "domaintune_batch_requests_count") - n_batches0 < 8
    used = sum(r.json()["usage"]["completion_tokens"] for r in results.values())
    assert metric(after, "domaintune_tokens_total", '{kind="completion"}') - tokens0 == used
    assert metric(after, "domaintune_requests_total",
                  '{endpoint="/v1/completions",method="POST",status="200"}') >= 8


def test_hot_swap_from_a_classifier_to_a_generation_export_moves_the_routes(export, tiny_bert, tmp_path,
                                                                             monkeypatch):
    """The registry's served version moves from a classifier to a generation export (the registry is faked:
    its state, served version and materialised folders; tests/test_serve.py runs the real one): the server
    swaps without a restart, the /v1 routes start answering with the new version, /predict refuses it."""
    from types import SimpleNamespace

    from domaintune.registry import release
    from domaintune.registry import versions as registry
    from domaintune.serve import holder as holder_module

    folders = {"v1.0.0": train_tiny_classifier(tiny_bert, tmp_path / "clf", temperature=1.0), "v2.0.0": export}
    served = {"now": "v1.0.0"}
    monkeypatch.setattr(holder_module, "registry_state", lambda root: served["now"])
    monkeypatch.setattr(registry, "served_version", lambda root: served["now"])

    def materialise(root, name):
        name = name or served["now"]
        v = SimpleNamespace(version=name, tag=f"domaintune@{name}", commit="0" * 40)
        return SimpleNamespace(version=v, path=folders[name], dataset_hash=None, metrics={})

    monkeypatch.setattr(release, "materialise", materialise)
    s = settings(repo=tmp_path, poll_s=0.1)
    with ServerThread(build(s).app, s) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/predict", json={"texts": ["reset my password"]})
        assert r.status_code == 200 and r.headers["X-Model-Version"] == "v1.0.0"
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 404
        served["now"] = "v2.0.0"
        deadline = time.monotonic() + 60
        while c.get("/version").json()["version"] != "v2.0.0":
            assert time.monotonic() < deadline, "no swap"
            time.sleep(0.1)
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
        assert r.status_code == 200 and r.headers["X-Model-Version"] == "v2.0.0"
        assert r.json()["system_fingerprint"] == "v2.0.0"
        assert c.post("/predict", json={"texts": ["reset my password"]}).status_code == 404
        text = c.get("/metrics").text
    assert metric(text, "domaintune_model_swaps_total") == 1
    assert metric(text, "domaintune_model_info", '{role="served",variant="float32",version="v2.0.0"}') == 1


# ----------------------------------------------------------------------------- predict, and the one loader

def cli(*argv) -> int:
    from pipelines.cli import main

    return main([str(a) for a in argv])


def test_predict_writes_a_response_per_row(export, local, tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(PROMPTS)))
    assert cli("predict", src, "--model", export, "--out", tmp_path / "out.jsonl", "--max-new-tokens", 5,
               "--id-column", "id") == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = local.generate(PROMPTS, max_new_tokens=5)
    assert [r["id"] for r in rows] == ["p0", "p1"] and [r["text"] for r in rows] == PROMPTS
    assert [r["response"] for r in rows] == [g.text for g in want]
    assert [(r["finish_reason"], r["completion_tokens"], r["prompt_tokens"]) for r in rows] == \
        [(g.finish_reason, g.completion_tokens, g.prompt_tokens) for g in want]
    assert "2 of 2 rows predicted" in capsys.readouterr().err
    stop = first_stop(want[0].text)
    assert cli("predict", src, "--model", export, "--out", tmp_path / "out.csv", "--max-new-tokens", 5,
               "--stop", stop) == 0
    table = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["id", "text", "response", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert table["response"][0] == want[0].text[:want[0].text.index(stop)] and table["finish_reason"][0] == "stop"
    long = tmp_path / "long.txt"
    long.write_text("fine prompt\n" + "refund " * 500 + "\n")
    assert cli("predict", long, "--model", export, "--on-bad-row", "skip", "--out", tmp_path / "l.jsonl") == 0
    assert len((tmp_path / "l.jsonl").read_text().splitlines()) == 1
    assert f"skipped {long}: row 2: field 'line': the prompt has" in capsys.readouterr().err


def test_predict_refuses_generation_flags_on_a_classifier(tiny_bert, tmp_path, capsys):
    folder = train_tiny_classifier(tiny_bert, tmp_path / "clf", temperature=1.0)
    (tmp_path / "in.txt").write_text("reset my password\n")
    capsys.readouterr()
    assert cli("predict", tmp_path / "in.txt", "--model", folder, "--temperature", 0.5) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"domaintune predict: error: {folder}: --temperature is for a generation export; "
                   "this is a classification export"]


def test_predict_serve_and_monitor_accept_the_same_folders_and_refuse_a_non_export_alike(
        export, tiny_bert, tmp_path, capsys):
    """Both exports load in all three commands (monitor gets past the model to the missing baseline); a folder
    that is no export gets the same one line from each, the loader's own (domaintune.tasks.export_task)."""
    from domaintune.core.errors import DataError
    from domaintune.tasks import export_task

    classifier = train_tiny_classifier(tiny_bert, tmp_path / "clf", temperature=1.0)
    (tmp_path / "params.yaml").write_text("drift: {batch_size: 16, pca_components: 3}\n")
    (tmp_path / "baseline").mkdir()
    batch = tmp_path / "batch.txt"
    batch.write_text("where is my parcel\nreset my password\n")
    for folder in (classifier, export):
        assert cli("predict", batch, "--model", folder, "--out", tmp_path / "p.jsonl") == 0
        assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
        s = settings(model_dir=folder)
        assert build(s).holder.current.task == export_task(folder)
        assert cli("monitor", "--batch", batch, "--repo", tmp_path, "--model", folder, "--baseline", "baseline",
                   "--out", "reports/m") == 2
        assert "drift baseline incomplete" in capsys.readouterr().err
    other = tmp_path / "not_an_export"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as refusal:
        export_task(other)
    capsys.readouterr()
    assert cli("predict", batch, "--model", other) == 2
    predict_err = capsys.readouterr().err.strip().splitlines()
    assert cli("serve", "--model", other, "--port", "0") == 2
    serve_err = capsys.readouterr().err.strip().splitlines()
    assert cli("monitor", "--batch", batch, "--repo", tmp_path, "--model", other, "--baseline", "baseline") == 2
    monitor_err = capsys.readouterr().err.strip().splitlines()
    assert predict_err == [f"domaintune predict: error: {refusal.value}"]
    assert serve_err == [f"domaintune serve: cannot load the model: {refusal.value}"]
    assert monitor_err == [f"domaintune monitor: error: {refusal.value}"]
    assert "not an export (no model.json or export_info.json)" in str(refusal.value)


HOSTILE = [  # (path, raw body, the field named): each was a 500 before bodies were checked
    ("/v1/completions", b'{"prompt": "\\ud800 where is my parcel"}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "raw \xed\xa0\x80 bytes"]}', "prompt[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\udc00"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
     "seed"),
    ("/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
]


@pytest.mark.parametrize("path,body,field", HOSTILE, ids=[f"{i}-{h[2]}" for i, h in enumerate(HOSTILE)])
def test_values_no_route_can_answer_are_refused_before_generation(server, path, body, field):
    r = server.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err


def test_a_generation_batch_that_fails_is_retried_job_by_job(export, local):
    """Two jobs share a model.generate call that fails (a failure no check foresees): retried alone, the good
    one is answered, and only the one that fails alone gets the 500 (in OpenAI's error shape)."""
    s = settings(model_dir=export, max_wait_ms=300.0)
    built = build(s)
    predictor = built.holder.current.predictor
    real = predictor.generate

    def flaky(prompts, **kw):
        if any("boom" in p for p in prompts):
            raise RuntimeError("simulated kernel failure")
        return real(prompts, **kw)

    predictor.generate = flaky
    results, start = {}, threading.Barrier(2)
    with ServerThread(built.app, s) as url:
        def client(prompt):
            with httpx.Client(base_url=url, timeout=60) as c:
                start.wait()
                results[prompt] = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6})

        threads = [threading.Thread(target=client, args=(p,)) for p in (PROMPTS[0], "boom")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{url}/metrics").text
    assert metric(metrics, "domaintune_batch_requests_count") == 1  # they did share a batch
    good, bad = results[PROMPTS[0]], results["boom"]
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["text"] == local.generate([PROMPTS[0]], max_new_tokens=6)[0].text
    assert bad.status_code == 500
    assert bad.json()["error"]["message"] == "internal server error: RuntimeError: simulated kernel failure"
    assert bad.json()["error"]["type"] == "server_error"
