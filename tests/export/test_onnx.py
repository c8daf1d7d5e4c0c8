"""The ONNX variants run without domaintune: plain onnxruntime + tokenizers + numpy in a process that
cannot import domaintune give the same calibrated probabilities as domaintune's Predictor.

Tolerances: onnx vs PyTorch float32 within 1e-5 (the same float32 math, other kernels); onnx-int8
vs its own Predictor within 1e-5 (the same graph and runtime; only tokenisation differs in who does
it), and onnx-int8 vs float32 within 0.1 (dynamic int8 activations; a random tiny model is the
worst case for quantisation ranges). openvino-int8 (plain OpenVINO + tokenizers) vs its own
Predictor within 1e-4 (the same IR; the snippet pads all texts to one length, Predictor batches by
length, and static int8 rounds at fixed scales either way) and vs float32 within 0.1 (static int8).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from evalkit import LABELS, OOS_TEXTS, add_abstention, make_model, make_split

# Runs under `python -I` (no PYTHONPATH, no cwd on sys.path) with domaintune blocked on top,
# since the venv's editable install would otherwise still find it.
ISOLATED = r'''
import sys

class NoDomaintune:
    def find_spec(self, name, path=None, target=None):
        if name == "domaintune" or name.startswith("domaintune."):
            raise ImportError("domaintune is not importable in this process")
        return None

sys.meta_path.insert(0, NoDomaintune())
try:
    import domaintune  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("domaintune was importable")
import json, os

import numpy as np

texts = json.load(open(sys.argv[2]))
os.chdir(sys.argv[1])  # the folder that holds models/export, as the card's snippet assumes
snippet = open(sys.argv[3]).read().replace('texts = ["example text"]', "texts = TEXTS")
ns = {"TEXTS": texts}
exec(compile(snippet, "README.md", "exec"), ns)
assert "domaintune" not in sys.modules
np.save(sys.argv[4], ns["probs"])
if "abstained" in ns:  # the card's abstention step (evaluate.abstain)
    np.save(sys.argv[4] + ".abstained.npy", ns["abstained"])
    print(json.dumps({"labels": ns["labels"]}))
else:
    print(json.dumps({"labels": [ns["config"]["id2label"][str(i)] for i in ns["probs"].argmax(1)]}))
'''


@pytest.fixture(scope="module")
def onnx_export(tiny_bert, tmp_path_factory):
    from domaintune.export import artifacts
    from domaintune.modeling.encoders import load_classifier

    root = tmp_path_factory.mktemp("onnx")
    ft = make_model(tiny_bert, root / "ft", seed=11)
    model, tok, meta = load_classifier(ft)
    meta = {**{k: v for k, v in meta.items() if k not in ("adapter", "num_labels", "hidden_size")},
            "temperature": 1.7, "base_encoder": None}
    out = root / "models/export"
    artifacts.write_float32(model, tok, out, meta)
    artifacts.write_onnx(out, model, tok, meta)
    artifacts.write_onnx_int8(out)
    artifacts.write_openvino_int8(out, tok, make_split("train", 10)["text"].tolist(), 32, seed=5)
    texts = make_split("test", 4)["text"].tolist() + ["", "x " * 300, "Émoji 🙂 and ÜNICODE"]
    return root, out, meta, texts


def run_isolated(root, folder_variant: str, texts, tmp_path, meta):
    from domaintune.export.modelcard import usage_section

    card = "\n".join(usage_section(meta, ["float32", folder_variant]))
    snippet = card.split("```python\n")[2].split("```")[0]  # the no-domaintune one
    (tmp_path / "snippet.py").write_text(snippet)
    (tmp_path / "run.py").write_text(ISOLATED)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    r = subprocess.run([sys.executable, "-I", str(tmp_path / "run.py"), str(root), str(tmp_path / "texts.json"),
                        str(tmp_path / "snippet.py"), str(tmp_path / "probs.npy")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(tmp_path / "probs.npy"), json.loads(r.stdout.strip().splitlines()[-1])["labels"]


@pytest.mark.parametrize("variant, tol_own, tol_float", [("onnx", 1e-5, 1e-5), ("onnx-int8", 1e-5, 0.1),
                                                       ("openvino-int8", 1e-4, 0.1)])
def test_onnx_runs_without_domaintune_and_matches_predictor(onnx_export, tmp_path, variant, tol_own, tol_float):
    from domaintune.evaluate.calibration import softmax
    from domaintune.predict.predictor import Predictor

    root, out, meta, texts = onnx_export
    probs, labels = run_isolated(root, variant, texts, tmp_path, meta)
    own = Predictor.load(out, variant=variant).predict_proba(texts)
    ref = Predictor.load(out).predict_proba(texts)  # float32 PyTorch
    np.testing.assert_allclose(probs, own, atol=tol_own)
    np.testing.assert_allclose(probs, ref, atol=tol_float)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert labels == [LABELS[i] for i in own.argmax(1)]
    # The temperature is inside the graph: probabilities are softmax(logits / T), not softmax(logits).
    logits = Predictor.load(out, variant=variant).logits(texts)
    np.testing.assert_allclose(probs, softmax(logits, 1.7), atol=tol_own)
    assert np.abs(softmax(logits, 1.0) - probs).max() > 1e-3


def test_onnx_folder_is_self_describing(onnx_export):
    root, out, meta, _ = onnx_export
    for variant, file in (("onnx", "model.onnx"), ("onnx-int8", "model.onnx"), ("openvino-int8", "model.xml")):
        d = out / variant
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "bert" and cfg["id2label"] == {str(i): lab for i, lab in enumerate(LABELS)}
        assert cfg["label2id"] == {lab: i for i, lab in enumerate(LABELS)} and "architectures" not in cfg
        assert cfg["domaintune"]["temperature"] == 1.7 and cfg["domaintune"]["max_length"] == 32
        assert (d / "tokenizer.json").is_file() and (d / file).is_file() and cfg["domaintune"]["file"] == file
    import onnx

    graph = onnx.load(str(out / "onnx/model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["probabilities", "logits"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]  # dynamic batch and sequence axes
    ops = {n.op_type for n in onnx.load(str(out / "onnx-int8/model.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}



def test_openvino_int8_is_static_int8_calibrated_on_the_given_train_texts(onnx_export):
    """The IR holds FakeQuantize nodes (static activation ranges, not dynamic ones), inputs and outputs are the
    ONNX graph's, and config.json records the calibration: the train split, how many texts, the seed."""
    import openvino as ov

    _, out, _, _ = onnx_export
    d = out / "openvino-int8"
    model = ov.Core().read_model(str(d / "model.xml"))
    assert [i.get_any_name() for i in model.inputs] == ["input_ids", "attention_mask"]
    assert [o.get_any_name() for o in model.outputs] == ["probabilities", "logits"]
    ops = [op.get_type_name() for op in model.get_ops()]
    assert ops.count("FakeQuantize") >= 12  # every MatMul of 2 layers (q, k, v, out, 2 FFN) gets its inputs' ranges
    q = json.loads((d / "config.json").read_text())["domaintune"]["quantization"]
    assert q["static"] and q["tool"] == "nncf.quantize" and q["model_type"] == "transformer"
    assert q["calibration"] == {"split": "train", "rows": 30, "seed": 5}  # 10 per class, 3 classes
    assert (d / "model.bin").stat().st_size > 0


