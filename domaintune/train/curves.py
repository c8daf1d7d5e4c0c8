"""The one DVCLive writer: the training curves of DAPT, fine-tuning and SFT, named in one place.

Curves are drawn from the history an engine run returns (and its checkpoints carry), so a resumed run logs
one continuous curve. CURVES names the per-step metrics; dvc.yaml's plots read the TSV files DVCLive writes
under <live>/plots/metrics/<name>.tsv.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

CURVES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}  # engine record key -> curve


def write_curves(live_dir: str | Path, history: list[dict], names: dict[str, str] | None = None,
                 points: dict[str, Iterable[tuple[int, float]]] | None = None, summary: dict | None = None,
                 end_step: int | None = None) -> None:
    """DVCLive logs in `live_dir`: each history record's keys as the curves `names` (default CURVES; a record
    without a key is skipped), then extra curves given as (step, value) points, then the summary."""
    from dvclive import Live  # imports DVC; only training needs it

    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for rec in history:
            live.step = rec["step"]
            for key, name in (names or CURVES).items():
                if key in rec:
                    live.log_metric(name, rec[key], plot=True)
        for name, pts in (points or {}).items():
            for step, value in pts:
                live.step = step
                live.log_metric(name, value, plot=True)
        if end_step is not None:
            live.step = end_step
        live.summary.update(summary or {})
