"""Exporting a token tagger (base.task token_classification).

The float32 variant is the export folder itself: a standard transformers token-classification folder
(config.json with id2label/label2id, model.safetensors, the tokenizer), so
`transformers.pipeline("token-classification", model=folder, aggregation_strategy="simple")` loads it with no
domaintune code; export_info.json adds what domaintune needs (task, tags, the evaluate stage's temperature,
max_length, the variants' scores) and README.md the model card. Optional variants (export.variants):
onnx/ (the same logits as one graph, onnxruntime) and onnx-int8/ (onnxruntime dynamic int8), each scored on
test and held to the export gates against float32: entity F1 may drop at most export.max_accuracy_drop points
(never less than one test entity), calibrated word ECE may rise at most export.max_ece_increase points
(never less than two test words). A variant over them is not shipped (unlike a classifier's, which stops the
stage): entity F1 of int8 models moves more than accuracy does (WNUT-17, MiniLM: onnx-int8 -1.6 points, see
bench/results/ner.json), and a tagger without its int8 copy is still worth a version. Its folder is removed,
the refusal is in the metrics (`variants_refused`), the card and a warning. checksums.json is written last.
"""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from domaintune.core.errors import DataError, ParamsError, StageError
from domaintune.core.io import atomic_output, read_json, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.data.tokens import decode_rows, entity_scores
from domaintune.evaluate.calibration import ece_mce, softmax
from domaintune.export.artifacts import ONNX_FILE, onnx_session, write_checksums
from domaintune.export.variants import canonical_variant
from domaintune.modeling.tagger import load_tagger, predicted_tags, torch_runner, word_logits

log = logging.getLogger("domaintune")

VARIANTS = ("float32", "onnx", "onnx-int8")
INFO = "export_info.json"