def test_openvino_runner_keeps_one_infer_request_per_thread_and_copies_its_outputs(onnx_export):
    """A thread's calls reuse its InferRequest (one per call cost 0.85 ms of a 2.2 ms single text), another thread
    gets its own (a request is not thread-safe), and each call's logits are its own arrays: the request's output
    buffers, reused by the next call, are copied out. The answers equal a fresh request's."""
    import threading

    from domaintune.export.artifacts import load_variant
    from domaintune.predict.predictor import Predictor

    _, out, _, texts = onnx_export
    runner, _ = load_variant(out, "openvino-int8")
    created = []
    real = runner.compiled

    class Counting:  # the compiled model, counting the requests made of it
        outputs = real.outputs

        def create_infer_request(self):
            created.append(threading.get_ident())
            return real.create_infer_request()

    runner.compiled = Counting()
    first = runner.logits(texts[:1], 8, 32)
    second = runner.logits(texts[1:3], 8, 32)
    many = runner.logits(texts, 2, 32)  # several batches, one request
    assert len(created) == 1
    fresh = Predictor.load(out, variant="openvino-int8")
    np.testing.assert_allclose(first, fresh.logits(texts[:1]), atol=1e-5)  # not overwritten by the later calls
    np.testing.assert_allclose(second, fresh.logits(texts[1:3]), atol=1e-5)
    np.testing.assert_allclose(many, fresh.logits(texts), atol=1e-4)
    other = threading.Thread(target=lambda: runner.logits(texts[:2], 8, 32))
    other.start()
    other.join()
    assert len(created) == 2 and created[1] != created[0]


