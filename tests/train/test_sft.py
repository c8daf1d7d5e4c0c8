"""SFT for base.task: generation, in process on a tiny random Llama: QLoRA + merge check (and a bad
merge failing it), exact resume after a crash, generation ingest and audit."""
from __future__ import annotations

import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from domaintune.core.errors import StageError
from domaintune.core.params import BaseParams, FinetuneParams
from domaintune.core.stage import StageIO
from domaintune.evaluate.genaudit import audit_generation
from domaintune.evaluate.generation import evaluate_generation
from domaintune.export.generation import merged_for_export
from domaintune.modeling import llm, tinyllm
from domaintune.modeling.causal import load_tuned
from domaintune.tasks.generation.evaluate import evaluate_into
from domaintune.train import sft

PROMPTS = ["Where is my invoice {n}?", "Reset my password for user {n}.", "Cancel account {n} please.",
           "Export my data for team {n}."]
REPLIES = ["I have resent invoice {n}.", "A reset link for {n} is on its way.", "Account {n} closes at period end.",
           "The export for {n} arrives by email."]


def _split(n: int, start: int) -> pd.DataFrame:
    rows = [(f"r{start + i}", PROMPTS[i % 4].format(n=start + i), REPLIES[i % 4].format(n=start + i)) for i in range(n)]
    return pd.DataFrame(rows, columns=["id", "text", "label"]).assign(split="x")


@pytest.fixture(scope="module")
def splits():
    return {"train": _split(24, 0), "validation": _split(4, 100), "test": _split(4, 200)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, splits):
    texts = [t for df in splits.values() for t in df["text"].tolist() + df["label"].tolist()]
    return tinyllm.save(tmp_path_factory.mktemp("tiny_llama") / "m", texts * 3, seed=3)


def _run(tmp, model_dir, splits, **ft):
    base = BaseParams(model=str(model_dir), max_length=64, task="generation")
    p = FinetuneParams(**{"epochs": 2, "batch_size": 4, "lr": 1e-2, "lora_dropout": 0.0, "checkpoint_every": 0,
                          "target_modules": ("q_proj", "v_proj"), **ft})
    m = sft.finetune_generation(splits, str(model_dir), base, p, tmp / "out", str(tmp / "ckpt"), tmp / "live", "h")
    return base, m


def test_qlora_sft_merges_into_the_dequantised_base_within_tolerance(tmp_path, model_dir, splits, monkeypatch):
    from domaintune.modeling.adapters import qlora_backend_error

    if qlora_backend_error():
        pytest.skip(qlora_backend_error())
    base, m = _run(tmp_path, model_dir, splits, method="qlora", gradient_checkpointing=True, packing=True)
    assert m["loss_last"] < m["loss_first"] and m["skipped_no_response_tokens"] == []
    merged, _, run, check = merged_for_export(str(tmp_path / "out"), splits["test"], base, 1e-4)
    assert run["method"] == "qlora" and check["merged_into"] == "dequantised NF4 base"
    assert check["examples"] == 4 and check["max_rel_diff"] <= 1e-4
    assert not any(type(mod).__name__ == "Linear4bit" for mod in merged.modules())  # a plain float model
    # A merge that is off (here: base weights nudged by 0.05) makes the export stage fail.
    real = llm._float_weight
    monkeypatch.setattr(llm, "_float_weight", lambda layer: real(layer) + 0.05)
    with pytest.raises(StageError, match="merged model disagrees with the unmerged one"):
        merged_for_export(str(tmp_path / "out"), splits["test"], base, 1e-4)