def onnx_runner(path: str | Path):
    """A word_logits `run` over an ONNX token-classification graph (inputs input_ids, attention_mask)."""
    session = onnx_session(path)

    def run(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
    return run


def write_onnx(out: Path, model, tokenizer, opset: int = 17) -> Path:
    """onnx/: the token logits as one graph, dynamic batch and sequence axes (traced with eager attention)."""
    import torch

    d = out / "onnx"
    d.mkdir(parents=True, exist_ok=True)
    enc = tokenizer(["a longer example text for tracing the graph", "short"], padding=True, return_tensors="pt")
    attn = getattr(model.config, "_attn_implementation", None)
    swap = attn not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if swap:
        model.set_attn_implementation("eager")

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Logits(model).eval(), (enc["input_ids"], enc["attention_mask"]), str(d / ONNX_FILE),
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    finally:
        if swap:
            model.set_attn_implementation(attn)
    tokenizer.save_pretrained(d)
    model.config.save_pretrained(d)
    return d


def write_onnx_int8(out: Path, per_channel: bool = True) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, d = out / "onnx", out / "onnx-int8"
    d.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(src / ONNX_FILE, d / ONNX_FILE, per_channel=per_channel, weight_type=QuantType.QInt8)
    for f in src.iterdir():
        if f.is_file() and f.name not in (ONNX_FILE, f"{ONNX_FILE}.data"):
            (d / f.name).write_bytes(f.read_bytes())
    return d


def score(wl, tags, names, temperature: float, bins: int) -> dict:
    s = entity_scores(tags, predicted_tags(wl, names))
    index = {t: i for i, t in enumerate(names)}
    lg = np.concatenate([x[k] for x, k in zip(wl.logits, wl.kept)])
    y = np.array([index[t] for seq, k in zip(tags, wl.kept) for t, keep in zip(seq, k) if keep])
    probs = softmax(lg, temperature)
    ece, _ = ece_mce(probs.max(1), probs.argmax(1) == y, bins)
    return {"entity_f1": s["f1"], "token_accuracy": s["token_accuracy"], "ece": ece, "support": s["support"],
            "words": int(len(y)), "logits": lg}


def gate_failures(scores: dict, params) -> tuple[dict, dict]:
    """(the allowances, {variant: why it fails}) of every variant against float32."""
    ref = scores["float32"]
    one_entity = 100.0 / max(ref["support"], 1)
    one_word = 100.0 / max(ref["words"], 1)
    g = {"max_entity_f1_drop_points": max(params.max_accuracy_drop, one_entity),
         "max_ece_increase_points": max(params.max_ece_increase, 2 * one_word)}
    fails = {}
    for name, v in scores.items():
        if name == "float32":
            continue
        drop = 100 * (ref["entity_f1"] - v["entity_f1"])
        rise = 100 * (v["ece"] - ref["ece"])
        if drop > g["max_entity_f1_drop_points"] * (1 + 1e-9):
            fails[name] = (f"variant {name}: entity F1 {v['entity_f1']:.4f} is {drop:.2f} points below float32's "
                           f"{ref['entity_f1']:.4f} (export.max_accuracy_drop {params.max_accuracy_drop:g}, "
                           f"applied to entity F1; one of {ref['support']} test entities is {one_entity:.2f})")
        elif rise > g["max_ece_increase_points"] * (1 + 1e-9):
            fails[name] = (f"variant {name}: word ECE {v['ece']:.4f} is {rise:.2f} points above float32's "
                           f"{ref['ece']:.4f} (export.max_ece_increase {params.max_ece_increase:g})")
    return g, fails


def check_gates(scores: dict, params) -> dict:
    """The allowances; a StageError naming the first variant over them."""
    g, fails = gate_failures(scores, params)
    if fails:
        raise StageError(next(iter(fails.values())))
    return g


def pipeline_check(folder: Path, text: str) -> list[dict]:
    """transformers' own pipeline loads the folder and tags a test sentence (the stage fails if it cannot)."""
    from transformers import pipeline

    tagger = pipeline("token-classification", model=str(folder), aggregation_strategy="simple", device="cpu")
    return [{k: (float(v) if k == "score" else v) for k, v in e.items()} for e in tagger(text)]


def model_card(info: dict, eval_metrics: dict, intended_use: str) -> str:
    e = eval_metrics["entity"]
    rows = "\n".join(f"| {t} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                     for t, v in sorted(e["per_type"].items()))
    variants = "\n".join(f"| {n} | {v['entity_f1']:.4f} | {v['ece']:.4f} | {v['size_bytes']:,} |"
                         for n, v in info["variants"].items())
    variants += "".join(f"\n\nNot exported: {why}." for why in info.get("variants_refused", {}).values())
    return f"""---
pipeline_tag: token-classification
tags: [domaintune, token-classification, ner]
base_model: {info['base_model']}
---
# Named-entity tagger ({info['method']})

{intended_use}

Entity types: {', '.join(info['entity_types'])}. Test entity F1 (seqeval, strict IOB2): **{e['f1']:.4f}**
(P {e['precision']:.4f}, R {e['recall']:.4f}); token accuracy {eval_metrics['token_accuracy']:.4f}.
Word probabilities are calibrated by temperature {info['temperature']:.3f} (word ECE
{eval_metrics['calibration']['ece_before']:.4f} -> {eval_metrics['calibration']['ece_after']:.4f}).

| type | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

## Variants (test split)

| variant | entity F1 | word ECE (calibrated) | bytes |
|---|---|---|---|
{variants}

## Use

```python
from transformers import pipeline
ner = pipeline("token-classification", model="path/to/this/folder", aggregation_strategy="first")
ner("text to tag")   # "first": each word's first sub-word decides, as in training; "simple" works too
```

```bash
domaintune predict texts.csv --model path/to/this/folder --out entities.jsonl   # calibrated entity scores
domaintune predict texts.csv --model path/to/this/folder --variant onnx-int8
```
With onnxruntime alone: `onnx/model.onnx` (or `onnx-int8/model.onnx`) takes `input_ids`, `attention_mask` and
returns `logits` [batch, tokens, tags]; tags are config.json's id2label, the tokenizer is in the same folder.
"""


def export_stage(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "export")
    wanted = []
    for v in params.variants:
        v = canonical_variant(v)
        if v not in VARIANTS:
            raise ParamsError(f"params.yaml: export.variants: {v} is not offered for base.task token_classification "
                              f"(offered: {list(VARIANTS)})")
        wanted.append(v)
    if "float32" not in wanted:
        wanted.insert(0, "float32")
    in_dir = Path(io.in_dir)
    splits, labels = read_dataset(in_dir)
    if not len(splits["test"]):
        raise DataError(in_dir / "test.parquet", None, None, "empty: nothing to verify the export on")
    calib = read_json(Path(io.calibration) / "calibration.json")
    eval_metrics = read_json(Path(io.calibration) / "metrics.json")
    model, tok, meta = load_tagger(io.model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if list(calib.get("labels", names)) != names:
        raise DataError(Path(io.calibration) / "calibration.json", None, "labels",
                        f"fitted for tags {calib.get('labels')}, the model has {names}")
    t = float(calib["temperature"])
    words, _, tags = decode_rows(splits["test"])
    ml = int(meta["max_length"])
    with atomic_output(io.out) as out, atomic_output(io.metrics) as met:
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        runners = {"float32": torch_runner(model)}
        if "onnx" in wanted or "onnx-int8" in wanted:
            write_onnx(out, model, tok, params.onnx_opset)
            runners["onnx"] = onnx_runner(out / "onnx" / ONNX_FILE)
        if "onnx-int8" in wanted:
            write_onnx_int8(out, params.onnx_int8_per_channel)
            runners["onnx-int8"] = onnx_runner(out / "onnx-int8" / ONNX_FILE)
        scores = {n: score(word_logits(r, tok, words, len(names), ml, params.batch_size), tags, names, t, params.bins)
                  for n, r in runners.items() if n in wanted or n == "float32"}
        # A variant over the gates is not shipped: its folder is removed and the refusal recorded (metrics, card,
        # a warning), so `predict --variant` names why it is missing; float32 always ships.
        gates, refused = gate_failures(scores, params)
        for name, why in refused.items():
            log.warning("%s: not exported", why)
            shutil.rmtree(out / name)
            scores.pop(name)
        ref = scores["float32"]["logits"]
        sizes = {"float32": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
                 **{n: sum(f.stat().st_size for f in (out / n).iterdir()) for n in scores if n != "float32"}}
        variants = {n: {"entity_f1": v["entity_f1"], "token_accuracy": v["token_accuracy"], "ece": v["ece"],
                        "max_abs_logit_diff": float(np.abs(v["logits"] - ref).max()), "size_bytes": int(sizes[n])}
                    for n, v in scores.items()}
        sample = pipeline_check(out, splits["test"]["text"].iloc[0])
        types = sorted({n[2:] for n in names if n != "O"})
        info = {"task": "token_classification", "tags": names, "entity_types": types, "temperature": t,
                "max_length": ml, "method": meta.get("method"), "base_model": base.model,
                "base_encoder": meta.get("base_encoder"), "seed": meta.get("seed"), "variants": variants,
                "gates": gates, "variants_refused": refused,
                "dataset_hash": read_hashes(in_dir, splits, labels)["dataset"],
                "pipeline_check": {"loaded": True, "aggregation_strategy": "simple", "entities": len(sample)}}
        write_json(out / INFO, info)
        (out / "README.md").write_text(model_card(info, eval_metrics, params.intended_use), encoding="utf-8")
        write_checksums(out)
        write_json(met, {k: v for k, v in info.items() if k != "tags"})
    return ("variants " + ", ".join(f"{n} entity F1 {v['entity_f1']:.4f}" for n, v in variants.items())
            + "; loads in pipeline('token-classification')")
