"""Exported model variants: the one place that writes and loads each of them.

An export folder (models/export/, written by stages/export.py) holds:
  model.json, tokenizer/, head.safetensors, encoder/   float32: the calibrated classifier
                       (encoder/encoder.safetensors, not model.safetensors, so transformers'
                       from_pretrained fails loudly instead of loading a random head)
  int8/                weight-only int8 safetensors (domaintune/modeling/quantize.py), dequantised on load
  onnx/                the whole calibrated classifier in one ONNX graph: input_ids +
                       attention_mask in; probabilities (calibrated) and logits out. With
                       config.json (id2label, label2id, model_type) and the tokenizer files,
                       so onnxruntime + tokenizers run it without domaintune.
  onnx-int8/           onnxruntime dynamic int8 quantisation of onnx/
  openvino-int8/       OpenVINO IR (model.xml + model.bin) of onnx/'s graph, static int8 by NNCF post-training
                       quantisation calibrated on a seeded sample of train texts; config.json and tokenizer as onnx/
  abstain.safetensors  evaluate.abstain by Mahalanobis distance: class means and precision; or by the trained
                       detector: its coef and intercept (also in int8/, onnx/,
                       onnx-int8/, openvino-int8/); the ONNX/OpenVINO graphs then add a third output, `pooled`
                       (the mean-pooled text vector the distance is measured on), and config.json says `abstain`
  checksums.json       the md5 of every other file, written last by the export stage (either task);
                       `verify_checksums` checks them when domaintune.tasks.load_predictor opens the export
`load_variant(folder, variant)` returns a runner with `.logits(texts, batch_size, max_length, mean_pooled,
max_batch_tokens)` for any of them, batched by modeling.encoders.TokenBatches (the same batches for every
runner); domaintune.predict.predictor.Predictor adds the calibration on top.
Imports point one way: predict -> artifacts -> modeling, quantize.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from domaintune.core import device as devices
from domaintune.core.errors import DataError
from domaintune.core.io import read_json, write_json
from domaintune.evaluate.abstain import ARRAYS_FILE as ABSTAIN_ARRAYS
from domaintune.evaluate.abstain import FEATURE_METHODS
from domaintune.export.variants import canonical_variant
from domaintune.modeling.chunks import LongText, special_tokens
from domaintune.modeling.encoders import TokenBatches, load_tokenizer, predict_logits, save_classifier
from domaintune.modeling.quantize import QUANT_SCHEME, save_int8_encoder

SUBDIRS = {"float32": None, "int8": "int8", "onnx": "onnx", "onnx-int8": "onnx-int8", "openvino-int8": "openvino-int8"}
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"  # with its weights in model.bin beside it
ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OUTPUTS = ("probabilities", "logits")
POOLED_OUTPUT = "pooled"  # a third output, only for Mahalanobis abstention (graph_outputs)
CHECKSUMS = "checksums.json"
WRITTEN_BY = "the export stage writes it (`dvc repro export`)"
STAGE_RECORDS = ("export_report.json", "export_info.json")  # what the export stage of each task writes
log = logging.getLogger("domaintune")


def variant_dir(folder: str | os.PathLike, variant: str) -> Path:
    sub = SUBDIRS[canonical_variant(variant)]
    return Path(folder) / sub if sub else Path(folder)


def variant_bytes(folder: str | os.PathLike, variant: str) -> int:
    """Bytes of the variant's weights (what a server loads)."""
    variant = canonical_variant(variant)
    d = variant_dir(folder, variant)
    if variant == "float32":
        files = list((d / "encoder").glob("*.safetensors")) + [d / "head.safetensors"]
    elif variant == "int8":
        files = list(d.rglob("*.safetensors"))
    elif variant == "openvino-int8":
        files = [d / OPENVINO_FILE, (d / OPENVINO_FILE).with_suffix(".bin")]
    else:
        files = [d / ONNX_FILE] + list(d.glob(f"{ONNX_FILE}.data"))
    return int(sum(f.stat().st_size for f in files if f.is_file()))


