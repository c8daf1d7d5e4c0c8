"""Causal-LM building blocks (domaintune/modeling/llm.py) on a tiny random Llama: completion-only labels
(also when a token straddles the prompt/response boundary), packing without cross-attention,
and merging a QLoRA adapter into a dequantised base."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from domaintune.modeling import llm, tinyllm

TEXTS = ["Where is my invoice? It was due on Monday.", "Reset my password please, the link expired.",
         "Thanks for reaching out. I have resent the invoice.", "Sorry about that; here is a new link."]


@pytest.fixture(scope="module")
def tok():
    return tinyllm.build_tokenizer(TEXTS * 5, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return tinyllm.build_model(tok, seed=1).eval()


def _merging_tokenizer():
    """A char-level BPE with one merge, "\\n" + "S": the default template ends its prompt with "\\n",
    so a response starting with "S" is tokenised with a token straddling the boundary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(llm.DEFAULT_TEMPLATE + "please say hi Sure: hello!?"))
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    vocab["\nS"] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "S")]))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_exactly_the_response_tokens_carry_loss_when_the_boundary_merges():
    tok = _merging_tokenizer()
    prompt, response = "please say hi", "Sure: hello!"
    full, start, _ = llm.render(tok, prompt, response)
    enc = llm.encode(tok, prompt, response, max_length=512)
    ids = enc.input_ids
    assert tok.convert_ids_to_tokens(ids).count("\nS") == 1  # the boundary really merges
    # the naive way (count the prompt's own tokens) would give the straddling token to the prompt
    naive = len(tok(llm.prompt_text(tok, prompt), add_special_tokens=False)["input_ids"])
    assert ids[naive - 1] == tok.convert_tokens_to_ids("\nS")
    loss_pos = [i for i, y in enumerate(enc.labels) if y != llm.IGNORE]
    assert loss_pos == list(range(naive - 1, len(ids)))  # contiguous, from the straddling token on
    assert all(enc.labels[i] == ids[i] for i in loss_pos)
    # the loss tokens are the response (+ eos) and the one boundary character they share, nothing else
    assert "".join(tok.convert_ids_to_tokens([ids[i] for i in loss_pos])) == full[start - 1:]
    prompt_tokens = [t for t, y in zip(ids, enc.labels) if y == llm.IGNORE]
    assert "".join(tok.convert_ids_to_tokens(prompt_tokens)) == full[: start - 1]
    assert enc.response_tokens == len(loss_pos) and enc.cut_tokens == 0


def test_chat_template_labels_cover_response_and_end_of_turn(tok):
    enc = llm.encode(tok, "Where is my invoice?", "I have resent the invoice.", max_length=512)
    resp = [t for t, y in zip(enc.input_ids, enc.labels) if y != llm.IGNORE]
    prompt = [t for t, y in zip(enc.input_ids, enc.labels) if y == llm.IGNORE]
    assert tok.decode(resp, skip_special_tokens=False) == "I have resent the invoice.<|end|>\n"
    assert tok.decode(prompt, skip_special_tokens=False) == "<s><|user|>\nWhere is my invoice?<|end|>\n<|assistant|>\n"


def test_truncation_counts_cut_response_tokens(tok):
    full = llm.encode(tok, "Where is my invoice?", "I have resent the invoice.", max_length=512)
    cut = llm.encode(tok, "Where is my invoice?", "I have resent the invoice.", max_length=len(full.input_ids) - 3)
    assert cut.cut_tokens == 3 and cut.response_tokens == full.response_tokens
    assert len(cut.input_ids) == len(full.input_ids) - 3


def _examples(tok, n=6):
    pairs = [(TEXTS[i % 2] + " x" * i, TEXTS[2 + i % 2]) for i in range(n)]
    return [(e.input_ids, e.labels) for e in (llm.encode(tok, p, r, 512) for p, r in pairs)]


