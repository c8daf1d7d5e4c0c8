"""The dapt hook of a tagger: masked-LM domain-adaptive pre-training of the encoder on the sentences, the
classifier's stage as it is (domaintune/train/dapt.stage); in one process or data-parallel under torchrun."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.train import dapt


def run(io: StageIO) -> str:
    return dapt.stage(io)