def model_file(variant: str) -> str:
    """The file of a variant that loading it opens (model.json for the PyTorch ones)."""
    variant = canonical_variant(variant)
    if variant in ("float32", "int8"):
        return "model.json"
    return OPENVINO_FILE if variant == "openvino-int8" else ONNX_FILE


def thread_count() -> int:
    """The inference pool's size, the one rule for torch and onnxruntime (core.device.inference_threads)."""
    return devices.inference_threads()


# ---------------------------------------------------------------- writers
def write_float32(model, tokenizer, out: Path, meta: dict) -> None:
    save_classifier(model, tokenizer, out, meta, exported=True)


def write_int8(out: Path, model, meta: dict, embeddings: bool) -> dict:
    """int8/ next to a written float32 export: int8 encoder, the same head, tokenizer and meta."""
    qdir = out / SUBDIRS["int8"]
    qinfo = save_int8_encoder(model.encoder, qdir / "encoder", embeddings)
    shutil.copy2(out / "head.safetensors", qdir / "head.safetensors")
    shutil.copytree(out / "tokenizer", qdir / "tokenizer")
    write_json(qdir / "model.json", {**meta, "quantization": {"scheme": QUANT_SCHEME, "embeddings": embeddings,
                                                              **qinfo}})
    copy_abstain_arrays(out, qdir)
    return qinfo


def graph_outputs(meta: dict) -> tuple[str, ...]:
    """The ONNX graph's outputs: probabilities and logits, and the mean-pooled text vector (`pooled`) when the
    model abstains by Mahalanobis distance or the trained detector (their scores need the vector;
    domaintune/evaluate/abstain.py)."""
    wants_vector = (meta.get("abstain") or {}).get("method") in FEATURE_METHODS
    return ONNX_OUTPUTS + ((POOLED_OUTPUT,) if wants_vector else ())


def _calibrated_graph(model, meta: dict):
    import torch

    multi = meta.get("problem_type", "single_label") == "multi_label"
    temperature = float(meta.get("temperature") or 1.0)
    pooled = POOLED_OUTPUT in graph_outputs(meta)

    class CalibratedClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            if pooled:
                logits, vector = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                            return_mean_pooled=True)
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask)
            probs = torch.sigmoid(logits) if multi else torch.softmax(logits / temperature, dim=-1)
            return (probs, logits, vector) if pooled else (probs, logits)

    return CalibratedClassifier().eval()


def onnx_config(encoder_config, meta: dict) -> dict:
    """config.json of an ONNX folder: the encoder's config + labels + how to read the outputs."""
    cfg = encoder_config.to_dict()
    cfg.pop("architectures", None)  # no transformers class can load this folder's weights
    labels = list(meta["labels"])
    cfg.update({
        "id2label": {str(i): lab for i, lab in enumerate(labels)},
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "num_labels": len(labels),
        "problem_type": "multi_label_classification" if meta.get("problem_type") == "multi_label"
        else "single_label_classification",
        "domaintune": {
            "format": "onnx", "file": ONNX_FILE, "inputs": list(ONNX_INPUTS), "outputs": list(graph_outputs(meta)),
            "probabilities": "sigmoid(logits)" if meta.get("problem_type") == "multi_label"
            else "softmax(logits / temperature)",
            "temperature": meta.get("temperature"), "thresholds": meta.get("thresholds"),
            "pooling": meta.get("pooling"), "max_length": meta.get("max_length"),
            # documents longer than max_length (modeling/chunks.py; the model card's snippet): the graph runs
            # per input, and under mode chunks a document's logits are its chunks' logits pooled by `pooling`
            "long_text": LongText.from_meta(meta).as_meta(),
        },
    })
    if meta.get("abstain"):  # evaluate.abstain: the score, its threshold and the label to answer below it
        cfg["domaintune"]["abstain"] = meta["abstain"]
    return cfg


