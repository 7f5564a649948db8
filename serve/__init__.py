"""Serving: the Ray Serve application with an OpenAI-compatible API, the model replica that runs the
engine with continuous batching, Prometheus metrics and the Grafana dashboard. Holds no model math.

    moe serve [MODEL] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--gpu-memory 24GiB]
    serve run serve/config.yaml

Modules: ``api`` (OpenAI protocol and validation; no Ray), ``engine_deployment`` (the replica and its
batching loop; no Ray), ``metrics`` (prometheus-client, own registry), ``app`` (the Serve application
builder ``build_app``, ``ServeConfig``, ``run_server``; imports Ray), ``cli`` (``moe serve``), and
``cpu_host`` (CPU expert-hosting Ray actors of the placement tier, written with placement/).
Nothing is imported here, so ``import serve.api`` stays light on machines without Ray.
"""

__all__: list[str] = ["api", "app", "cli", "cpu_host", "engine_deployment", "metrics"]
