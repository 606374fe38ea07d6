"""Telemetry that never breaks a request: tracing and its exporters, Prometheus
metrics, JSON logs, and the sampled decision log."""
