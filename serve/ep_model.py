"""Serving with the experts on the expert-parallel runtime's Ray actors (placement/runtime.py).

A replica started with ``ep_ranks = P`` does not hold the model itself: P actors do (one GPU each,
or CPU actors joined by gloo where there is no GPU), each with the dense part and the experts the
placement plan gives it, and the continuous-batching ``moe.Engine`` drives them through
``ExpertParallelModel``, a stand-in that follows the engine's model contract:

    model.new_cache(B, max_len)   every rank opens a KV cache of B rows it keeps between steps
    model(ids_BT, cache, valid_BT, last_only)
                                  one forward on all ranks (the all-to-alls need every one), rows
                                  the engine emptied since the last step reset first; rank 0's
                                  logits come back
    model.greedy_next(ids_BT, cache, valid_BT)
                                  the same step when every running request is greedy: rank 0 takes
                                  each row's argmax and only the token ids come back
                                  (EPServeSettings.greedy_tokens=False leaves it out: logits always)
    model.stats()                 cross-rank rows and the parallel mode, for /metrics

The plan is a ``PlacementPlan`` JSON (``moe place TRACE --gpus P --out plan.json``) or, without
one, round robin. ``ep_mode='adaptive'`` runs placement.adaptive's layer on the ranks instead (its own
layout, every strategy from it, the chooser picking per step; the strategy in use reaches /metrics). Logits equal the single-process model's whatever the plan and mode (the
placement tests hold the runtime to that; tests/serve holds this path to it end to end).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MODES = ("coherent", "standard", "adaptive")  # adaptive: placement.adaptive's layer on the ranks (no plan)


@dataclass
class EPServeSettings:
    """How a replica spreads its experts: ranks, mode, plan file, resources per rank actor."""
    ranks: int
    mode: str = "coherent"
    plan: str | None = None
    cpus_per_rank: float = 0.5
    torch_threads: int = 1
    decode: str = "auto"  # placement.runtime.EPConfig.decode
    cuda_graph: bool = True  # placement.runtime.EPConfig.cuda_graph (home decode steps from CUDA graphs on GPUs)
    comm: str = "auto"  # placement.runtime.EPConfig.comm ('gloo' on GPUs: collectives through host memory)
    gpus_per_rank: float = 1.0  # placement.runtime.EPConfig.gpus_per_rank (< 1: ranks share GPUs, with comm 'gloo')
    greedy_tokens: bool = True  # all-greedy steps return rank 0's token ids, not logits (ExpertParallelModel.greedy_next)

    def __post_init__(self):
        self.ranks = int(self.ranks)
        if self.ranks < 1:
            raise ValueError(f"ep_ranks ({self.ranks}) must be >= 1 (0 serves without expert parallelism)")
        if self.mode not in MODES:
            raise ValueError(f"ep_mode must be one of {MODES}, got {self.mode!r}")
        if self.plan is not None and self.mode == "adaptive":
            raise ValueError("ep_mode 'adaptive' lays every layer's experts out over all ranks by itself; "
                             "drop the placement plan or choose ep_mode 'coherent' / 'standard'")
        if self.plan is not None and not os.path.isfile(self.plan):
            raise ValueError(f"placement plan {self.plan!r} does not exist; make one with "
                             "`moe place TRACE --gpus N --out plan.json`, or leave it unset for round robin")
        from placement.runtime import check_decode
        check_decode(self.decode, self.mode == "adaptive", "ep_decode")
        if float(self.cpus_per_rank) <= 0 or int(self.torch_threads) < 1:
            raise ValueError(f"cpus_per_rank ({self.cpus_per_rank}) must be > 0 and torch_threads "
                             f"({self.torch_threads}) >= 1")


class _RanksCache:
    """The engine's handle on the ranks' KV caches: it remembers which rows to empty next step."""

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self._resets: set[int] = set()

    def reset(self, rows=None) -> None:
        rows = range(self.batch_size) if rows is None else rows
        self._resets.update(int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows))

    def take_resets(self) -> list[int]:
        out, self._resets = sorted(self._resets), set()
        return out


class ExpertParallelModel:
    """The engine's model, running on an ``ExpertParallelRuntime`` (see the module docstring)."""

    def __init__(self, runtime, config, dtype: torch.dtype, greedy_tokens: bool = True):
        self.runtime = runtime
        self.config = config
        self.dtype = dtype
        self.device = torch.device("cpu")  # where the engine builds its inputs; the ranks move them
        if not greedy_tokens:  # the engine then fetches logits at every step (what the A/B runs set)
            self.greedy_next = None

    def new_cache(self, batch_size: int, max_len: int) -> _RanksCache:
        self.runtime.open_cache(batch_size, max_len)
        return _RanksCache(batch_size, max_len)

    @torch.no_grad()
    def forward(self, input_ids_BT: torch.Tensor, cache: _RanksCache | None = None,
                valid_BT: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        if cache is None:
            return self.runtime.forward(input_ids_BT, valid_BT, last_only)
        return self.runtime.step(input_ids_BT, valid_BT, cache.take_resets(), last_only)

    __call__ = forward

    @torch.no_grad()
    def greedy_next(self, input_ids_BT: torch.Tensor, cache: _RanksCache, valid_BT: torch.Tensor) -> torch.Tensor:
        """Each row's next greedy token [B] after this step (the engine's optional fast path when every
        running request is greedy): rank 0 takes the argmax and returns token ids, not [B, V] logits
        through Ray (at Qwen3's vocabulary, 8 rows: 2.4 MB of bf16 a step)."""
        return self.runtime.step(input_ids_BT, valid_BT, cache.take_resets(), True, argmax=True)[:, 0]

    def moe_blocks(self) -> list:
        return []  # the routers run on the ranks; per-layer expert load is not counted here

    def stats(self) -> dict:
        counters = [c for c in self.runtime.counters() if c]
        rows = sum(c.get("dispatch_rows", 0) for c in counters)
        # rank 0's seconds inside its step() calls (its GPU work included): the rest of an engine
        # step is the engine's own work and the Ray calls
        out = {"cross_rank_tokens": rows, "rank_step_seconds": counters[0].get("serve_step_seconds", 0.0)
               if counters else 0.0}
        if self.runtime.cfg.parallel == "adaptive":  # the strategy the adaptive layer ran last
            used = counters[0].get("strategy") if counters else None
            return out | {"strategy": f"expert-parallel-adaptive:{used or 'none yet'}"}
        return out | {"strategy": f"expert-parallel-{self.runtime.cfg.mode}"}

    def shutdown(self) -> None:
        self.runtime.shutdown()


def start_expert_parallel(model, settings: EPServeSettings, device: str, backend: str | None = None):
    """Start the ranks for ``model`` (a loaded MoEForCausalLM, handed over and then dropped by the
    caller) under ``settings``; returns the ``ExpertParallelModel`` the engine drives."""
    import ray

    from placement.plan import PlacementPlan
    from placement.runtime import EPConfig, ExpertParallelRuntime

    cfg = model.config
    n_moe = len(model.moe_blocks())
    if n_moe == 0:
        raise ValueError("expert parallelism needs a model with MoE layers; this one has none")
    if settings.plan is not None:
        plan = PlacementPlan.load(settings.plan)
        plan.check_compatible(n_moe, cfg.num_experts)
        if plan.num_ranks != settings.ranks:
            raise ValueError(f"the plan {settings.plan!r} is for {plan.num_ranks} ranks but ep_ranks is "
                             f"{settings.ranks}; give a plan for {settings.ranks} ranks or set ep_ranks to "
                             f"{plan.num_ranks}")
    else:
        from placement.baselines import round_robin
        plan = round_robin(n_moe, cfg.num_experts, settings.ranks, 1)
    if not ray.is_initialized():
        raise ValueError("expert-parallel serving runs inside Ray (a Serve replica); call ray.init() first")
    cuda = device.startswith("cuda")
    adaptive = settings.mode == "adaptive"
    ep = EPConfig(mode="coherent" if adaptive else settings.mode, device="cuda" if cuda else "cpu",
                  cpus_per_actor=float(settings.cpus_per_rank), backend=backend or ("triton" if cuda else "torch"),
                  torch_threads=int(settings.torch_threads), parallel="adaptive" if adaptive else "placement",
                  decode=settings.decode, cuda_graph=bool(settings.cuda_graph), comm=settings.comm,
                  gpus_per_rank=float(settings.gpus_per_rank))
    runtime = ExpertParallelRuntime(model, plan, ep)
    return ExpertParallelModel(runtime, cfg, next(model.parameters()).dtype, greedy_tokens=bool(settings.greedy_tokens))
