"""A generation export for prediction: the Predictor interface (drift, monitor) and generated responses.

GenerationPredictor shows a causal LM as a classifier's Predictor (prompt familiarity, hidden-state embeddings),
and `generate` writes its responses: what `domaintune predict` and the /v1 endpoints of `domaintune serve` run.

Generation renders each prompt as training did (domaintune.modeling.llm.prompt_text: the tokenizer's chat template,
a prompt being one user message or a dumped conversation, domaintune.data.chat), decodes greedily when the
temperature is 0 and samples otherwise, and stops a row at its own token budget, at end of sequence, or at the
first of its stop strings (cut from the text, as OpenAI's API does). `on_text(row, delta)` receives the text as it
becomes final: the deltas of a row add up to its response (a tail that could still become a stop string, or an
incomplete UTF-8 character, is held back until it cannot).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from domaintune.core.io import read_json
from domaintune.evaluate.calibration import softmax
from domaintune.modeling import llm
from domaintune.modeling.causal import load_causal_lm

FAMILIARITY = ("prompt familiarity: the model's geometric-mean probability of the rendered prompt's tokens "
               "(lower: the prompts read less like what it was tuned on)")
FINISH_STOP, FINISH_LENGTH = "stop", "length"  # OpenAI's finish_reason values


@dataclass
class Generated:
    """One generated response."""
    text: str                # the response: special tokens dropped, cut before the first stop string
    finish_reason: str       # "stop" (end of sequence or a stop string) or "length" (the token budget ran out)
    prompt_tokens: int       # tokens of the rendered prompt
    completion_tokens: int   # tokens generated (the end-of-sequence token counts; nothing after the stop)


class PromptTooLong(ValueError):
    """A rendered prompt plus its token budget does not fit the model's context."""

    def __init__(self, row: int, prompt_tokens: int, max_new_tokens: int, context: int):
        self.row, self.prompt_tokens, self.max_new_tokens, self.context = row, prompt_tokens, max_new_tokens, context
        super().__init__(f"prompt {row} has {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} that is "
                         f"over the model's context of {context} tokens")