def test_calibration_sample_is_seeded_and_drawn_from_the_given_texts():
    from domaintune.export.artifacts import calibration_texts

    texts = [f"train text {i}" for i in range(1000)]
    a = calibration_texts(texts, 300, seed=7)
    assert a == calibration_texts(texts, 300, seed=7) and len(set(a)) == 300 and set(a) <= set(texts)
    assert a != calibration_texts(texts, 300, seed=8)
    assert calibration_texts(texts[:20], 300, seed=7) == texts[:20]  # fewer than asked: all of them


def test_onnx_predictor_refuses_embeddings(onnx_export):
    from domaintune.predict.predictor import Predictor

    _, out, _, texts = onnx_export
    with pytest.raises(ValueError, match="use variant float32 for text embeddings"):
        Predictor.load(out, variant="onnx").logits(texts, mean_pooled=True)


def test_onnx_sessions_use_the_inference_thread_count(onnx_export, monkeypatch):
    """onnxruntime's intra-op pool is core.device.inference_threads (the cgroup quota caps the affinity), inter-op 1."""
    from domaintune.core import device
    from domaintune.export.artifacts import load_variant

    _, out, _, _ = onnx_export
    monkeypatch.setattr(device, "_affinity_cores", lambda: 8)
    monkeypatch.setattr(device, "_cpu_quota", lambda: "100000 100000")  # one CPU of quota
    runner, _ = load_variant(out, "onnx-int8")
    opts = runner.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)


def test_writing_openvino_int8_turns_openvino_telemetry_off(onnx_export, tmp_path, monkeypatch):
    """openvino_telemetry consents by default when no consent file exists, and NNCF sends usage events through
    its one Telemetry object: writing the variant leaves that object without consent (outside pytest NNCF uses
    it; inside, NNCF swaps in a stub, so the object itself is checked)."""
    import shutil

    import openvino  # noqa: F401  (creates the Telemetry singleton)
    from openvino_telemetry import Telemetry

    from domaintune.export import artifacts

    _, out, _, _ = onnx_export
    shutil.copytree(out / "onnx", tmp_path / "onnx")
    monkeypatch.setattr(Telemetry(), "consent", True)
    artifacts.write_openvino_int8(tmp_path, _tokenizer(out), ["a text", "another text"], 32, seed=0)
    assert Telemetry().consent is False


def _tokenizer(out):
    from domaintune.modeling.encoders import load_tokenizer

    return load_tokenizer(str(out / "onnx"))


@pytest.fixture(scope="module")
def abstaining_export(tiny_bert, tmp_path_factory):
    """An export that abstains by Mahalanobis distance (the score that needs the text vector): float32, onnx,
    onnx-int8 and openvino-int8 written as the export stage writes them, after evaluate's abstention."""
    from domaintune.core.io import read_json
    from domaintune.export import artifacts
    from domaintune.modeling.encoders import load_classifier

    root = tmp_path_factory.mktemp("onnx_abstain")
    ft = make_model(tiny_bert, root / "ft", seed=4)
    model, tok, meta = load_classifier(ft)
    meta = {**{k: v for k, v in meta.items() if k not in ("adapter", "num_labels", "hidden_size")},
            "temperature": 1.3, "base_encoder": None}
    out = root / "models/export"
    artifacts.write_float32(model, tok, out, meta)
    train = make_split("train", 8)
    add_abstention(out, train["text"].tolist(), train["label"].tolist(), make_split("validation", 6)["text"].tolist(),
                   method="mahalanobis", recall=0.8)
    meta = read_json(out / "model.json")
    artifacts.write_onnx(out, model, tok, meta)
    artifacts.write_onnx_int8(out)
    artifacts.write_openvino_int8(out, tok, train["text"].tolist()[:10], 32, seed=5)
    return root, out, meta, make_split("test", 4)["text"].tolist() + OOS_TEXTS


