"""The dapt hook of a classifier: masked-LM domain-adaptive pre-training of the encoder
(domaintune/train/dapt.py), in one process or data-parallel under torchrun."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.train import dapt


def run(io: StageIO) -> str:
    return dapt.stage(io)
