"""ServeSettings: every knob of `domaintune serve`, validated once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domaintune.core.device import MAX_BATCH_TOKENS
from domaintune.export.variants import AUTO, requested_variant
from domaintune.predict.log import BACKUPS, LOG_TEXT, MAX_BYTES

MODEL_NAME = "domaintune"  # the model name in the KServe v2 paths
VERSION_HEADER = "X-Model-Version"


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"       # loopback unless told otherwise
    port: int = 8080
    variant: str = AUTO           # the export's variant (domaintune.tasks.load_predictor); auto: the fastest that
                                  # passed its gates as the export stage measured them (float32 without a record)
    device: str = "cpu"           # where a PyTorch model runs (ONNX variants run where onnxruntime runs them)
    repo: Path = Path(".")        # registry: serve its GTO prod version
    model_dir: Path | None = None  # a plain folder instead of the registry (version "workspace")
    poll_s: float = 5.0           # how often the registry is checked for a new served version
    retry_s: float = 5.0          # a served version that failed to load is retried after this, then after
    retry_max_s: float = 300.0    # twice as long each time, up to this
    keep_releases: int = 3        # materialised releases kept besides the served and the shadow (after a swap)
    max_batch: int = 64           # texts gathered from concurrent requests into one batch
    infer_batch: int = 16         # the most texts per forward pass: a batch runs sorted by token length in passes
                                  # of at most this many texts within max_batch_tokens, so short texts are not
                                  # padded to the longest of 64 (less wasted compute)
    max_batch_tokens: int = MAX_BATCH_TOKENS  # token budget of one forward pass: (longest text) x (texts) <= it
                                  # (a longer text alone); core.device.MAX_BATCH_TOKENS says why 8192
    max_wait_ms: float = 5.0      # how long the first request of a batch waits for company
    max_batch_chars: int = 200_000  # characters per batch: a larger request is split over several batches,
                                  # taken in turn with the other waiting requests (a small one is not held)
    max_texts: int = 256          # texts per request
    max_chars: int = 20_000       # characters per text
    max_body_bytes: int = 4 << 20  # request body
    body_timeout_s: float = 30.0  # a request body not received within this is answered 408 and closed
    top_k: int = 3                # default top-k in /predict answers
    max_new_tokens: int = 1024    # generation: the most tokens one /v1 request may ask for (max_tokens)
    shadow: str | None = None     # candidate version (or folder) run on the same requests
    shadow_log: Path | None = None  # JSONL of both predictions; default reports/shadow/<candidate>.jsonl
    log_text: str = "hash"        # request text in the logs the server writes (prediction, shadow): hash|plain|none
    prediction_log: Path | None = None  # every prediction, one JSONL line per text and version (None: off;
                                  # the CLI's default is reports/predictions/serve.jsonl under --repo)
    prediction_log_bytes: int = MAX_BYTES  # the prediction log is rotated before it passes this size
    prediction_log_files: int = BACKUPS    # rotated prediction log files kept
    shadow_queue: int = 8         # shadow batches waiting at most; more are skipped and counted
    # The guard (following the registry): after a promotion the replaced champion shadows the new one for this
    # many texts, then the pair is judged (domaintune.monitor.guard) and a worse champion rolled back. 0: off.
    # `domaintune serve` takes these from params.yaml's release section.
    guard_requests: int = 0
    max_regression: float = 0.005
    resamples: int = 1000
    seed: int = 0
    access_log: bool = False

    def __post_init__(self):
        checks = {"port": 0 <= self.port <= 65535, "poll_s": self.poll_s > 0, "max_batch": self.max_batch >= 1,
                  "infer_batch": self.infer_batch >= 1, "max_batch_tokens": self.max_batch_tokens >= 1,
                  "max_wait_ms": self.max_wait_ms >= 0, "max_texts": self.max_texts >= 1,
                  "max_chars": self.max_chars >= 1, "max_body_bytes": self.max_body_bytes >= 64,
                  "top_k": self.top_k >= 1, "shadow_queue": self.shadow_queue >= 1,
                  "guard_requests": self.guard_requests >= 0, "max_regression": 0 <= self.max_regression < 1,
                  "resamples": self.resamples >= 100,
                  "max_new_tokens": self.max_new_tokens >= 1, "max_batch_chars": self.max_batch_chars >= 1,
                  "body_timeout_s": self.body_timeout_s > 0, "retry_s": self.retry_s > 0,
                  "retry_max_s": self.retry_max_s >= self.retry_s, "keep_releases": self.keep_releases >= 0,
                  "log_text": self.log_text in LOG_TEXT, "prediction_log_bytes": self.prediction_log_bytes >= 1,
                  "prediction_log_files": self.prediction_log_files >= 0}
        try:  # one name per variant everywhere (/version, /metrics, logs); 'float' is accepted as float32
            object.__setattr__(self, "variant", requested_variant(self.variant))
        except ValueError:
            checks["variant"] = False
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"serve settings: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
