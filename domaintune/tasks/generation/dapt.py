"""The dapt hook of a causal LM: continued causal-LM pre-training on dapt.corpus and the train prompts and
responses, in packed blocks, on the training engine (domaintune/train/sft.py); held-out perplexity before and
after. One process, or one of a torchrun launch: rank 0 writes."""
from __future__ import annotations

from pathlib import Path

from domaintune.core.device import stage_device
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import as_dict, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.train import distributed
from domaintune.train.mlm import read_corpus_file
from domaintune.train.sft import checkpoints_readme, dapt_generation, dapt_key, dapt_summary


def adapt(io: StageIO, base, params) -> dict:
    splits, labels = read_dataset(io.in_dir)
    corpus = [text for c in (params.corpus if params.enabled else ()) for _, text in read_corpus_file(c)
              if text.strip()]
    data_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    ckpt = Path(io.checkpoints) / f"clm-{dapt_key(base, params, data_hash)}"
    if distributed.rank() != 0:
        return dapt_generation(splits, corpus, base, params, None, ckpt)
    with atomic_output(io.out) as out, atomic_output(io.live) as live, atomic_output(io.metrics) as met:
        metrics = dapt_generation(splits, corpus, base, params, out, ckpt, live)
        metrics["params"] = as_dict(params)
        write_json(out / "dapt_info.json", {"base_model": base.model, "task": "generation", "metrics": metrics})
        write_json(met, metrics)
    checkpoints_readme(io.checkpoints)
    return metrics


def run(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "dapt")
    stage_device(base)  # a bad device is one line before anything is launched or read
    if not params.enabled:
        return dapt_summary(adapt(io, base, params))
    return dapt_summary(distributed.run_in_processes("dapt", io.argv, params, io.metrics,
                                                     lambda: adapt(io, base, params)))
