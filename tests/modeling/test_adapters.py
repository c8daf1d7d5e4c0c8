"""finetune.target_modules: auto is the task's default, so switching base.task and base.model is enough."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from domaintune.core.errors import ParamsError
from domaintune.core.params import FinetuneParams
from domaintune.modeling import tinyllm
from domaintune.modeling.adapters import check_target_modules, target_modules
from domaintune.modeling.encoders import load_encoder
from domaintune.train.sft import apply_method


def test_auto_is_the_default_and_a_list_stays_as_given():
    assert FinetuneParams().target_modules == "auto"
    assert FinetuneParams(target_modules=["q_proj"]).target_modules == ("q_proj",)
    with pytest.raises(ParamsError, match="finetune.target_modules: expected auto or a list"):
        FinetuneParams(target_modules="all")


def test_an_encoder_gets_its_attention_projections(tiny_bert):
    enc = load_encoder(str(tiny_bert))
    assert target_modules(enc, "auto", causal=False) == ["query", "value"]  # peft's mapping for BERT
    assert target_modules(enc, ("key",), causal=False) == ["key"]
    check_target_modules(enc, ["query", "value"])


def test_a_causal_lm_gets_every_attention_and_mlp_linear_and_trains_with_lora():
    tok = tinyllm.build_tokenizer(["hello world", "reset my password"] * 20, vocab_size=300)
    model = tinyllm.build_model(tok, hidden=64, layers=1, heads=4)
    assert target_modules(model, "auto", causal=True) == "all-linear"
    ft = FinetuneParams(method="lora", target_modules="auto", seeds=[1])
    peft_model = apply_method(model, ft, "cpu", 1)
    adapted = {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # the classifier's old default names modules a Llama does not have: one line, before training
    with pytest.raises(ParamsError, match="module 'query' is not in the model"):
        apply_method(tinyllm.build_model(tok, hidden=64, layers=1, heads=4),
                     FinetuneParams(method="lora", target_modules=["query", "value"], seeds=[1]), "cpu", 1)
