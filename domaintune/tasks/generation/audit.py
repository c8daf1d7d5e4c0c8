"""The audit hook of prompt -> response data: the SFT checks (reported, nothing removed), and with a declared
evaluate.label_set the classifier's cleanlab audit on the response as the label, whose result (reports, train
rows dropped or relabelled by audit.action) is the output."""
from __future__ import annotations

import shutil
from pathlib import Path

from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes, write_dataset
from domaintune.evaluate.audit import label_set_audit
from domaintune.evaluate.genaudit import audit_generation, audit_summary
from domaintune.modeling.causal import _tokenizer
from domaintune.modeling.encoders import resolve_model


def run(io: StageIO) -> str:
    base, params, ev = load_params(io.params, "base", "audit", "evaluate")
    label_set = list(ev.label_set)
    in_dir = Path(io.in_dir)
    splits, labels = read_dataset(in_dir)
    tok = _tokenizer(resolve_model(base.model))
    issues = audit_generation(splits, tok, base.max_length, base.seed)
    summary = audit_summary(issues, splits)
    summary["dataset_hash_in"] = read_hashes(in_dir, splits, labels)["dataset"]
    # classification as generation: cleanlab's audit on the response as the label, as for a classifier
    decisions = io.decisions if io.decisions is not None else params.decisions
    result = label_set_audit(splits, label_set, decisions, io.embeddings, base, params) if label_set else None
    if result is not None:
        summary["label_audit"] = result.metrics
    with atomic_output(io.out) as out, atomic_output(io.report) as rep, atomic_output(io.metrics) as met:
        summary["dataset_hash_out"] = write_dataset(out, result.splits if result else splits, labels)["dataset"]
        if (in_dir / "manifest.json").exists():
            shutil.copyfile(in_dir / "manifest.json", out / "upstream_manifest.json")
        rep.mkdir()
        issues.to_csv(rep / "generation_issues.csv", index=False)
        if result is not None:
            result.write_reports(rep)
        write_json(rep / "summary.json", {"max_length": base.max_length, "metrics": summary})
        write_json(met, summary)
    emb = Path(io.embeddings)  # a persistent DVC out of the stage: it must exist
    emb.mkdir(parents=True, exist_ok=True)
    if result is None:
        (emb / "README.txt").write_text("Embedding cache of the label audit; unused for base.task generation "
                                        "without evaluate.label_set.\n")
    line = "; ".join(f"{k} {v}" for k, v in summary["issues"].items()) + " (reported, nothing removed)"
    if result is not None:
        m = result.metrics
        line += (f"; label audit: {m['issues_found']} train rows flagged, dropped {m['rows_acted_on']['dropped']}, "
                 f"relabelled {m['rows_acted_on']['relabelled']}")
    return line