def test_packed_batch_gives_the_same_per_sample_loss_as_unpacked(tok, model):
    ex = _examples(tok)
    width = max(len(x) for x, _ in ex)
    rows = llm.pack(ex, block_size=2 * width + 4)
    assert len(rows) < len(ex) and any(len(r) > 1 for r in rows)  # really packed
    with torch.no_grad():
        s_pad, c_pad = llm.per_sample_nll(model, llm.pad_batch(ex, tok.pad_token_id), len(ex))
        packed = llm.packed_batch(ex, rows, tok.pad_token_id)
        s_pack, c_pack = llm.per_sample_nll(model, packed, len(ex))
        # control: the same packed rows with a plain all-ones mask let samples attend to each other
        leaky = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
        s_leak, _ = llm.per_sample_nll(model, leaky, len(ex))
    assert torch.equal(c_pad, c_pack) and (c_pad > 0).all()
    torch.testing.assert_close(s_pack / c_pack, s_pad / c_pad, rtol=0, atol=1e-5)
    assert (s_leak / c_pack - s_pad / c_pad).abs().max() > 1e-3


def test_pack_keeps_every_example_once():
    ex = [([1] * n, [1] * n) for n in (5, 9, 3, 7, 2, 8)]
    rows = llm.pack(ex, 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(len(ex[i][0]) for i in r) <= 10 for r in rows)
    with pytest.raises(ValueError, match="example 1 has 9 tokens > block_size 8"):
        llm.pack(ex, 8)


def test_merge_into_dequantised_base_matches_unmerged_qlora(tok):
    from peft import LoraConfig, get_peft_model

    from domaintune.modeling.adapters import qlora_backend_error, quantize_encoder_4bit

    if qlora_backend_error():
        pytest.skip(qlora_backend_error())
    model = tinyllm.build_model(tok, seed=2)
    float_weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_encoder_4bit(model, "float32") > 0
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg).eval()
    ids = torch.tensor([llm.encode(tok, "Where is my invoice?", "Resent.", 64).input_ids])
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        merged_model = llm.merge_adapter(peft_model).eval()
        merged = merged_model(input_ids=ids).logits
    assert not any("lora" in k for k in merged_model.state_dict())
    assert not any(type(m).__name__ == "Linear4bit" for m in merged_model.modules())  # one float model
    assert llm.max_logit_gap(unmerged, merged) < 1e-4
    # control: the same adapter merged into the original float weights is a different model
    naive = tinyllm.build_model(tok, seed=2)
    naive.load_state_dict(float_weights)
    for name, mod in merged_model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            delta = mod.weight.detach() - llm._float_weight(_quantised_twin(tok, name)).detach()
            naive.get_submodule(name).weight.data += delta
    with torch.no_grad():
        assert llm.max_logit_gap(unmerged, naive.eval()(input_ids=ids).logits) > 1e-3


def _quantised_twin(tok, name):
    from domaintune.modeling.adapters import quantize_encoder_4bit

    m = tinyllm.build_model(tok, seed=2)
    quantize_encoder_4bit(m, "float32")
    return m.get_submodule(name)


def test_a_conversation_prompt_puts_loss_on_the_last_reply_only(tok):
    from domaintune.data import chat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my invoice?"},
            {"role": "assistant", "content": "Resent it."}, {"role": "user", "content": "Thanks, and the link?"}]
    enc = llm.encode(tok, chat.dump(msgs), "Here it is.", max_length=512)
    resp = [t for t, y in zip(enc.input_ids, enc.labels) if y != llm.IGNORE]
    prompt = tok.decode([t for t, y in zip(enc.input_ids, enc.labels) if y == llm.IGNORE])
    assert tok.decode(resp, skip_special_tokens=False) == "Here it is.<|end|>\n"
    assert "<|assistant|>\nResent it.<|end|>" in prompt and prompt.startswith("<s><|system|>\nBe brief.")
    assert chat.messages("[not a conversation") == [{"role": "user", "content": "[not a conversation"}]
