"""Offloading: host expert store, GPU expert cache, policies, prefetcher, CPU computation of
missed experts. Offloaded output equals resident output.

    from offload import OffloadConfig, apply_offload, route_by_trace, simulate, oracle_bound
    model = apply_offload(model, OffloadConfig(gpu_memory="24GiB", policy="lru", cpu_fallback=True))
    model.offload_cache.stats()
    model = apply_offload(model, OffloadConfig(gpu_memory="24GiB", driver="device"))  # decided on the GPU
    # the default driver='auto' takes 'device' where it runs and measured faster, else 'host' (apply.resolve_driver)
"""
from .apply import (OffloadedExperts, apply_offload, auto_prefill_chunk, install, kv_cache_bytes, plan_slots,
                    prefill_activation_bytes, prefill_chunk_for, route_by_trace, step_activation_bytes)
from .cache import ExpertCache
from .config import OffloadConfig, parse_bytes
from .cost_model import CostModel
from .device_cache import DeviceExpertCache, DeviceOffloadedExperts
from .policies import BeladyPolicy, LFUPolicy, LRUPolicy, Policy, PredictorPolicy, make_policy
from .prefetch import CopyBudget, Lookahead, TransitionPredictor
from .simulator import oracle_bound, shared_pool_belady, simulate
from .store import DiskExpertStore, HostExpertStore, PackedHostExpertStore
from .tiered import TieredExperts, TierRuntime, TierRuntimeConfig, apply_cpu_tier

__all__ = ["OffloadConfig", "apply_offload", "install", "kv_cache_bytes", "prefill_activation_bytes", "prefill_chunk_for",
           "step_activation_bytes", "auto_prefill_chunk",
           "OffloadedExperts", "plan_slots", "route_by_trace", "ExpertCache",
           "DeviceExpertCache", "DeviceOffloadedExperts",
           "parse_bytes", "CostModel", "Policy", "LRUPolicy", "LFUPolicy", "PredictorPolicy", "BeladyPolicy",
           "make_policy", "CopyBudget", "Lookahead", "TransitionPredictor", "simulate", "oracle_bound", "shared_pool_belady", "HostExpertStore", "PackedHostExpertStore",
           "DiskExpertStore", "TieredExperts", "TierRuntime", "TierRuntimeConfig", "apply_cpu_tier"]