@pytest.mark.parametrize("variant", ["onnx", "onnx-int8", "openvino-int8"])
def test_onnx_abstains_exactly_where_predictor_does(abstaining_export, tmp_path, variant):
    """The card's no-domaintune snippet (onnxruntime / OpenVINO + safetensors + numpy) abstains on exactly the
    texts Predictor abstains on, for the variant and for float32; the graph carries the pooled vector."""
    from domaintune.predict.predictor import Predictor

    root, out, meta, texts = abstaining_export
    probs, labels = run_isolated(root, variant, texts, tmp_path, meta)
    snippet = np.load(tmp_path / "probs.npy.abstained.npy")
    own = Predictor.load(out, variant=variant)
    own_probs, own_abstained = own.predict_with_abstention(texts)
    _, ref_abstained = Predictor.load(out).predict_with_abstention(texts)
    assert own.abstainer.method == "mahalanobis" and own.abstainer.label == "out_of_scope"
    assert snippet.tolist() == own_abstained.tolist()
    if variant == "onnx":  # the float graph: the same vectors as PyTorch up to float rounding
        assert own_abstained.tolist() == ref_abstained.tolist()
    assert 0 < own_abstained.sum() < len(texts)  # some texts answered, some not: the comparison means something
    assert labels == own.labels_with_abstention(own_probs, own_abstained)
    cfg = json.loads((out / variant / "config.json").read_text())
    assert cfg["domaintune"]["outputs"] == ["probabilities", "logits", "pooled"]
    assert cfg["domaintune"]["abstain"] == meta["abstain"] and (out / variant / "abstain.safetensors").is_file()


@pytest.fixture(scope="module", params=[("chunks", "logsumexp"), ("head_tail", "mean")], ids=lambda p: p[0])
def long_export(request, onnx_export, tmp_path_factory):
    """The tiny classifier exported as a model that reads long documents (model.json long_text)."""
    from domaintune.export import artifacts
    from domaintune.modeling.encoders import load_classifier

    root0, _, meta0, _ = onnx_export
    mode, pooling = request.param
    model, tok, _ = load_classifier(root0 / "ft")
    meta = {**meta0, "long_text": {"mode": mode, "chunk_overlap": 8, "max_chunks": 4, "pooling": pooling}}
    root = tmp_path_factory.mktemp(f"onnx_{mode}")
    out = root / "models/export"
    artifacts.write_float32(model, tok, out, meta)
    artifacts.write_onnx(out, model, tok, meta)
    texts = make_split("test", 2)["text"].tolist() + ["", "refund " * 50 + "password", "x " * 300,
                                                      " ".join(make_split("train", 4)["text"])]
    return root, out, meta, texts


def test_onnx_snippet_reads_long_documents_as_predictor_does_without_domaintune(long_export, tmp_path):
    """The card's snippet cuts each document into the inputs the model was trained on (chunks: windows, at most
    max_chunks; head_tail: first and last tokens), runs the graph per input and pools: the same calibrated
    probabilities as Predictor (ONNX and float32), in a process that cannot import domaintune."""
    from domaintune.modeling import chunks as C
    from domaintune.predict.predictor import Predictor

    root, out, meta, texts = long_export
    p = Predictor.load(out, variant="onnx")
    assert C.encode(p.tokenizer, texts, 32, p.long_text).dropped.max() > 0  # a document longer than it reads
    probs, labels = run_isolated(root, "onnx", texts, tmp_path, meta)
    own = p.predict_proba(texts)
    assert own.shape == (len(texts), len(LABELS))
    np.testing.assert_allclose(probs, own, atol=1e-5)
    np.testing.assert_allclose(probs, Predictor.load(out).predict_proba(texts), atol=1e-5)
    assert labels == [LABELS[i] for i in own.argmax(1)]
    # reading the document whole (or head and tail) is not what truncation gives
    truncated = Predictor.load(out, variant="onnx")
    truncated.long_text = C.LongText()
    assert np.abs(truncated.predict_proba(texts) - own).max() > 1e-4
    cfg = json.loads((out / "onnx/config.json").read_text())["domaintune"]["long_text"]
    assert cfg["mode"] == meta["long_text"]["mode"] and cfg["prefix_ids"] == [101] and cfg["suffix_ids"] == [102]


