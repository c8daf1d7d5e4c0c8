"""The export hook of a causal LM: the adapter merged into a float (for QLoRA: dequantised) copy of the base,
checked against the unmerged model's logits on test examples (export.merge_tolerance, else the stage fails),
saved as safetensors + tokenizer + generation config + model card + checksums.json (the md5 of every file),
loaded once by transformers.pipeline("text-generation") before the stage succeeds."""
from __future__ import annotations

from pathlib import Path

from domaintune.core.errors import DataError
from domaintune.core.io import atomic_output, read_json, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.export.artifacts import write_checksums
from domaintune.export.generation import merged_for_export, model_card, pipeline_check, save_export


def run(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "export")
    in_dir = Path(io.in_dir)
    splits, _ = read_dataset(in_dir)
    if len(splits["test"]) == 0:
        raise DataError(in_dir / "test.parquet", None, None, "empty: nothing to verify the export on")
    eval_metrics = read_json(Path(io.calibration) / "metrics.json")
    ev = load_params(io.params, "evaluate")
    model, tok, run, check = merged_for_export(io.model, splits["test"], base, params.merge_tolerance)
    with atomic_output(io.out) as out, atomic_output(io.metrics) as met:
        save_export(model, tok, out, ev.max_new_tokens)
        sample = pipeline_check(out, splits["test"]["text"].iloc[0], tok)
        (out / "README.md").write_text(model_card(run, check, tok, eval_metrics, params.intended_use,
                                                      ev.max_new_tokens), encoding="utf-8")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        metrics = {"task": "generation", "merge_check": check, "size_bytes": size,
                   "pipeline_check": {"loaded": True, "sample_chars": len(sample)},
                   "dataset_hash": read_hashes(in_dir, splits, [])["dataset"]}
        cls = eval_metrics.get("classification")  # the label set and fitted temperature: what monitor scores with
        cls = {"labels": cls["labels"], "temperature": cls["temperature"]} if cls else None
        write_json(out / "export_info.json", {**metrics, "method": run["method"], "base_model": run["base_model"],
                                              "max_length": base.max_length, "classification": cls})
        write_checksums(out)  # last: the md5 of every file above, checked when the export is loaded
        write_json(met, metrics)
    return f"merged ({run['method']}), max logit gap {check['max_rel_diff']:.2g}; loads in pipeline('text-generation')"

