"""Cache simulation over a RoutingTrace (no weights), with a time model and the oracle bound.

    stats = simulate(trace, "lru", capacity_per_layer=4)
    stats = simulate(trace, "predictor", 4, predictor=p, prefetch="predictor", cpu_fallback=True,
                     cost=CostModel(...), expert_bytes=352e6, layer_compute_s=0.2e-3)
    bound = oracle_bound(trace, 4, cost=..., expert_bytes=..., layer_compute_s=...)

The simulator drives the real ExpertCache (same policies, same counters) over a store of empty
experts, so its stats are the ones the live cache would report for the same routing. Alongside
runs a time model of one GPU with one copy engine and a CPU:

- a layer's routing is known at t; its demand copies queue on the copy engine after whatever is
  already queued (prefetches), one expert every copy_s; prefetches of later layers queue next
  (the predictor's only when the copy engine is idle, as in the live cache);
- the GPU part of the layer ends at max(t, copies of its experts done) + layer_compute_s;
  the CPU part (experts computed there) ends at t + sum of cpu_s; the layer ends at the later.

Without a time model, ``prefetch_budget`` says what a prefetch may cost: the copy engine moves
that many experts while one layer computes (after the layer's demand copies, which stall it),
so a layer may start at most that many prefetches (fractions accumulate: 0.5 = one copy every
other layer). A prefetched expert that is used counts as a hit; each prefetch evicts by the
policy like a demand copy. Belady is the optimum of demand caching only: prefetching within
the budget can beat it. Qwen3-30B-A3B decoding from PCIe (an expert copy ~170 us, a layer
~100-300 us) allows about 1-2 copies a layer; Mixtral (352 MB experts) far less than one.

The oracle bound: Belady eviction (fewest misses), perfect prefetch (every copy hidden behind
compute as long as the copy engine keeps up) and the best of copy / CPU for each miss:
time >= max(sum over layers of max(compute, CPU share), total copy time).

Shape legend: L = MoE layers, T = tokens, K = top-k, B = tokens per step.
"""
from __future__ import annotations

import numpy as np
import torch

from .cache import ExpertCache
from .cost_model import CostModel
from .policies import BeladyPolicy, Policy, future_from_trace, make_policy
from .prefetch import CopyBudget, Lookahead, default_threshold, guess_count, guessed_experts
from .store import ExpertStore

PREFETCH_MODES = ("none", "predictor", "oracle", "guesses")


