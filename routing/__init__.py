"""Routing: gating functions, routing traces, the routing-path predictor, token scheduling.

Must not import from offload/ or serve/.
"""
from .trace import RoutingTrace

__all__ = ["RoutingTrace"]