def test_crashed_sft_resumes_to_the_same_weights(tmp_path, model_dir, splits, monkeypatch):
    from safetensors.torch import load_file

    from domaintune.train.engine import CRASH_ENV, TrainingCrash

    _run(tmp_path / "straight", model_dir, splits, method="full", checkpoint_every=1)
    monkeypatch.setenv(CRASH_ENV, "3")
    with pytest.raises(TrainingCrash):
        _run(tmp_path / "crashed", model_dir, splits, method="full", checkpoint_every=1)
    assert list((tmp_path / "crashed" / "ckpt").iterdir())  # the state it resumes from
    monkeypatch.delenv(CRASH_ENV)
    _, m = _run(tmp_path / "crashed", model_dir, splits, method="full", checkpoint_every=1)
    a = load_file(tmp_path / "straight" / "out" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m["steps"] == 12 and not list((tmp_path / "crashed" / "ckpt").iterdir())  # cleared when done


def test_generation_methods_refuse_classifier_ones(tmp_path, model_dir, splits):
    from domaintune.core.errors import ParamsError

    with pytest.raises(ParamsError, match="finetune.method: 'head' is for classification"):
        _run(tmp_path, model_dir, splits, method="head")


def test_ingest_reads_prompt_and_response_columns(tmp_path):
    from domaintune.core.errors import DataError
    from domaintune.core.params import IngestParams
    from domaintune.data.ingest import ingest
    from domaintune.data.sources import read_source

    src = tmp_path / "pairs.csv"
    rows = [f"t{i},question {i} about invoices,answer {i} from support" for i in range(40)]
    src.write_text("ticket_id,prompt,response\n" + "\n".join(rows) + "\n", encoding="utf-8")
    p = IngestParams(source=str(src), id_column="ticket_id").for_prompts()
    res = ingest(read_source(str(src)), p, 42, classes=False)
    assert res.labels == [] and sum(len(df) for df in res.splits.values()) == 40
    assert all(len(df) for df in res.splits.values())  # a random split: no class to stratify on
    assert res.splits["train"]["label"].str.startswith("answer").all()
    src.write_text("ticket_id,prompt,response\nt1,question,\nt2,another,answer\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.csv: row 1: field 'response': label is missing"):
        ingest(read_source(str(src)), p, 42, classes=False)


def test_audit_reports_near_duplicate_prompts_with_different_responses(model_dir):
    from domaintune.modeling.causal import _tokenizer

    train = pd.DataFrame({"id": ["a", "b", "c"], "label": ["Yes, resent it today.", "No, we never got it.", "ok"],
                          "text": ["my invoice from last week never arrived at the client office today",
                                   "my invoice from last week never arrived at the client office today!",
                                   "completely different text about passwords"]})
    empty = train.iloc[:0]
    issues = audit_generation({"train": train, "validation": empty, "test": empty}, _tokenizer(model_dir), 64, 1)
    near = issues[issues["issue"] == "near_duplicate_prompt"]
    assert list(near["id"]) == ["b"] and "'a'" in near["detail"].iloc[0]
    assert list(issues.loc[issues["issue"] == "near_empty_response", "id"]) == ["c"]


def test_ingest_reads_a_messages_column(tmp_path):
    import json

    from domaintune.core.errors import DataError
    from domaintune.core.params import IngestParams
    from domaintune.data.chat import to_columns
    from domaintune.data.ingest import ingest
    from domaintune.data.sources import read_source

    def conv(i, last="assistant"):
        return [{"role": "user", "content": f"question {i}"}, {"role": last, "content": f"answer {i}"}]

    src = tmp_path / "chats.jsonl"
    rows = [{"id": f"c{i}", "messages": conv(i, "user" if i == 7 else "assistant")} for i in range(40)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    p = IngestParams(source=str(src), id_column="id", messages_column="messages", on_bad_row="skip")
    p = p.for_prompts()

    def run(params):
        tables = read_source(str(src))
        for t in tables:
            to_columns(t, params.messages_column, params.label_column)
        return ingest(tables, params, 42, classes=False)

    res = run(p)
    assert sum(len(df) for df in res.splits.values()) == 39
    bad = res.rejected.iloc[0]
    assert len(res.rejected) == 1 and bad["reason"] == "bad_messages" and bad["field"] == "messages"
    assert bad["row"] == 8 and "last message must be a non-empty 'assistant' reply" in bad["detail"]
    row = pd.concat(res.splits.values()).set_index("id").loc["c3"]
    assert json.loads(row["text"]) == conv(3)[:1] and row["label"] == "answer 3"
    with pytest.raises(DataError, match=r"chats.jsonl: row 8: field 'messages': conversation the last message"):
        run(IngestParams(source=str(src), id_column="id", messages_column="messages").for_prompts())


def test_classification_as_generation_scores_the_label_set_and_gates(tmp_path, model_dir):
    import json

    from domaintune.core.params import EvaluateParams
    from domaintune.data.dataset import write_dataset

    def split(n, start):
        rows = [(f"q{start + i}", f"is invoice {start + i} paid?", "yes" if i % 2 else "no") for i in range(n)]
        return pd.DataFrame(rows, columns=["id", "text", "label"]).assign(split="x")

    data = {"train": split(16, 0), "validation": split(6, 100), "test": split(6, 200)}
    _run(tmp_path, model_dir, data, method="full", epochs=1)
    write_dataset(tmp_path / "data", data, [])
    base = BaseParams(model=str(model_dir), max_length=64, task="generation")
    p = EvaluateParams(label_set=("yes", "no"), min_calibration_rows=2, samples=1, max_new_tokens=2)
    metrics, _ = evaluate_generation(data, str(tmp_path / "out"), base, p)
    c = metrics["classification"]
    assert c["labels"] == ["yes", "no"] and c["temperature"] > 0 and c["calibration_rows"] == 6
    for phase in ("before", "after"):
        assert 0 <= c[phase]["accuracy"] <= 1 and 0 < c[phase]["ece"] <= 1 and "macro_f1" in c[phase]
    # the scores are the labels' log-likelihoods as responses (computed one by one here)
    tuned, tok, _ = load_tuned(tmp_path / "out")
    one = llm.encode(tok, data["test"]["text"].iloc[0], "no", 64)
    s, _ = llm.per_sample_nll(tuned, llm.pad_batch([(one.input_ids, one.labels)], tok.pad_token_id), 1)
    ll = llm.label_loglik(tuned, tok, data["test"]["text"].tolist()[:1], ["yes", "no"], 64, 4)
    assert abs(ll[0, 1] + float(s[0])) < 1e-4
    io = StageIO(in_dir=str(tmp_path / "data"), model=str(tmp_path / "out"),
                 out=str(tmp_path / "eval"), metrics=str(tmp_path / "m.json"))
    strict = EvaluateParams(label_set=("yes", "no"), min_calibration_rows=2, samples=1, max_new_tokens=2,
                            gate={"max_ece": 0.0})
    with pytest.raises(StageError, match="quality gate failed: ece"):
        evaluate_into(io, base, strict)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "m.json").exists()
    evaluate_into(io, base, p)
    assert json.loads((tmp_path / "m.json").read_text())["classification"]["after"]["accuracy"] >= 0
    data["test"].loc[0, "label"] = "maybe"
    from domaintune.core.errors import DataError

    with pytest.raises(DataError, match=r"test.parquet: row 1: field 'label': response 'maybe' is not in"):
        evaluate_generation(data, str(tmp_path / "out"), base, p)


def test_continued_pretraining_is_packed_and_resumes_exactly(tmp_path, model_dir, splits, monkeypatch):
    from safetensors.torch import load_file

    from domaintune.core.params import DaptParams
    from domaintune.train.engine import CRASH_ENV, TrainingCrash

    base = BaseParams(model=str(model_dir), max_length=64, task="generation")
    p = DaptParams(block_size=32, max_steps=4, batch_size=4, lr=1e-3, checkpoint_every=1)
    corpus = [f"customer {i} asked about invoices and refunds" for i in range(20)]

    def run(name):
        (tmp_path / name).mkdir(exist_ok=True)
        return sft.dapt_generation(splits, corpus, base, p, tmp_path / name / "out", tmp_path / name / "ckpt",
                                   tmp_path / name / "live")

    m = run("straight")
    assert m["steps"] == 4 and m["blocks"] > 0 and m["perplexity_after"] < m["perplexity_before"]
    assert (tmp_path / "straight/live/plots/metrics/train/loss.tsv").read_text().count("\n") == 5
    monkeypatch.setenv(CRASH_ENV, "2")
    with pytest.raises(TrainingCrash):
        run("crashed")
    monkeypatch.delenv(CRASH_ENV)
    run("crashed")
    a, b = (load_file(tmp_path / n / "out" / "model.safetensors") for n in ("straight", "crashed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
