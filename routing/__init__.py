"""Routing: gating functions, routing traces, the routing-path predictor, token scheduling.

Must not import from offload/ or serve/.
"""
from .baselines import (AttentionLookahead, GateLookahead, NearestTraceBaseline, PathModel, PopularityBaseline,
                        PreviousPathBaseline)
from .predictor import PathPredictor, PredictorConfig
from .probe import ProbeLookahead
from .record import TraceRecorder, hidden_matrix, load_features, record_sequences, save_features
from .scheduler import SchedulerConfig, TokenScheduler, simulate_schedule
from .stats import (affinity_concentration, cost_per_token_us, evaluate, format_summary, popularity_entropy,
                    reuse_distance_histogram, summarize)
from .synthetic import synthesize
from .trace import RoutingTrace

__all__ = ["RoutingTrace", "synthesize", "TraceRecorder", "record_sequences", "save_features", "load_features",
           "hidden_matrix", "PathModel", "PathPredictor", "PredictorConfig", "evaluate", "cost_per_token_us",
           "PopularityBaseline", "PreviousPathBaseline", "GateLookahead", "AttentionLookahead", "ProbeLookahead",
           "NearestTraceBaseline",
           "TokenScheduler", "SchedulerConfig", "simulate_schedule", "summarize", "format_summary",
           "popularity_entropy", "affinity_concentration", "reuse_distance_histogram"]
