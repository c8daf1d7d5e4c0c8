"""The dapt hook of a tagger: masked-LM domain-adaptive pre-training of the encoder on the sentences
(domaintune/train/dapt.py), as for a classifier; in one process or data-parallel under torchrun."""
from __future__ import annotations

from domaintune.core.device import stage_device
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.modeling.encoders import set_threads
from domaintune.train import dapt, distributed


def run(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "dapt")

    def train() -> dict:
        if distributed.world_size() == 1 and not distributed.launched():
            set_threads()
        return dapt.run(io.in_dir, io.out, io.metrics, base, params, live_dir=io.live,
                        checkpoint_root=io.checkpoints, progress=io.progress)

    if not params.enabled:
        return dapt.summary_line(train())
    stage_device(base)  # a bad device is one line before anything is launched or read
    return dapt.summary_line(distributed.run_in_processes("dapt", io.argv, params, io.metrics, train))