class RowTracker:
    """The rows of one `model.generate` call, one new token each per step: each row's tokens and text, when it
    stops and why, and the text safe to stream (module docstring). Plain Python: the decoding loop feeds it."""

    def __init__(self, decode: Callable[[list[int]], str], limits: Sequence[int], stops: Sequence[Sequence[str]],
                 eos_ids: set[int], on_text: Callable[[int, str], None] | None = None):
        self.decode, self.limits, self.eos_ids, self.on_text = decode, list(limits), set(eos_ids), on_text
        self.stops = [tuple(s for s in row if s) for row in stops]
        n = len(self.limits)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.text, self.sent = [""] * n, [0] * n
        self.finish: list[str | None] = [None] * n

    def add(self, row: int, token: int) -> bool:
        """Take the row's next token; True once the row is finished (later tokens are ignored)."""
        if self.finish[row] is not None:
            return True
        self.tokens[row].append(int(token))
        watched = self.on_text is not None or bool(self.stops[row])  # else the text is decoded once, at the end
        text = self.decode(self.tokens[row]) if watched else ""
        cut = min((i for i in (text.find(s) for s in self.stops[row]) if i >= 0), default=-1)
        if cut >= 0:
            self._close(row, text[:cut], FINISH_STOP)
        elif int(token) in self.eos_ids:
            self._close(row, text if watched else self.decode(self.tokens[row]), FINISH_STOP)
        elif len(self.tokens[row]) >= self.limits[row]:
            self._close(row, text if watched else self.decode(self.tokens[row]), FINISH_LENGTH)
        elif watched:
            self.text[row] = text
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                self._send(row, text[: len(text) - self._held(row, text)])
        return self.finish[row] is not None

    def close_all(self) -> None:
        """Rows the loop left unfinished (it ended for another reason) ran out of budget."""
        for row, reason in enumerate(self.finish):
            if reason is None:
                self._close(row, self.decode(self.tokens[row]), FINISH_LENGTH)

    def _held(self, row: int, text: str) -> int:
        """Length of the longest tail of `text` that begins one of the row's stop strings."""
        return max((k for s in self.stops[row] for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)

    def _send(self, row: int, upto: str) -> None:
        if len(upto) > self.sent[row]:
            if self.on_text is not None:
                self.on_text(row, upto[self.sent[row]:])
            self.sent[row] = len(upto)

    def _close(self, row: int, text: str, reason: str) -> None:
        self.text[row], self.finish[row] = text, reason
        self._send(row, text)


def _per_row(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n




def prompt_outputs(model, tok, prompts: Sequence[str], batch_size: int, max_length: int):
    """(mean NLL of each rendered prompt's tokens [m], mean last hidden state [m, hidden]) in one forward pass
    per batch. Padding is on the right; each prompt is cut to max_length tokens."""
    import torch
    import torch.nn.functional as F

    nll_rows, emb_rows = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            texts = [llm.prompt_text(tok, p) for p in prompts[i: i + batch_size]]
            enc = tok(texts, add_special_tokens=False, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(model.device)
            out = model(**enc, output_hidden_states=True, use_cache=False)
            mask = enc["attention_mask"]
            h, m = out.hidden_states[-1].float(), mask.unsqueeze(-1).float()
            emb_rows.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
            nll = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), enc["input_ids"][:, 1:], reduction="none")
            tgt = mask[:, 1:].float()
            nll_rows.append(((nll * tgt).sum(1) / tgt.sum(1).clamp(min=1)).cpu().numpy())
    hidden = model.config.hidden_size
    return (np.concatenate(nll_rows) if nll_rows else np.zeros(0),
            np.concatenate(emb_rows).astype(np.float64) if emb_rows else np.zeros((0, hidden)))



class GenerationPredictor:
    """A causal LM export with the attributes and methods drift.Baseline / drift.build_baseline / monitoring
    call on a classifier's Predictor.

    Without a label set its "logits" are log-familiarities [m, 1], its "probabilities" familiarities, and it
    has no labels. With the label set the export recorded (evaluate.label_set: classification as generation)
    it is a single-label classifier: logits are each label's log-likelihood as the response (llm.label_loglik),
    probabilities their softmax at the temperature evaluate fitted, so the verdict also tests the predicted-label
    mix and estimates accuracy (CBPE) exactly as for a classifier."""

    def __init__(self, model_dir: str | Path, batch_size: int = 64, device: str = "cpu"):
        model, self.tokenizer = load_causal_lm(str(model_dir))
        self.model = model.to(device).eval()
        self.batch_size = batch_size
        path = Path(model_dir) / "export_info.json"
        info = read_json(path) if path.is_file() else {}
        # prompts are cut where training cut them (base.max_length, recorded by the export stage)
        self.max_length = int(info.get("max_length") or min(getattr(model.config, "max_position_embeddings", 512)
                                                             or 512, 512))
        cls = info.get("classification") or {}
        self.labels = list(cls.get("labels") or [])
        self.temperature = float(cls.get("temperature") or 1.0)
        self.problem_type = "single_label" if self.labels else "generation"
        if not self.labels:
            self.confidence_explanation = FAMILIARITY
        # generation defaults: the export's own record (generation_config.json, written by the export stage)
        gc = model.generation_config
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.defaults = {"max_new_tokens": int(gc.max_new_tokens or 64),
                         "temperature": float(gc.temperature or 1.0) if gc.do_sample else 0.0,
                         "top_p": float(gc.top_p or 1.0) if gc.do_sample else 1.0}
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt rendered as training rendered it (what generation starts from)."""
        return [self.tokenizer(llm.prompt_text(self.tokenizer, p), add_special_tokens=False)["input_ids"]
                for p in prompts]

    def check_context(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int]) -> None:
        """Raise PromptTooLong for the first prompt whose tokens plus budget exceed the model's context."""
        limits = _per_row(max_new_tokens, len(prompt_ids), "max_new_tokens")
        for row, (ids, limit) in enumerate(zip(prompt_ids, limits)):
            if self.context is not None and len(ids) + limit > self.context:
                raise PromptTooLong(row, len(ids), limit, self.context)

    def generate(self, prompts: Sequence[str], max_new_tokens: int | Sequence[int] | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 stop: Sequence[str] | Sequence[Sequence[str]] | None = None, seed: int | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[Generated]:
        """A response per prompt, in input order (module docstring). None takes the export's default;
        max_new_tokens and stop may be given per prompt (a list of ints; a list of lists of strings).
        Greedy when temperature is 0; else sampled (top-p, no top-k), seeded by `seed` when given.
        Prompts run length-sorted in passes of batch_size."""
        import torch  # heavy: imported when generating

        n = len(prompts)
        d = self.defaults
        limits = [d["max_new_tokens"] if m is None else int(m) for m in _per_row(max_new_tokens, n, "max_new_tokens")]
        if stop is None or isinstance(stop, str) or all(isinstance(s, str) for s in stop):
            stop = [[stop] if isinstance(stop, str) else list(stop or [])] * n
        stops = _per_row(list(stop), n, "stop")
        temperature = d["temperature"] if temperature is None else float(temperature)
        top_p = d["top_p"] if top_p is None else float(top_p)
        ids = self.encode(prompts)
        self.check_context(ids, limits)
        if seed is not None:
            torch.manual_seed(seed)
        out: list[Generated | None] = [None] * n
        order = sorted(range(n), key=lambda r: len(ids[r]))
        for i in range(0, n, self.batch_size):
            rows = order[i: i + self.batch_size]
            emit = None if on_text is None else (lambda k, delta, rows=rows: on_text(rows[k], delta))
            done = self._generate_pass([ids[r] for r in rows], [limits[r] for r in rows], [stops[r] for r in rows],
                                       temperature, top_p, emit)
            for r, g in zip(rows, done):
                out[r] = g
        return out

    def _generate_pass(self, ids: list[list[int]], limits: list[int], stops: list[list[str]], temperature: float,
                       top_p: float, on_text) -> list[Generated]:
        import torch  # heavy: imported when generating
        from transformers import StoppingCriteria, StoppingCriteriaList

        width, dev = max(len(x) for x in ids), self.model.device
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):  # padded on the left: every row's next token goes in the same column
            input_ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[r, width - len(x):] = 1
        tracker = RowTracker(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), limits, stops,
                             self.eos_ids, on_text)

        class Track(StoppingCriteria):
            def __call__(self, seq, scores, **kw):
                last = seq[:, -1].tolist()
                return torch.tensor([tracker.add(r, t) for r, t in enumerate(last)], dtype=torch.bool,
                                    device=seq.device)

        kw = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                            "top_p": top_p, "top_k": 0}
        with torch.no_grad():
            self.model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max(limits),
                                stopping_criteria=StoppingCriteriaList([Track()]), pad_token_id=self.pad_id, **kw)
        tracker.close_all()
        return [Generated(tracker.text[r], tracker.finish[r], len(ids[r]), len(tracker.tokens[r]))
                for r in range(len(ids))]

    def logits(self, texts: Sequence[str], mean_pooled: bool = False):
        nll, emb = prompt_outputs(self.model, self.tokenizer, list(texts), self.batch_size, self.max_length)
        if not self.labels:
            return (-nll)[:, None], emb
        return llm.label_loglik(self.model, self.tokenizer, list(texts), self.labels, self.max_length,
                                self.batch_size), emb

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        if not self.labels:
            return np.exp(np.asarray(logits, dtype=np.float64))
        return softmax(logits, self.temperature)

    def labels_from_proba(self, probs: np.ndarray) -> list[str]:
        if not self.labels:
            return [""] * len(probs)
        return [self.labels[i] for i in np.asarray(probs).argmax(axis=1)]