def copy_abstain_arrays(src: Path, dest: Path) -> None:
    """abstain.safetensors (Mahalanobis class means and precision) into a variant's folder, when there is one."""
    if (src / ABSTAIN_ARRAYS).is_file() and src.resolve() != dest.resolve():
        shutil.copy2(src / ABSTAIN_ARRAYS, dest / ABSTAIN_ARRAYS)


def long_text_config(tokenizer, meta: dict) -> dict:
    """onnx_config's long_text with the special-token ids one input starts and ends with (so the snippet cuts
    documents into inputs with tokenizers alone)."""
    prefix, suffix = special_tokens(tokenizer)
    return {**LongText.from_meta(meta).as_meta(), "prefix_ids": prefix, "suffix_ids": suffix}


def write_onnx(out: Path, model, tokenizer, meta: dict, opset: int = 17) -> Path:
    """onnx/: the calibrated classifier as one graph with dynamic batch and sequence axes."""
    import torch

    d = out / SUBDIRS["onnx"]
    d.mkdir(parents=True, exist_ok=True)
    # Trace with a padded batch, so the attention-mask path is in the graph.
    enc = tokenizer(["a longer example text for tracing the graph", "short"], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    outputs = graph_outputs(meta)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            **{name: {0: "batch"} for name in outputs}}
    # Traced with eager attention: plain MatMul/Softmax nodes, which onnxruntime ran 5% (float32) and
    # 10% (dynamic int8) faster than the traced SDPA graph on the BANKING77 model, same outputs within
    # 1e-6 (measured side by side on the AVX512 Xeon; the model keeps its own attention afterwards).
    enc = model.encoder
    attn = getattr(enc.config, "_attn_implementation", None)
    swap = attn not in (None, "eager") and hasattr(enc, "set_attn_implementation")
    if swap:
        enc.set_attn_implementation("eager")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about Python bools in the mask code
            torch.onnx.export(_calibrated_graph(model, meta), args, str(d / ONNX_FILE),
                              input_names=list(ONNX_INPUTS), output_names=list(outputs), dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
    finally:
        if swap:
            enc.set_attn_implementation(attn)
    cfg = onnx_config(model.encoder.config, meta)
    cfg["domaintune"]["long_text"] = long_text_config(tokenizer, meta)
    write_json(d / "config.json", cfg)
    tokenizer.save_pretrained(d)
    copy_abstain_arrays(out, d)
    return d


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def write_onnx_int8(out: Path, per_channel: bool = True) -> Path:
    """onnx-int8/: onnxruntime dynamic quantisation (int8 weights, int8 activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, d = out / SUBDIRS["onnx"], out / SUBDIRS["onnx-int8"]
    d.mkdir(parents=True, exist_ok=True)
    # quantize_dynamic logs a root-level WARNING suggesting ORT's pre-processing (shape inference + graph
    # optimisation) on every call. Dynamic quantisation does not need it (the export gates re-check the
    # accuracy of what it writes), so that one advice line is dropped, not the logger.
    advice = _DropMessage("Please consider to run pre-processing before quantization")
    logging.getLogger().addFilter(advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(src / ONNX_FILE, d / ONNX_FILE, per_channel=per_channel, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().removeFilter(advice)
    for f in src.iterdir():
        if f.name not in (ONNX_FILE, f"{ONNX_FILE}.data") and f.is_file():
            shutil.copy2(f, d / f.name)
    cfg = read_json(d / "config.json")
    cfg["domaintune"]["quantization"] = {"tool": "onnxruntime.quantization.quantize_dynamic",
                                         "weight_type": "QInt8", "per_channel": per_channel}
    write_json(d / "config.json", cfg)
    return d


def calibration_texts(texts: Sequence[str], rows: int, seed: int) -> list[str]:
    """The static int8 variants' calibration sample: `rows` train texts (all of them when fewer), drawn without
    replacement by a generator seeded with base.seed, so the same data and seed calibrate the same way."""
    texts = list(texts)
    if len(texts) <= rows:
        return texts
    pick = np.random.default_rng(seed).choice(len(texts), size=rows, replace=False)
    return [texts[i] for i in sorted(pick)]


def _telemetry_off() -> None:
    """NNCF sends usage events to Google Analytics unless a consent file says no (openvino_telemetry's default
    when no file exists is consent). domaintune sends nothing: the process's one Telemetry object (a singleton)
    is told there is no consent, without writing the user's consent file."""
    try:
        from openvino_telemetry import Telemetry
    except ImportError:  # not installed: nothing to send with
        return
    try:
        Telemetry().consent = False
    except RuntimeError:  # no instance yet (it raises rather than create one without an app name): none to stop
        pass


def write_openvino_int8(out: Path, tokenizer, texts: Sequence[str], max_length: int, seed: int) -> Path:
    """openvino-int8/: onnx/'s float graph (pooling, head and temperature inside) read by OpenVINO, then static
    int8 by NNCF post-training quantisation (transformer model type: mixed preset, fast bias correction), its
    activation ranges measured on `texts` (calibration_texts of the train split), one text per step at its own
    length. SmoothQuant is off: on the test suite's tiny model it moved one text's calibrated probabilities by
    0.53 against float32 (0.04 without it). Nothing is kept in float beyond NNCF's transformer defaults (no
    ignored scope); config.json records all of it."""
    import openvino as ov

    _telemetry_off()
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    _telemetry_off()  # again: importing nncf creates the Telemetry object if it did not exist
    texts = list(texts)
    if not texts:
        raise ValueError("openvino-int8 needs calibration texts (the train split is empty)")
    src, d = out / SUBDIRS["onnx"], out / SUBDIRS["openvino-int8"]
    d.mkdir(parents=True, exist_ok=True)
    items = []
    for t in texts:
        enc = tokenizer([t], truncation=True, max_length=max_length, return_tensors="np")
        items.append({k: enc[k].astype(np.int64) for k in ONNX_INPUTS})
    # Core.read_model is ov.convert_model's ONNX frontend without the converter's usage telemetry.
    model = ov.Core().read_model(str(src / ONNX_FILE))
    level = logging.getLogger("nncf").level
    nncf.set_log_level(logging.ERROR)  # no advice lines in the stage's log ...
    try:  # ... and no progress bars (rich, on stdout) in its output
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(items), advanced_parameters=AdvancedQuantizationParameters(
                                          smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
    finally:
        nncf.set_log_level(level)
    ov.save_model(quantized, str(d / OPENVINO_FILE), compress_to_fp16=False)
    for f in src.iterdir():
        if f.name not in (ONNX_FILE, f"{ONNX_FILE}.data") and f.is_file():
            shutil.copy2(f, d / f.name)
    cfg = read_json(d / "config.json")
    cfg["domaintune"].update({"format": "openvino", "file": OPENVINO_FILE})
    cfg["domaintune"]["quantization"] = {
        "tool": "nncf.quantize", "nncf": nncf.__version__, "openvino": ov.get_version(), "static": True,
        "model_type": "transformer", "smooth_quant": False,
        "calibration": {"split": "train", "rows": len(items), "seed": seed},
        "kept_in_float": "nothing beyond NNCF's transformer defaults (no ignored scope)"}
    write_json(d / "config.json", cfg)
    return d


# ---------------------------------------------------------------- checksums
def _md5(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def write_checksums(folder: str | os.PathLike) -> int:
    """checksums.json: {"algorithm": "md5", "files": {relpath: md5}} for every file of the export folder
    (the export stage's last write, for either task). Returns the number of files listed."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _md5(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p != folder / CHECKSUMS}
    write_json(folder / CHECKSUMS, {"algorithm": "md5", "files": files})
    return len(files)


def verify_checksums(folder: str | os.PathLike, wanted: Callable[[str], bool] = lambda rel: True) -> int | None:
    """Check the files of an export that checksums.json lists (those `wanted(relpath)` accepts) against their
    md5: a missing or changed file is a DataError naming it (one line). Returns the files checked, or None
    when the folder has no checksums.json (an export written before domaintune recorded them; logged)."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not path.is_file():
        if any((folder / f).is_file() for f in STAGE_RECORDS):  # the export stage wrote it, before checksums
            log.warning("%s: no %s (exported before domaintune recorded checksums), so its files are not "
                        "verified; re-run the export stage to add one", folder, CHECKSUMS)
        return None
    try:
        files = read_json(path).get("files")
    except (ValueError, AttributeError):
        files = None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise DataError(path, None, "files", 'not a checksums file ({"files": {relpath: md5}}); '
                        "re-run the export stage")
    checked = 0
    for rel, md5 in files.items():
        if not wanted(rel):
            continue
        f = folder / rel
        if not f.is_file():
            raise DataError(f, None, None, f"missing (listed in {CHECKSUMS}); {WRITTEN_BY}")
        if _md5(f) != md5:
            raise DataError(f, None, None, f"md5 differs from {CHECKSUMS} (the file changed after the export "
                            "stage wrote it); re-run the export stage or restore the file")
        checked += 1
    return checked


def variant_reads(variant: str) -> Callable[[str], bool]:
    """Which files of an export (relpaths) loading `variant` reads: float32 everything outside the other
    variants' folders; the others their own folder and the top-level files (model.json)."""
    variant = canonical_variant(variant)
    own = SUBDIRS[variant]
    others = {sub for sub in SUBDIRS.values() if sub and sub != own}
    if own is None:
        return lambda rel: rel.split("/", 1)[0] not in others
    return lambda rel: "/" not in rel or rel.split("/", 1)[0] == own


def check_variant_parts(folder: str | os.PathLike, variant: str) -> None:
    """The folders and files loading `variant` needs are there, else a DataError naming the first missing one
    and the stage that writes it (instead of the model hub's "Repo id must be ..." for a missing tokenizer/)."""
    variant = canonical_variant(variant)
    folder = Path(folder)
    d = variant_dir(folder, variant)
    if variant in ("float32", "int8"):
        meta = read_json(d / "model.json")
        weights = d / (meta["adapter"] if meta.get("adapter") else "encoder")
        parts = [d / "tokenizer", d / "head.safetensors", weights]
    else:
        parts = [folder / "model.json", d / "config.json", d / "tokenizer_config.json"]
    for part in parts:
        if not part.exists():
            raise DataError(part, None, None, f"missing; {WRITTEN_BY}, or give the export folder")


# ---------------------------------------------------------------- loaders
class TorchRunner:
    """A PyTorch classifier (float32, or int8 dequantised on load)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def logits(self, texts: Sequence[str], batch_size: int, max_length: int, mean_pooled: bool = False,
               max_batch_tokens: int | None = None, long_text: LongText | None = None):
        return predict_logits(self.model, self.tokenizer, list(texts), batch_size, max_length, mean_pooled,
                              max_batch_tokens, long_text)


class OnnxRunner:
    """An ONNX graph under onnxruntime; logits from the graph's `logits` output."""

    model = None

    def __init__(self, session, tokenizer, num_labels: int):
        self.session, self.tokenizer, self.num_labels = session, tokenizer, num_labels

    def logits(self, texts: Sequence[str], batch_size: int, max_length: int, mean_pooled: bool = False,
               max_batch_tokens: int | None = None, long_text: LongText | None = None):
        """Logits per document: the graph runs per model input (a chunk, with `long_text` chunks) and the
        inputs' logits are pooled here (modeling.chunks.pool_logits), as the model card's snippet does.
        mean_pooled=True: (logits, the graph's `pooled` vectors, a document's being the mean over its inputs),
        for a graph that has that output (an export that abstains by Mahalanobis distance)."""
        if mean_pooled and POOLED_OUTPUT not in self.outputs():
            raise ValueError(f"this {self.kind} graph outputs probabilities and logits only (it has a `pooled` "
                             "output only for Mahalanobis abstention); use variant float32 for text embeddings")
        batches = TokenBatches(self.tokenizer, list(texts), max_length, batch_size, max_batch_tokens, long_text)
        out = np.zeros((len(batches.lengths), self.num_labels), dtype=np.float32)
        vectors = None
        infer = self._infer(mean_pooled)
        for idx, enc in batches:
            got = infer({k: enc[k] for k in ONNX_INPUTS})
            out[idx] = got[0]
            if mean_pooled:
                if vectors is None:
                    vectors = np.zeros((len(batches.lengths), got[1].shape[1]), dtype=np.float32)
                vectors[idx] = got[1]
        if mean_pooled:
            if vectors is None:
                return batches.documents(out), np.zeros((0, 0), dtype=np.float32)
            return batches.documents(out), batches.documents(vectors, "mean")
        return batches.documents(out)

    kind = "ONNX"

    def outputs(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def _infer(self, pooled: bool = False):
        """feed -> [logits] (+ pooled) for one call of logits()."""
        names = ["logits", POOLED_OUTPUT] if pooled else ["logits"]
        return lambda feed: self.session.run(names, feed)


class OpenVinoRunner(OnnxRunner):
    """An OpenVINO IR on the CPU plugin; the same inputs and `logits` output as the ONNX graph it came from.

    Each thread keeps one InferRequest for the runner's life (a request is not thread-safe; serve's infer and
    shadow threads, export's timing each get their own), and runs it on the batch's arrays in place
    (share_inputs) and reads back only the outputs asked for, copied out of the request's buffers
    (share_outputs): a request per call and OpenVINO's default copies of every input and output cost 0.85 ms
    of a 2.2 ms single text on BANKING77's MiniLM (p50, measured side by side on the 2-core AMD EPYC; the stages
    of a single text: bench/results/inference.json "batch_1_stages")."""

    def __init__(self, compiled, tokenizer, num_labels: int):
        self.compiled, self.tokenizer, self.num_labels = compiled, tokenizer, num_labels
        self._local = threading.local()

    kind = "OpenVINO"

    def outputs(self) -> list[str]:
        return [o.get_any_name() for o in self.compiled.outputs]

    def request(self):
        """This thread's InferRequest (created on its first call)."""
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def _infer(self, pooled: bool = False):
        request = self.request()
        names = ["logits", POOLED_OUTPUT] if pooled else ["logits"]

        def run(feed):
            # the request reads the batch's (contiguous int64) arrays in place; its output buffers are reused by
            # the next call, hence the copies
            request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()}, share_inputs=True,
                          share_outputs=True)
            return [request.get_tensor(n).data.copy() for n in names]

        return run


def openvino_model(path: str | os.PathLike, threads: int | None = None):
    """The IR compiled for the CPU with the process's thread count (INFERENCE_NUM_THREADS)."""
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads or thread_count()})


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or thread_count()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def load_variant(folder: str | os.PathLike, variant: str = "float32", dynamic_int8: bool = False):
    """(runner, meta) for one variant of an export folder (float32 also loads a finetune folder)."""
    variant = canonical_variant(variant)
    folder = Path(folder)
    d = variant_dir(folder, variant)
    missing = d / model_file(variant)
    if not missing.is_file():
        raise DataError(missing, None, None, f"variant {variant!r} not found in {folder} "
                        "(export.variants decides which are written)")
    check_variant_parts(folder, variant)
    if variant == "float32":
        from domaintune.modeling.encoders import load_classifier

        model, tok, meta = load_classifier(d)
        return TorchRunner(model, tok), meta
    if variant == "int8":
        from domaintune.modeling.encoders import assemble_classifier
        from domaintune.modeling.quantize import load_int8_encoder

        meta = read_json(d / "model.json")
        enc = load_int8_encoder(d / "encoder", dynamic=dynamic_int8)
        model, tok = assemble_classifier(enc, meta, d)
        return TorchRunner(model, tok), meta

    meta = read_json(folder / "model.json")
    if variant == "openvino-int8":
        return OpenVinoRunner(openvino_model(d / OPENVINO_FILE), load_tokenizer(str(d)), len(meta["labels"])), meta
    return OnnxRunner(onnx_session(d / ONNX_FILE), load_tokenizer(str(d)), len(meta["labels"])), meta
