"""Serving: Ray actors, the Ray Serve deployment with an OpenAI-compatible API, Prometheus
metrics and the Grafana dashboard. Holds no model math."""

__all__: list[str] = []
