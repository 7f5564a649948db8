"""Prometheus metrics of the server: request latencies, token counts, and what the experts do.

Every metric is named ``moeflow_*``, in base units (seconds, bytes), counters end in ``_total``,
and labels come from bounded sets (endpoint, outcome, MoE layer index, parallel strategy).
Each ``ServeMetrics`` owns its own ``CollectorRegistry``: nothing goes into prometheus-client's
global default registry, so two servers (or two tests) in one process never collide.

Two sources feed it:
- the ingress observes every request it streams (time to first token, inter-token latency,
  end-to-end latency, prompt / generated tokens, outcome) — the latency a client sees, Ray Serve
  hops included;
- at scrape time the ingress asks the model replicas for a ``snapshot()`` (running / waiting
  requests, engine steps, per-layer expert load, and the statistics of any offload / placement
  component, read through a duck-typed ``stats()``), which ``EngineSnapshotCollector`` turns into
  metric families. Snapshot counters are cumulative since the replica started; a restarted
  replica starts again from zero, which Prometheus' ``rate()`` treats as a counter reset.

Shape legend: L = MoE layers, E = experts per layer.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

# Buckets span CPU-tiny to offloaded-huge latencies (sub-ms to minutes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)

ENDPOINTS = ("completions", "chat")
OUTCOMES = ("stop", "length", "abort", "error", "rejected", "invalid")

# (family name, type, help): the whole exported vocabulary; the dashboard may use only these.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("moeflow_requests", "counter", "Requests finished, by endpoint and outcome"),
    ("moeflow_http_requests_in_flight", "gauge", "Requests the ingress is handling now"),
    ("moeflow_time_to_first_token_seconds", "histogram", "Time from request arrival to its first token"),
    ("moeflow_inter_token_latency_seconds", "histogram", "Time between two streamed pieces of output"),
    ("moeflow_time_per_output_token_seconds", "histogram", "Mean time per output token after the first"),
    ("moeflow_e2e_request_latency_seconds", "histogram", "Time from request arrival to its last token"),
    ("moeflow_prompt_tokens", "counter", "Prompt tokens of admitted requests"),
    ("moeflow_generation_tokens", "counter", "Tokens generated"),
    ("moeflow_requests_running", "gauge", "Requests in the running batch (have produced a token)"),
    ("moeflow_requests_waiting", "gauge", "Requests admitted to the replica, waiting for their first token"),
    ("moeflow_engine_steps", "counter", "Engine steps (one batched forward each)"),
    ("moeflow_engine_step_seconds", "counter", "Seconds spent inside engine.step()"),
    ("moeflow_expert_cache_hits", "counter", "Expert lookups served from the GPU expert cache"),
    ("moeflow_expert_cache_misses", "counter", "Expert lookups that had to copy or compute elsewhere"),
    ("moeflow_expert_cache_evictions", "counter", "Experts evicted from the GPU expert cache"),
    ("moeflow_expert_prefetch_precision", "gauge", "Fraction of prefetched experts that were then used"),
    ("moeflow_expert_prefetch_recall", "gauge", "Fraction of used experts that had been prefetched"),
    ("moeflow_host_to_device_bytes", "counter", "Expert weight bytes copied host to GPU"),
    ("moeflow_cpu_computed_experts", "counter", "Expert computations run on the CPU instead of copied"),
    ("moeflow_cross_rank_tokens", "counter", "Tokens sent to an expert on another rank"),
    ("moeflow_tier_expert_tokens", "counter", "Token-to-expert pairs computed per tier (local experts, GPU cache or ranks, CPU hosts)"),
    ("moeflow_tier_seconds", "counter", "Seconds per tier: local expert math, waiting for CPU hosts, CPU host compute"),
    ("moeflow_expert_load_tokens", "counter", "Token-to-expert assignments, by MoE layer"),
    ("moeflow_expert_load_imbalance_ratio", "gauge", "Busiest expert's load over the mean load, by MoE layer"),
    ("moeflow_offload_enabled", "gauge", "1 when expert offloading statistics are being reported"),
    ("moeflow_parallel_strategy", "info", "Parallel strategy in use"),
    ("moeflow_replica_up", "gauge", "1 when the last scrape reached a model replica"),
)


def series_names() -> set[str]:
    """Every sample name the server can export (what PromQL can refer to)."""
    out = set()
    for name, kind, _ in FAMILIES:
        if kind == "counter":
            out |= {name + "_total", name + "_created"}
        elif kind == "histogram":
            out |= {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
        elif kind == "info":
            out.add(name + "_info")
        else:
            out.add(name)
    return out


_HELP = {name: doc for name, _, doc in FAMILIES}

# keys of a component's stats() dict (offload: the expert cache; placement: the EP runtime)
_COUNT_KEYS = {"hits": "moeflow_expert_cache_hits", "misses": "moeflow_expert_cache_misses",
               "evictions": "moeflow_expert_cache_evictions", "bytes_copied": "moeflow_host_to_device_bytes",
               "cpu_computed": "moeflow_cpu_computed_experts", "cross_rank_tokens": "moeflow_cross_rank_tokens"}
# keys of the CPU tier's stats() (offload.tiered.TierRuntime) -> (family, tier label)
_TIER_KEYS = {"local_pairs": ("moeflow_tier_expert_tokens", "local"),
              "gpu_rank_pairs": ("moeflow_tier_expert_tokens", "gpu"),  # the cache or the EP ranks
              "cpu_pairs": ("moeflow_tier_expert_tokens", "cpu_host"),
              "local_s": ("moeflow_tier_seconds", "local"),
              "wait_s": ("moeflow_tier_seconds", "cpu_wait"),
              "host_compute_s": ("moeflow_tier_seconds", "cpu_host")}
_RATIO_KEYS = {"prefetch_precision": "moeflow_expert_prefetch_precision",
               "prefetch_recall": "moeflow_expert_prefetch_recall"}


class ServeMetrics:
    """The registry of one ingress: request metrics observed live plus the replica snapshot."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moeflow_requests", _HELP["moeflow_requests"], ["endpoint", "outcome"], registry=r)
        self.in_flight = Gauge("moeflow_http_requests_in_flight", _HELP["moeflow_http_requests_in_flight"],
                               registry=r)
        self.ttft = Histogram("moeflow_time_to_first_token_seconds",
                              _HELP["moeflow_time_to_first_token_seconds"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("moeflow_inter_token_latency_seconds",
                             _HELP["moeflow_inter_token_latency_seconds"], buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("moeflow_time_per_output_token_seconds",
                              _HELP["moeflow_time_per_output_token_seconds"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("moeflow_e2e_request_latency_seconds",
                             _HELP["moeflow_e2e_request_latency_seconds"], buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moeflow_prompt_tokens", _HELP["moeflow_prompt_tokens"], registry=r)
        self.generation_tokens = Counter("moeflow_generation_tokens", _HELP["moeflow_generation_tokens"],
                                         registry=r)
        # pre-create every (endpoint, outcome) pair so dashboards see zeros, not gaps
        for ep in ENDPOINTS:
            for oc in OUTCOMES:
                self.requests.labels(ep, oc)
        self.engine = EngineSnapshotCollector()
        r.register(self.engine)

    def finish(self, endpoint: str, outcome: str) -> None:
        assert endpoint in ENDPOINTS and outcome in OUTCOMES, (endpoint, outcome)
        self.requests.labels(endpoint, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's latencies as its output streams through the ingress."""

    def __init__(self, metrics: ServeMetrics, start: float):
        self.m = metrics
        self.start = start
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def on_output(self, now: float, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.start)
        else:
            self.m.itl.observe(now - self.last)
        self.last = now
        self.tokens += num_tokens
        self.m.generation_tokens.inc(num_tokens)

    def on_finish(self, now: float) -> None:
        self.m.e2e.observe(now - self.start)
        if self.first is not None and self.tokens > 1:
            self.m.tpot.observe((self.last - self.first) / (self.tokens - 1))


class EngineSnapshotCollector:
    """Turns the model replicas' latest ``snapshot()`` dicts into metric families at scrape time.

    Each family carries a ``replica`` label (bounded by the number of replicas), so counters stay
    monotonic per replica when a scrape reaches different replicas; PromQL sums over it. A replica
    not heard from for ``stale_s`` seconds (dead, or scaled down) is dropped.
    """

    def __init__(self, stale_s: float = 120.0):
        self.stale_s = stale_s
        self.snapshots: dict[str, tuple[float, dict]] = {}
        self.reached = False

    def update(self, snapshots: list[dict], now: float) -> None:
        """Record the snapshots one scrape collected (an empty list: no replica answered)."""
        self.reached = bool(snapshots)
        for snap in snapshots:
            self.snapshots[str(snap.get("replica", "0"))] = (now, snap)
        for rid in [r for r, (t, _) in self.snapshots.items() if now - t > self.stale_s]:
            del self.snapshots[rid]

    def describe(self):
        return []  # families depend on the snapshots; skip the registry's describe-time collect

    def collect(self):
        yield GaugeMetricFamily("moeflow_replica_up", _HELP["moeflow_replica_up"], value=float(self.reached))
        if not self.snapshots:
            return
        R = ["replica"]
        fam = {}

        def family(cls, name, labels=()):
            if name not in fam:
                fam[name] = cls(name, _HELP[name], labels=R + list(labels))
            return fam[name]

        for rid, (_, s) in sorted(self.snapshots.items()):
            family(GaugeMetricFamily, "moeflow_requests_running").add_metric([rid], s["running"])
            family(GaugeMetricFamily, "moeflow_requests_waiting").add_metric([rid], s["waiting"])
            family(CounterMetricFamily, "moeflow_engine_steps").add_metric([rid], s["steps"])
            family(CounterMetricFamily, "moeflow_engine_step_seconds").add_metric([rid], s["step_seconds"])
            comp = s.get("components") or {}
            for key, name in _COUNT_KEYS.items():
                family(CounterMetricFamily, name).add_metric([rid], float(comp.get(key, 0)))
            for key, name in _RATIO_KEYS.items():
                if comp.get(key) is not None:  # a ratio is only meaningful when something prefetches
                    family(GaugeMetricFamily, name).add_metric([rid], float(comp[key]))
            for key, (name, tier) in _TIER_KEYS.items():
                if key in comp:  # only when a CPU tier runs
                    family(CounterMetricFamily, name, ["tier"]).add_metric([rid, tier], float(comp[key]))
            offloading = any(k in comp for k in ("hits", "misses", "bytes_copied"))
            family(GaugeMetricFamily, "moeflow_offload_enabled").add_metric([rid], float(offloading))
            strategy = str(comp.get("strategy") or s.get("strategy") or "single")
            family(InfoMetricFamily, "moeflow_parallel_strategy").add_metric([rid], {"strategy": strategy})
            for layer, counts_E in enumerate(s.get("expert_load") or []):
                total = float(sum(counts_E))
                mean = total / max(len(counts_E), 1)
                family(CounterMetricFamily, "moeflow_expert_load_tokens", ["layer"]).add_metric([rid, str(layer)],
                                                                                                  total)
                family(GaugeMetricFamily, "moeflow_expert_load_imbalance_ratio", ["layer"]).add_metric(
                    [rid, str(layer)], max(counts_E) / mean if mean > 0 else 0.0)
        yield from fam.values()


# ---- engine-side statistics (run inside the replica) ----------------------------------------------

class ExpertLoadCounter:
    """Counts token-to-expert assignments per MoE layer with forward hooks on each router.

    The engine forwards every cache row each step, free rows and right padding included, so a
    pre-hook on the model keeps the step's ``valid_BT`` and the router hooks count only valid
    tokens (the MoE block routes ``x_BTD.reshape(-1, D)``, so token n is row n // T, column n % T).
    The counts stay on the model's device and are only copied at scrape time: counting adds no
    host synchronisation to a step.
    """

    def __init__(self, model, blocks: list):
        self.counts_LE: list[Any] = [None] * len(blocks)
        self.valid_N = None
        self.handles = [model.register_forward_pre_hook(self._capture, with_kwargs=True)]
        self.handles += [b.router.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    @classmethod
    def attach(cls, model) -> "ExpertLoadCounter | None":
        blocks = model.moe_blocks() if model is not None and hasattr(model, "moe_blocks") else []
        return cls(model, blocks) if blocks else None

    def _capture(self, module, args, kwargs):
        valid_BT = kwargs.get("valid_BT", args[2] if len(args) > 2 else None)
        self.valid_N = None if valid_BT is None else valid_BT.reshape(-1)
        return None

    def _hook(self, idx: int):
        def hook(module, inputs, output):
            import torch
            topk_ids_NK, router_logits_NE = output[0], output[2]
            N, K = topk_ids_NK.shape
            if self.counts_LE[idx] is None:
                E = router_logits_NE.shape[-1]
                self.counts_LE[idx] = torch.zeros(E + 1, dtype=torch.long, device=topk_ids_NK.device)
            # slot 0 collects id -1 (no expert), so scatter_add needs no masking (no host sync)
            ids = topk_ids_NK.reshape(-1).long() + 1
            if self.valid_N is not None and self.valid_N.numel() == N:
                weight = self.valid_N.to(device=ids.device, dtype=torch.long).repeat_interleave(K)
            else:
                weight = torch.ones_like(ids)
            self.counts_LE[idx].scatter_add_(0, ids, weight)
            return None
        return hook

    def snapshot(self) -> list[list[int]]:
        return [[] if c is None else c[1:].cpu().tolist() for c in self.counts_LE]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


def _providers(model, engine) -> list:
    """Objects whose ``stats()`` describe offload / placement work, each counted once.

    The model itself (if an offload or placement step gave it ``stats()``) wins; otherwise shared
    ``.cache`` objects of its modules (one expert cache serves many layers, so its stats must not
    be summed once per layer); otherwise every module with a ``stats()``.
    """
    found = []
    if engine is not None and callable(getattr(engine, "stats", None)):
        found.append(engine)
    if model is None:
        return found
    if callable(getattr(model, "stats", None)):
        return found + [model]
    tier = getattr(model, "cpu_tier", None)  # offload.apply_cpu_tier's runtime, beside any cache
    found += [tier] if callable(getattr(tier, "stats", None)) else []
    if callable(getattr(getattr(model, "offload_cache", None), "stats", None)):  # offload.apply_offload's
        return found + [model.offload_cache]
    caches, modules, seen = [], [], set()
    for m in model.modules():
        cache = getattr(m, "cache", None)
        if cache is not None and callable(getattr(cache, "stats", None)) and id(cache) not in seen:
            seen.add(id(cache))
            caches.append(cache)
        elif m is not model and callable(getattr(m, "stats", None)):
            modules.append(m)
    return found + (caches or modules)


def collect_component_stats(model, engine=None) -> dict:
    """Merge every provider's ``stats()``: counts add up, ratios are averaged, strategy is the first."""
    merged: dict[str, Any] = {}
    ratios: dict[str, list[float]] = {}
    for p in _providers(model, engine):
        st = p.stats()
        if not isinstance(st, dict):
            continue
        if st.get("prefetches") == 0:  # nothing prefetched (prefetch off): the ratios mean nothing
            st = {k: v for k, v in st.items() if k not in _RATIO_KEYS}
        for k, v in st.items():
            if (k in _COUNT_KEYS or k in _TIER_KEYS) and v is not None:
                merged[k] = merged.get(k, 0) + float(v)
            elif k in _RATIO_KEYS and v is not None:
                ratios.setdefault(k, []).append(float(v))
            elif k in ("strategy", "parallel_strategy") and v and "strategy" not in merged:
                merged["strategy"] = str(v)
    for k, vs in ratios.items():
        merged[k] = sum(vs) / len(vs)
    return merged
