"""Data tests for the instruction example (examples/support_replies)."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

EX = Path(__file__).resolve().parents[2] / "examples" / "support_replies"


def _gen():
    spec = importlib.util.spec_from_file_location("make_replies", EX / "make_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generator_reproduces_committed_files_byte_for_byte(tmp_path):
    _gen().write(tmp_path)
    for name in ("pairs.csv", "noise.csv"):
        assert (tmp_path / name).read_bytes() == (EX / name).read_bytes(), name


def test_pairs_and_listed_defects():
    pairs = list(csv.DictReader((EX / "pairs.csv").open(encoding="utf-8")))
    noise = list(csv.DictReader((EX / "noise.csv").open(encoding="utf-8")))
    assert len(pairs) == 245 and len({p["ticket_id"] for p in pairs}) == 245
    assert all(p["prompt"].strip() and p["response"].strip() for p in pairs)
    by_id = {p["ticket_id"]: p for p in pairs}
    kinds = {}
    for n in noise:
        kinds.setdefault(n["kind"], []).append(n)
        assert n["ticket_id"] in by_id
    assert {k: len(v) for k, v in kinds.items()} == {"exact_duplicate": 3, "response_conflict": 2,
                                                     "near_empty_reply": 3, "long_reply": 1}
    for n in kinds["exact_duplicate"] + kinds["response_conflict"]:
        src = by_id[n["detail"].removeprefix("of=")]
        row = by_id[n["ticket_id"]]
        assert row["prompt"] == src["prompt"]
        assert (row["response"] == src["response"]) == (n["kind"] == "exact_duplicate")
    assert all(len(by_id[n["ticket_id"]]["response"].split()) < 3 for n in kinds["near_empty_reply"])
    # the only prompts that appear twice are the listed duplicates and conflicts
    prompts = [p["prompt"] for p in pairs]
    assert len(prompts) - len(set(prompts)) == 5


def test_generation_params_example_parses():
    from domaintune.core.params import load_all

    p = load_all(EX / "params.generation.yaml")
    assert p["base"].task == "generation" and p["ingest"].source == "examples/support_replies/pairs.csv"
    assert p["finetune"].method in ("full", "lora", "qlora") and p["ingest"].prompt_column == "prompt"
