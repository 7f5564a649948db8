"""Metrics: own registries, names and units, snapshot families, duck-typed component stats, expert load."""
import json
import re

import prometheus_client
import torch
from prometheus_client.parser import text_string_to_metric_families

from serve.metrics import (FAMILIES, ExpertLoadCounter, RequestTimer, ServeMetrics, collect_component_stats,
                           series_names)

FULL_SNAPSHOT = {
    "replica": "r1", "running": 3, "waiting": 2, "steps": 10, "step_seconds": 1.5, "strategy": "single",
    "components": {"hits": 90.0, "misses": 10.0, "evictions": 4.0, "bytes_copied": 1e6, "cpu_computed": 2.0,
                   "cross_rank_tokens": 7.0, "prefetch_precision": 0.75, "prefetch_recall": 0.5,
                   "strategy": "offload", "local_pairs": 5.0, "gpu_rank_pairs": 30.0, "cpu_pairs": 12.0,
                   "local_s": 0.1, "wait_s": 0.2, "host_compute_s": 0.3},
    "expert_load": [[1, 2, 3, 2], [4, 0, 0, 0]],
}


def _samples(m: ServeMetrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _r(**labels):
    return tuple(sorted({"replica": "r1", **labels}.items()))


def test_names_units_and_own_registries():
    for name, kind, _ in FAMILIES:
        assert re.fullmatch(r"moeflow_[a-z0-9_]+", name) and not name.endswith("_total")
        if kind == "histogram":
            assert name.endswith("_seconds")
    a, b = ServeMetrics(), ServeMetrics()  # two in one process: no duplicate-registration error
    a.generation_tokens.inc(5)
    assert _samples(b)[("moeflow_generation_tokens_total", ())] == 0
    assert not [n for n in prometheus_client.REGISTRY._names_to_collectors if n.startswith("moeflow")]


def test_snapshot_families_and_request_timer():
    m = ServeMetrics()
    assert _samples(m)[("moeflow_replica_up", ())] == 0  # no replica reached yet
    m.engine.update([FULL_SNAPSHOT], now=100.0)
    t = RequestTimer(m, start=0.0)
    for now in (0.5, 0.6, 0.8):
        t.on_output(now, 1)
    t.on_output(0.9, 0)  # an empty piece is not a token
    t.on_finish(1.0)
    m.finish("chat", "stop")
    s = _samples(m)
    assert s[("moeflow_replica_up", ())] == 1
    assert s[("moeflow_requests_running", _r())] == 3 and s[("moeflow_requests_waiting", _r())] == 2
    assert s[("moeflow_expert_cache_hits_total", _r())] == 90
    assert s[("moeflow_host_to_device_bytes_total", _r())] == 1e6
    assert s[("moeflow_expert_prefetch_precision", _r())] == 0.75
    assert s[("moeflow_parallel_strategy_info", _r(strategy="offload"))] == 1
    assert s[("moeflow_offload_enabled", _r())] == 1
    assert s[("moeflow_expert_load_tokens_total", _r(layer="0"))] == 8
    assert s[("moeflow_tier_expert_tokens_total", _r(tier="cpu_host"))] == 12
    assert s[("moeflow_tier_seconds_total", _r(tier="cpu_wait"))] == 0.2
    assert s[("moeflow_expert_load_imbalance_ratio", _r(layer="1"))] == 4.0  # 4 / mean 1
    assert s[("moeflow_time_to_first_token_seconds_sum", ())] == 0.5
    assert s[("moeflow_inter_token_latency_seconds_count", ())] == 2
    assert abs(s[("moeflow_time_per_output_token_seconds_sum", ())] - 0.15) < 1e-9
    assert s[("moeflow_e2e_request_latency_seconds_sum", ())] == 1.0
    assert s[("moeflow_generation_tokens_total", ())] == 3
    assert s[("moeflow_requests_total", (("endpoint", "chat"), ("outcome", "stop")))] == 1
    assert {n for n, _ in s} <= series_names()
    # every family of the vocabulary shows up once a full snapshot is there
    exported = {n for n, _ in s}
    for name, kind, _ in FAMILIES:
        assert any(e.startswith(name) for e in exported), name
    # without offloading: counters read 0, ratios are absent rather than a fake 0
    m.engine.update([{**FULL_SNAPSHOT, "components": {}, "expert_load": []}], now=101.0)
    s = _samples(m)
    assert s[("moeflow_expert_cache_hits_total", _r())] == 0 and s[("moeflow_offload_enabled", _r())] == 0
    assert ("moeflow_expert_prefetch_recall", _r()) not in s
    assert s[("moeflow_parallel_strategy_info", _r(strategy="single"))] == 1


def test_each_replica_keeps_its_own_series_and_silent_replicas_expire():
    m = ServeMetrics()
    m.engine.update([FULL_SNAPSHOT, {**FULL_SNAPSHOT, "replica": "r2", "steps": 4}], now=0.0)
    m.engine.update([{**FULL_SNAPSHOT, "steps": 12}], now=60.0)  # this scrape only reached r1
    s = _samples(m)
    assert s[("moeflow_engine_steps_total", _r())] == 12
    assert s[("moeflow_engine_steps_total", _r(replica="r2"))] == 4  # kept, not reset by r1's numbers
    m.engine.update([{**FULL_SNAPSHOT, "steps": 13}], now=200.0)  # r2 silent for 200 s: gone
    s = _samples(m)
    assert ("moeflow_engine_steps_total", _r(replica="r2")) not in s
    m.engine.update([], now=201.0)
    assert _samples(m)[("moeflow_replica_up", ())] == 0


class _Cache:
    def __init__(self, hits):
        self.h = hits

    def stats(self):
        return {"hits": self.h, "misses": 1, "prefetch_precision": 0.5, "strategy": "offload"}


class _Layer(torch.nn.Module):
    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def stats(self):  # a per-layer view of the shared cache: must not be summed once per layer
        return self.cache.stats()


def test_component_stats_count_a_shared_cache_once():
    shared = _Cache(10)
    model = torch.nn.Sequential(_Layer(shared), _Layer(shared), _Layer(_Cache(5)))
    merged = collect_component_stats(model)
    assert merged == {"hits": 15.0, "misses": 2.0, "prefetch_precision": 0.5, "strategy": "offload"}

    class WithStats(torch.nn.Sequential):
        def stats(self):
            return {"cross_rank_tokens": 3, "strategy": "expert_parallel"}

    assert collect_component_stats(WithStats(_Layer(shared))) == {"cross_rank_tokens": 3.0,
                                                                   "strategy": "expert_parallel"}
    assert collect_component_stats(None) == {}


def test_expert_load_counter_counts_only_valid_tokens():
    import moe
    from moe.tiny import ensure_tiny_model
    model = moe.load_model(str(ensure_tiny_model()))
    counter = ExpertLoadCounter.attach(model)
    seen = []
    hooks = [b.router.register_forward_hook(lambda m, i, o: seen.append(o[0].clone())) for b in model.moe_blocks()]
    valid_BT = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])  # row 2 is a free row
    with torch.inference_mode():
        model(torch.randint(0, 100, (3, 5)), cache=model.new_cache(3, 16), valid_BT=valid_BT)
        model(torch.randint(0, 100, (1, 4)))  # no mask: every token counts
    for h in hooks:
        h.remove()
    counter.detach()
    E = model.moe_blocks()[0].experts.num_experts
    n_layers = len(model.moe_blocks())
    masked, full = seen[:n_layers], seen[n_layers:]
    expected = [(torch.bincount(m.reshape(3, 5, -1)[valid_BT].reshape(-1), minlength=E)
                 + torch.bincount(f.reshape(-1), minlength=E)).tolist() for m, f in zip(masked, full)]
    K = masked[0].shape[-1]
    assert counter.snapshot() == expected and sum(expected[0]) == (7 + 4) * K
    assert ExpertLoadCounter.attach(None) is None


def test_dashboard_uses_only_exported_metrics():
    dash = json.load(open("serve/dashboards/moeflow.json"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bmoeflow_[a-z0-9_]+", expr))
        assert names and names <= series_names(), expr
        used |= names
    # every family is on the dashboard
    for name, _, _ in FAMILIES:
        assert any(u.startswith(name) for u in used), name
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