def test_onnx_abstains_where_predictor_does_with_the_trained_detector(abstaining_export, tmp_path):
    """evaluate.abstain.method trained: the detector's coef and intercept (abstain.safetensors) on the same `pooled`
    output; the card's no-domaintune snippet abstains exactly where Predictor does (the graph is the Mahalanobis
    export's: both scores read the pooled vector, so only the stored abstention changes)."""
    import shutil

    from domaintune.core.io import read_json, write_json
    from domaintune.predict.predictor import Predictor

    root, out, _, texts = abstaining_export
    new_root = tmp_path / "root"
    new_out = new_root / "models/export"
    shutil.copytree(out, new_out, ignore=shutil.ignore_patterns("onnx-int8", "openvino-int8"))
    train = make_split("train", 8)
    entry = add_abstention(new_out, train["text"].tolist(), train["label"].tolist(),
                           make_split("validation", 6)["text"].tolist(), method="trained", recall=0.8,
                           oos_texts=OOS_TEXTS[:4])
    assert entry["method"] == "trained"
    cfg = read_json(new_out / "onnx/config.json")
    cfg["domaintune"]["abstain"] = entry
    write_json(new_out / "onnx/config.json", cfg)
    shutil.copy(new_out / "abstain.safetensors", new_out / "onnx/abstain.safetensors")
    meta = read_json(new_out / "model.json")
    _, labels = run_isolated(new_root, "onnx", texts, tmp_path, meta)
    snippet = np.load(tmp_path / "probs.npy.abstained.npy")
    own = Predictor.load(new_out, variant="onnx")
    own_probs, own_abstained = own.predict_with_abstention(texts)
    _, ref_abstained = Predictor.load(new_out).predict_with_abstention(texts)
    assert own.abstainer.method == "trained" and own.abstainer.coef.shape == (64,)
    assert snippet.tolist() == own_abstained.tolist() == ref_abstained.tolist()
    assert 0 < own_abstained.sum() < len(texts)  # some texts answered, some not: the comparison means something
    assert labels == own.labels_with_abstention(own_probs, own_abstained)


@pytest.mark.parametrize("method", ["mahalanobis", "trained"])
def test_long_document_snippet_abstains_where_predictor_does(onnx_export, tmp_path, method):
    """base.long_text chunks with a score that reads the text vector: the card's no-domaintune snippet runs the
    graph per window, takes each document's vector as the mean of its windows' `pooled` outputs (as Predictor
    does) and abstains on exactly the documents Predictor abstains on. (Before, the long-document snippet had
    abstention for max_prob and energy only.)"""
    from domaintune.core.io import read_json
    from domaintune.export import artifacts
    from domaintune.export.modelcard import usage_section
    from domaintune.modeling.encoders import load_classifier
    from domaintune.predict.predictor import Predictor

    root0, _, meta0, _ = onnx_export
    model, tok, _ = load_classifier(root0 / "ft")
    root = tmp_path / "root"
    out = root / "models/export"
    artifacts.write_float32(model, tok, out, {**meta0, "long_text": {"mode": "chunks", "chunk_overlap": 8,
                                                                      "max_chunks": 4, "pooling": "mean"}})
    train = make_split("train", 8)
    add_abstention(out, train["text"].tolist(), train["label"].tolist(), make_split("validation", 6)["text"].tolist(),
                   method=method, recall=0.8, oos_texts=OOS_TEXTS[:4] if method == "trained" else None)
    meta = read_json(out / "model.json")
    artifacts.write_onnx(out, model, tok, meta)
    texts = (make_split("test", 3)["text"].tolist() + OOS_TEXTS
             + [" ".join(make_split("train", 4)["text"]), "refund " * 50 + "password"])
    own = Predictor.load(out, variant="onnx")
    assert own.long_text.mode == "chunks" and own.abstainer.method == method
    assert len(own.tokenizer(texts[-2], add_special_tokens=False)["input_ids"]) > 32  # read as windows
    assert "pooled = np.stack(vectors)" in "\n".join(usage_section(meta, ["float32", "onnx"]))
    _, labels = run_isolated(root, "onnx", texts, tmp_path, meta)
    snippet = np.load(tmp_path / "probs.npy.abstained.npy")
    own_probs, own_abstained = own.predict_with_abstention(texts)
    assert snippet.tolist() == own_abstained.tolist()
    assert 0 < own_abstained.sum() < len(texts)  # some documents answered, some not: the comparison means something
    assert labels == own.labels_with_abstention(own_probs, own_abstained)
