"""MonitorSettings: what `domaintune monitor` judges and where it writes; the one source of its defaults.

Light on purpose (no numpy or pandas): the CLI builds its --help from it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class MonitorSettings:
    """What `domaintune monitor` judges and where it writes (paths relative to `repo`): the one source of its
    defaults, for the CLI's options and the Prefect flows' parameters alike."""
    repo: str = "."
    batch: str | None = None     # one batch file, or
    watch: str | None = None     # a folder of incoming batch files
    baseline: str = "models/drift_baseline"
    model: str = "models/export"
    variant: str = "auto"         # auto: the fastest passing variant that returns text embeddings (drift needs them)
    out: str = "reports/monitor"
    text_column: str = "text"
    id_column: str | None = None  # None: params.yaml's ingest.id_column, else "id"; carried into the review queue
    history: str = "reports/monitor_history.csv"
    review_queue: str = "data/review_queue.csv"
    alarm_command: str | None = None  # None: params.yaml's drift.alarm_command
    alarm_webhook: str | None = None  # None: params.yaml's drift.alarm_webhook

    @classmethod
    def of(cls, values: dict) -> "MonitorSettings":
        """From a mapping with these keys among others (e.g. the CLI's parsed options)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


DEFAULTS = {f.name: f.default for f in fields(MonitorSettings)}
