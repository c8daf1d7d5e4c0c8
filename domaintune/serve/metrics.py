"""Prometheus metrics of one server (own CollectorRegistry, so several apps can live in one process)."""
from __future__ import annotations

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("domaintune_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("domaintune_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_texts = Histogram("domaintune_batch_texts", "texts (or prompts) per inference batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_requests = Histogram("domaintune_batch_requests", "requests per inference batch",
                                        buckets=(1, 2, 3, 4, 8, 16, 32, 64), registry=r)
        self.texts = Counter("domaintune_texts", "texts classified or prompts completed", ["role"], registry=r)
        self.tokens = Counter("domaintune_tokens", "generation: prompt and generated (completion) tokens", ["kind"],
                              registry=r)
        self.rejected = Counter("domaintune_rejected_requests", "requests refused, by reason", ["reason"],
                                registry=r)
        self.model_info = Gauge("domaintune_model_info", "the loaded models (value 1)",
                                ["role", "version", "variant"], registry=r)
        self.swaps = Counter("domaintune_model_swaps", "hot swaps to a new served version", registry=r)
        self.load_failures = Counter("domaintune_model_load_failures",
                                     "versions that failed to load or verify (the old one kept serving)",
                                     registry=r)
        self.shadow_skipped = Counter("domaintune_shadow_skipped_texts",
                                      "texts not shadowed because the shadow queue was full", registry=r)

    def set_models(self, served, shadow=None) -> None:
        self.model_info.clear()
        self.model_info.labels("served", served.version, served.variant).set(1)
        if shadow is not None:
            self.model_info.labels("shadow", shadow.version, shadow.variant).set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