class NullStore(ExpertStore):
    """Experts of zero elements that still count `expert_bytes` when copied."""

    def __init__(self, num_layers: int, num_experts: int, expert_bytes: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.w13_shape, self.w2_shape, self.dtype = (0, 0), (0, 0), torch.float32
        self._bytes = int(expert_bytes)
        self._empty = torch.empty(0, 0)

    @property
    def expert_bytes(self) -> int:
        return self._bytes

    def get(self, layer, expert):
        return self._empty, self._empty


def _steps(trace, tokens_per_step: int):
    for s in range(0, trace.num_tokens, tokens_per_step):
        yield trace.expert_ids[:, s:s + tokens_per_step].astype(np.int64)  # [L, B, K]


def simulate(trace, policy: str | Policy, capacity_per_layer: int, *, tokens_per_step: int = 1,
             prefetch: str = "none", predictor=None, prefetch_k: int = 0, cpu_fallback: bool = False,
             cost: CostModel | None = None, expert_bytes: int = 1, layer_compute_s: float = 0.0,
             warmup_steps: int = 0, predict_every: int = 1, prefetch_threshold: float | None = None,
             prefetch_budget: float | None = None, hidden_NLD: np.ndarray | None = None,
             guesses: np.ndarray | None = None) -> dict:
    """Run the expert cache over the trace; returns cache.stats() plus 'time_s', 'steps', 'tokens'.

    warmup_steps: steps run first to fill the cache, then the counters and the clock restart.

    policy: 'lru' | 'lfu' | 'predictor' (needs predictor) | 'belady' | a Policy instance.
    prefetch: 'none' | 'predictor' (top experts of layer l+1 by the predictor after layer l) |
    'oracle' (exactly the experts layer l+1 will use) |
    'guesses' (``guesses`` [L, tokens, G]: row l holds layer l's guesses of layer l+1's experts for each
    token, distinct, best first, -1 = none, e.g. a trained model's next router or probes on its hidden states, as
    benchmarks/lookahead_ids.py writes them; each token's first ``prefetch_k`` (0: half the top-k, rounded
    up: prefetch.guess_count) in the step, queued behind the demand copies as the live cache's next-layer
    prefetch does, up to the layer's slots).
    prefetch_budget: expert copies a prefetch may issue per layer (see the module docstring);
    None: the predictor's prefetches wait for an idle copy engine, the oracle's are unlimited.
    prefetch_threshold: None = 0 with a budget and the predictor's policy, else 0.3
    (``offload.prefetch.default_threshold``).
    hidden_NLD: [tokens, L, D] hidden state entering each layer, row t = token t of the trace (as
    recorded with it): given to a predictor that reads it (``Lookahead.wants_hidden``).
    """
    if capacity_per_layer < 1:
        raise ValueError(f"capacity_per_layer must be >= 1, got {capacity_per_layer}")
    if prefetch not in PREFETCH_MODES:
        raise ValueError(f"unknown prefetch mode {prefetch!r}; choose one of {PREFETCH_MODES}")
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    if prefetch_budget is not None and not prefetch_budget >= 0:
        raise ValueError(f"prefetch_budget must be >= 0 expert copies per layer (or None), got {prefetch_budget}")
    if cpu_fallback and cost is None:
        raise ValueError("cpu_fallback needs cost=<CostModel> to choose between copy and CPU")
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    if prefetch == "guesses" and (guesses is None or np.ndim(guesses) != 3
                                  or np.shape(guesses)[:2] != (L, trace.num_tokens)):
        raise ValueError(f"prefetch='guesses' needs guesses [layers={L}, tokens={trace.num_tokens}, guesses], got "
                         f"{None if guesses is None else np.shape(guesses)}")
    if hidden_NLD is not None and (np.ndim(hidden_NLD) != 3 or np.shape(hidden_NLD)[:2] != (trace.num_tokens, L)):
        raise ValueError(f"hidden_NLD must be [tokens={trace.num_tokens}, layers={L}, D], got {np.shape(hidden_NLD)}")
    lookahead = None
    if (policy == "predictor" or prefetch == "predictor"):
        if predictor is None:
            raise ValueError("policy/prefetch 'predictor' needs predictor=<object with predict_batch>")
        lookahead = Lookahead(predictor, L, E, every=predict_every,
                              threshold=default_threshold(prefetch_threshold, prefetch_budget,
                                                          isinstance(policy, str) and policy == "predictor"))
    if isinstance(policy, str):
        policy = make_policy(policy, lookahead=lookahead, trace=trace, tokens_per_step=tokens_per_step)
    cache = ExpertCache(NullStore(L, E, expert_bytes), capacity_per_layer, policy, "cpu")
    S = cache.slots
    guess_k = guess_count(prefetch_k, K)  # 'guesses': each token's first guess_k, as the live cache's guess_next
    prefetch_k = prefetch_k or K  # 'predictor': experts per token

    timed = cost is not None
    copy_s = cost.copy_s(expert_bytes) if timed else 0.0
    t = 0.0
    copy_free = 0.0
    ready: dict[tuple[int, int], float] = {}  # (layer, expert) -> when its copy lands
    steps = list(_steps(trace, tokens_per_step))

    def queue_copy(layer, expert, now):
        nonlocal copy_free
        copy_free = max(copy_free, now) + copy_s
        ready[(layer, expert)] = copy_free

    t_start = 0.0
    # prefetch copies the copy engine can still fit in (prefetch_budget)
    budget = None if prefetch_budget is None else CopyBudget(prefetch_budget, lookahead.every if lookahead else 1)
    for si, ids_LBK in enumerate(steps):
        if si == warmup_steps and si:
            cache.reset_stats()
            t_start = t
        for layer in range(L):
            ids_BK = ids_LBK[layer]
            cache.observe(layer, ids_BK)
            flat = ids_BK.reshape(-1)
            experts, counts = np.unique(flat[flat >= 0], return_counts=True)
            hits = [int(e) for e in experts if cache.is_resident(layer, int(e))]
            misses = [(int(e), int(n)) for e, n in zip(experts, counts) if not cache.is_resident(layer, int(e))]
            to_copy, to_cpu = [e for e, _ in misses], []
            if cpu_fallback and misses:
                backlog = max(copy_free - t, 0.0)
                to_copy, to_cpu, _ = cost.split(misses, expert_bytes, copy_backlog_s=backlog,
                                                reuse=cache.reuse_estimate())
            gpu = hits + to_copy
            before = cache.counters["copies"]
            gpu_ready = t
            for i in range(0, len(gpu), S):
                chunk = gpu[i:i + S]
                resident_before = {e for e in chunk if cache.is_resident(layer, e)}
                cache.ensure(layer, chunk)
                for e in chunk:
                    if e not in resident_before:
                        queue_copy(layer, e, t)
                    gpu_ready = max(gpu_ready, ready.get((layer, e), 0.0))
                cache.release(layer, [], last=i + S >= len(gpu))
            assert cache.counters["copies"] - before == len(gpu) - len(hits)
            if to_cpu:
                cache.count_cpu(layer, to_cpu)
            # prefetch for the next layer (or layer 0 of the next step), queued behind demand copies
            nl, ns = (layer + 1, si) if layer + 1 < L else (0, si + 1)
            want: list[tuple[int, list[int]]] = []
            hid = None
            if lookahead is not None and lookahead.wants_hidden and hidden_NLD is not None:
                s0 = si * tokens_per_step
                hid = hidden_NLD[s0:s0 + ids_BK.shape[0], layer]
            predicted = lookahead.observe(layer, ids_BK, hid) if lookahead is not None else False
            # the predictor's guesses never queue ahead of a demand copy: only an idle copy engine takes
            # them (untimed with a budget: demand copies stall the layer, prefetches overlap its compute)
            if timed:
                busy = copy_free > t
            else:
                busy = cache.copies_in_flight(layer) if prefetch_budget is None else False
            if budget is not None:
                budget.tick()
            if prefetch == "predictor" and predicted and not busy:
                want = [(j, lookahead.to_prefetch(j, prefetch_k * len(ids_BK), S, cache.is_resident))
                        for j in lookahead.targets(layer)]
            elif prefetch == "oracle" and ns < len(steps):
                nxt = steps[ns][nl].reshape(-1)
                want = [(nl, [int(e) for e in np.unique(nxt[nxt >= 0])][:S])]
            elif prefetch == "guesses" and layer + 1 < L:
                s0 = si * tokens_per_step
                g = guesses[layer, s0:s0 + ids_BK.shape[0], :guess_k]
                want = [(layer + 1, [int(e) for e in guessed_experts(g, S)])]
            for j, experts in want:
                avail = [e for e in experts if not cache.is_resident(j, e)]
                if budget is not None:
                    avail = avail[:budget.available()]
                    experts = avail
                before = set(cache.resident(j))
                issued = cache.prefetch(j, experts)
                if budget is not None:
                    budget.spend(issued)
                for e in avail:
                    if e in cache.slot_of[j] and e not in before:
                        queue_copy(j, e, t)
            if timed:
                gpu_done = gpu_ready + layer_compute_s
                cpu_done = t + sum(cost.cpu_s(n) for e, n in misses if e in to_cpu)
                t = max(gpu_done, cpu_done)
    out = cache.stats()
    n_steps = len(steps) - min(warmup_steps, len(steps))
    out.update(steps=n_steps, tokens=trace.num_tokens, capacity_per_layer=S)
    if timed:
        out["time_s"] = t - t_start
        out["time_per_step_s"] = (t - t_start) / max(n_steps, 1)
    return out


def oracle_bound(trace, capacity_per_layer: int, *, cost: CostModel, expert_bytes: int,
                 layer_compute_s: float = 0.0, tokens_per_step: int = 1, warmup_steps: int = 0) -> dict:
    """Lower bound on time: Belady's misses, all copies hidden, each miss copied or CPU-computed.

    warmup_steps: steps that fill the cache and are not counted.

    Returns misses, hit_ratio, time_s, time_per_step_s, copy_s_total, cpu_misses.
    """
    L, E = trace.num_layers, trace.num_experts
    future = future_from_trace(trace, tokens_per_step)
    cache = ExpertCache(NullStore(L, E, expert_bytes), capacity_per_layer, BeladyPolicy(future), "cpu")
    S = cache.slots
    per_miss: list[tuple[float, int]] = []  # (cpu seconds, index of its (step, layer))
    n_cells = 0
    hits = 0
    for si, ids_LBK in enumerate(_steps(trace, tokens_per_step)):
        counted = si >= warmup_steps
        for layer in range(L):
            ids_BK = ids_LBK[layer]
            cache.observe(layer, ids_BK)
            flat = ids_BK.reshape(-1)
            experts, counts = np.unique(flat[flat >= 0], return_counts=True)
            n_of = {int(e): int(n) for e, n in zip(experts, counts)}
            gpu = sorted(n_of, key=lambda e: not cache.is_resident(layer, e))  # hits first
            for i in range(0, len(gpu), S):
                chunk = gpu[i:i + S]
                for e in chunk:
                    if counted and not cache.is_resident(layer, e):
                        per_miss.append((cost.cpu_s(n_of[e]), n_cells))
                    elif counted:
                        hits += 1
                cache.ensure(layer, chunk)
                cache.release(layer, [], last=i + S >= len(gpu))
            n_cells += counted
    c = cost.copy_s(expert_bytes)
    compute_total = n_cells * layer_compute_s
    # greedy: move the misses cheapest on the CPU there while that shortens the bound
    cell_cpu = np.zeros(max(n_cells, 1))
    copy_total = c * len(per_miss)
    side = compute_total  # sum over cells of max(compute, cpu)
    best = max(side, copy_total)
    cpu_misses = 0
    for cpu_s, cell in sorted(per_miss):
        old = max(layer_compute_s, cell_cpu[cell])
        new = max(layer_compute_s, cell_cpu[cell] + cpu_s)
        cand = max(side + new - old, copy_total - c)
        if cand >= best:
            continue
        cell_cpu[cell] += cpu_s
        side, copy_total, best = side + new - old, copy_total - c, cand
        cpu_misses += 1
    steps = max(-(-trace.num_tokens // tokens_per_step) - warmup_steps, 0)
    misses = len(per_miss)
    accesses = hits + misses
    return dict(misses=misses, hit_ratio=hits / accesses if accesses else 0.0, time_s=best,
                time_per_step_s=best / max(steps, 1), copy_s_total=copy_total, cpu_misses=cpu_misses,
                capacity_per_layer=S)


def shared_pool_belady(trace, total_slots: int, *, tokens_per_step: int = 1, warmup_steps: int = 0) -> dict:
    """Belady's fewest misses when all layers share one pool of ``total_slots`` (the same bytes as
    ``total_slots // L`` slots per layer): how far a cache whose slots move between layers could go with
    perfect knowledge of the future. ExpertCache keeps a fixed pool per layer; with 2 slots of 8 at top-2
    (Mixtral at 25%) every per-layer policy, Belady's included, hits the same experts, where one shared pool
    lets the layers whose experts recur keep more of them (BENCHMARKS 3o, 25%: Mixtral's synthetic routing
    70.2 -> 78.1%, a trained OLMoE's 69.7 -> 75.0%, Qwen3's unchanged). LRU over a shared pool is no better
    than per layer and LFU far worse: only a good prediction of the next uses would reach this.

    Accesses come layer by layer, step by step; a (step, layer)'s experts are resident together (the
    farthest next use among the others is evicted: optimal, as the current experts' next use is now).
    Returns hit_ratio, misses, hits (after ``warmup_steps``) and slots_per_layer: the mean number of
    slots each layer held over the counted accesses."""
    L = trace.num_layers
    groups = []  # (layer, experts) in time order, with whether counted
    for si, ids_LBK in enumerate(_steps(trace, tokens_per_step)):
        for layer in range(L):
            flat = ids_LBK[layer].reshape(-1)
            groups.append((layer, [int(e) for e in np.unique(flat[flat >= 0])], si >= warmup_steps))
    need = max((len(es) for _, es, _ in groups), default=0)
    if total_slots < need:
        raise ValueError(f"shared_pool_belady: {total_slots} slots cannot hold one layer's {need} experts of a step; "
                         "give at least that many")
    never = len(groups)
    next_use: list[list[int]] = [[] for _ in groups]  # per group, per expert: the group index of its next use
    upcoming: dict[tuple[int, int], int] = {}
    for gi in range(len(groups) - 1, -1, -1):
        layer, es, _ = groups[gi]
        next_use[gi] = [upcoming.get((layer, e), never) for e in es]
        for e in es:
            upcoming[(layer, e)] = gi
    pool: dict[tuple[int, int], int] = {}  # (layer, expert) -> its next use
    hits = misses = 0
    held = np.zeros(L)
    counted_groups = 0
    for gi, (layer, es, counted) in enumerate(groups):
        current = {(layer, e) for e in es}
        for e, nu in zip(es, next_use[gi]):
            key = (layer, e)
            if key in pool:
                hits += counted
            else:
                misses += counted
                if len(pool) >= total_slots:
                    victim = max((k for k in pool if k not in current), key=pool.__getitem__)
                    del pool[victim]
            pool[key] = nu
        if counted:
            counted_groups += 1
            for (lyr, _) in pool:
                held[lyr] += 1
    acc = hits + misses
    return dict(hit_ratio=hits / acc if acc else 0.0, hits=hits, misses=misses,
                slots_per_layer=(held / max(counted_groups, 1)).tolist())
