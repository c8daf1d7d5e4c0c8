"""SetFit (Tunstall et al. 2022) on the training engine: contrastive fine-tuning of the sentence encoder on
pairs of labelled texts, then a logistic-regression head on its embeddings (finetune.method: setfit).

Phase 1 (here): pairs drawn as SetFit's default "oversampling" does -- for each of `setfit_iterations`
iterations, every training row is paired with one row of its own label (target 1) and one of another
label (target 0) -- shuffled by the run's seed and capped at `setfit_max_pairs`; the encoder learns
CosineSimilarityLoss (MSE between the cosine of the two pooled embeddings and the target) for
`setfit_epochs` passes, with AdamW, 10% linear warm-up (SetFit's warmup_proportion) and linear decay.
Phase 2 (train/classifier.py): the run continues as method `head` over the tuned encoder, whose head starts
from the logistic-regression probe (SetFit's default head is sklearn's LogisticRegression on the same
embeddings), so the result is an ordinary domaintune classifier (calibration, export, serve, drift).

Why not the `setfit` package: setfit 1.2 installs and trains with the pinned transformers 5.23 and
sentence-transformers 6.2 (checked in a scratch folder), but its pair sampler shuffles with a fixed
RandomState(42) whatever the seed, its trainer runs its own transformers loop (its own device choice, no
resume from this project's checkpoints, checkpoint folders of its own) and it adds setfit + evaluate to
the pins, for what is ~100 lines here on the engine every other objective uses (device, bf16, resume,
curves).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from domaintune.modeling.encoders import pool
from domaintune.train.engine import Engine, EngineConfig, param_groups

WARMUP = 0.1  # SetFit's warmup_proportion


def contrastive_pairs(y: np.ndarray, iterations: int, seed: int, max_pairs: int = 0) -> np.ndarray:
    """[P, 3] int rows (i, j, target): per iteration, per row i, one positive j (same label; i itself when
    it is its label's only row) and one negative j (another label; none when there is one label only)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    by_label = {lab: np.flatnonzero(y == lab) for lab in np.unique(y)}
    others = {lab: np.flatnonzero(y != lab) for lab in by_label}
    pairs = []
    for _ in range(iterations):
        for i, lab in enumerate(y):
            same, diff = by_label[lab], others[lab]
            pairs.append((i, int(same[rng.integers(len(same))]), 1))
            if len(diff):
                pairs.append((i, int(diff[rng.integers(len(diff))]), 0))
    out = np.array(pairs, dtype=np.int64).reshape(-1, 3)
    out = out[rng.permutation(len(out))]
    return out[:max_pairs] if max_pairs else out


class PairBatches:
    """Batches of pairs, reshuffled each pass by the seed; state_dict()/load_state_dict() for exact resume."""

    def __init__(self, pairs: np.ndarray, ids: list, pad_id: int, batch_size: int, seed: int):
        self.pairs, self.ids, self.pad_id, self.bs, self.seed = pairs, ids, pad_id, batch_size, seed
        self.per_pass = math.ceil(len(pairs) / batch_size)
        self.served = 0

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.served = int((state or {}).get("served", 0))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch

        epoch, pos = divmod(self.served, self.per_pass)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        rows = self.pairs[order[pos * self.bs:(pos + 1) * self.bs]]
        self.served += 1
        batch = {"target": torch.tensor(rows[:, 2], dtype=torch.float32)}
        for side, col in (("a", 0), ("b", 1)):
            seqs = [self.ids[i] for i in rows[:, col]]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for k, s in enumerate(seqs):
                ids[k, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[k, :len(s)] = 1
            batch[f"{side}_ids"], batch[f"{side}_mask"] = ids, mask
        return batch


def cosine_loss(pooling: str):
    """SetFit's CosineSimilarityLoss: MSE(cos(u, v), target)."""
    import torch.nn.functional as F

    def loss_fn(encoder, batch: dict):
        u = pool(encoder(input_ids=batch["a_ids"], attention_mask=batch["a_mask"]).last_hidden_state,
                 batch["a_mask"], pooling)
        v = pool(encoder(input_ids=batch["b_ids"], attention_mask=batch["b_mask"]).last_hidden_state,
                 batch["b_mask"], pooling)
        return F.mse_loss(F.cosine_similarity(u.float(), v.float()), batch["target"])
    return loss_fn


@dataclass
class Tuned:
    """Phase 1's result, in the shape train/classifier.py starts a run from (warmstart.Start's weights())."""
    encoder: Any
    tokenizer: Any
    head: Optional[dict] = None
    labels: Sequence[str] = ()
    info: Optional[dict] = None

    def weights(self):
        return self.encoder, self.tokenizer, self.head


def contrastive_tune(encoder, tokenizer, texts: Sequence[str], y: np.ndarray, ft, max_length: int, seed: int,
                     device: str, checkpoint_dir: Optional[Path] = None, progress: bool = True) -> dict:
    """Phase 1 in place on `encoder`; returns its record (pairs, steps, seconds, losses)."""
    import torch

    torch.manual_seed(seed)
    pairs = contrastive_pairs(y, ft.setfit_iterations, seed, ft.setfit_max_pairs)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = PairBatches(pairs, ids, pad, ft.setfit_batch_size, seed)
    total = batches.per_pass * ft.setfit_epochs
    for p in encoder.parameters():
        p.requires_grad = True
    groups = param_groups(encoder.named_parameters(), ft.setfit_lr, ft.weight_decay)
    cfg = EngineConfig(lr=ft.setfit_lr, total_steps=total, warmup_steps=int(WARMUP * total), scheduler="linear",
                       max_grad_norm=ft.max_grad_norm, bf16=ft.bf16, checkpoint_every=ft.checkpoint_every,
                       compile=False)
    engine = Engine(encoder, groups, cfg, checkpoint_dir=checkpoint_dir, device=device)
    encoder.train()
    t0 = time.perf_counter()
    history = engine.fit(cosine_loss(ft.pooling), batches, progress=f"setfit pairs seed {seed}" if progress else None)
    encoder.eval()  # its checkpoints go with the run's folder (train_classifier clears it when done)
    return {"pairs": int(len(pairs)), "positive_pairs": int(pairs[:, 2].sum()), "steps": engine.step_count,
            "seconds": time.perf_counter() - t0, "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None}
