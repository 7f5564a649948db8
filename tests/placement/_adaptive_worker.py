"""Workers run in each spawned gloo rank by test_adaptive*.py (importable by spawned processes)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import moe_experts_reference
from moe.losses import apply_capacity
from placement.adaptive import (AdaptiveMoEExperts, ReplicatedTokensExperts, ShardLayout, Strategy,
                                StrategyChooser, calibrate)
from placement.adaptive_blend import BLENDS, group_sizes

from ._clean_exit import exits_cleanly


def all_strategies(world):
    """Every strategy and every blend's group size, the end points (g = 1, g = W) included."""
    out = [Strategy("ep", 1), Strategy("ep", 3), Strategy("dp"), Strategy("tp")]
    return out + [Strategy(b, group=g) for b in BLENDS for g in group_sizes(world)]


def spawn(fn, world, *args):
    """Run ``fn(rank, world, init_file, *args)`` in ``world`` processes joined by a file store."""
    with tempfile.NamedTemporaryFile(delete=False) as f:
        init = f.name
    os.unlink(init)
    mp.spawn(fn, args=(world, init, *args), nprocs=world, join=True)


def _problem(world, E, D, I, K, tokens_per_rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, D, generator=g, dtype=torch.float64) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g, dtype=torch.float64) / I ** 0.5
    xs, ids, ws, gs = [], [], [], []
    for r in range(world):
        T = tokens_per_rank[r]
        xs.append(torch.randn(T, D, generator=g, dtype=torch.float64))
        # skewed routing so capacity drops happen; some -1 (expert not computed)
        logits = torch.randn(T, E, generator=g, dtype=torch.float64) + torch.linspace(2, 0, E, dtype=torch.float64)
        top = logits.topk(K, dim=1)
        i = top.indices.clone()
        if T > 2:
            i[1, -1] = -1
        ids.append(i)
        ws.append(torch.softmax(top.values, dim=1))
        gs.append(torch.randn(T, D, generator=g, dtype=torch.float64))
    return w13, w2, xs, ids, ws, gs


def _reference(world, E, K, w13, w2, xs, ids, ws, gs, factor):
    w13 = w13.clone().requires_grad_()
    w2 = w2.clone().requires_grad_()
    outs, xg, wg, drops = [], [], [], []
    loss = 0
    for r in range(world):
        # the single-process layer's capacity rule on each rank's batch (as the layer applies it)
        m, dropped, _ = apply_capacity(ids[r], E, factor)
        drops.append(dropped)
        x = xs[r].clone().requires_grad_()
        w = ws[r].clone().requires_grad_()
        y = moe_experts_reference(x, w13, w2, m, w)
        loss = loss + (y * gs[r]).sum()
        outs.append(y.detach())
        xg.append(x)
        wg.append(w)
    loss.backward()
    return outs, [x.grad for x in xg], [w.grad for w in wg], w13.grad, w2.grad, drops


@exits_cleanly
def check_strategies(rank, world, init_file, cases, D, I, K):
    """``cases``: (experts, capacity factor) pairs, run in one process group (spawning is slow)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for E, factor in cases:
            _check_case(rank, world, E, D, I, min(K, E), factor)
    finally:
        dist.destroy_process_group()


def _check_case(rank, world, E, D, I, K, factor):
    """One layer shape: every strategy against the single-process layer, outputs and gradients."""
    tokens = [5 + 3 * r for r in range(world)]
    tokens[-1] = 1 if world > 2 else tokens[-1]  # uneven, and one rank with a single token
    w13, w2, xs, ids, ws, gs = _problem(world, E, D, I, K, tokens)
    ref_y, ref_xg, ref_wg, ref_g13, ref_g2, drops = _reference(world, E, K, w13, w2, xs, ids, ws, gs, factor)
    if factor < 0:
        assert sum(drops) > 0, "the skewed routing must overflow the adaptive capacity somewhere"
    layout = ShardLayout(E, I, world)
    want13, want2 = layout.shard(ref_g13, ref_g2, rank)
    for strat in all_strategies(world):
        layer = AdaptiveMoEExperts(w13, w2, capacity_factor=factor, strategy=strat)
        x = xs[rank].clone().requires_grad_()
        w = ws[rank].clone().requires_grad_()
        y = layer(x, ids[rank], w)
        assert layer.last.dropped == drops[rank] and layer.stats()["strategy"] == str(strat)
        assert layer.stats()["dropped_tokens"] == drops[rank]  # a fresh layer: the counter is this call's
        torch.testing.assert_close(y, ref_y[rank], msg=lambda m: f"{strat} output, rank {rank}: {m}")
        (y * gs[rank]).sum().backward()
        torch.testing.assert_close(x.grad, ref_xg[rank], msg=lambda m: f"{strat} x grad: {m}")
        torch.testing.assert_close(w.grad, ref_wg[rank], msg=lambda m: f"{strat} routing-weight grad: {m}")
        torch.testing.assert_close(layer.w13.grad, want13, msg=lambda m: f"{strat} w13 grad: {m}")
        torch.testing.assert_close(layer.w2.grad, want2, msg=lambda m: f"{strat} w2 grad: {m}")


@exits_cleanly
def check_switch_mid_training(rank, world, init_file, E, D, I, K):
    """SGD with the strategy switching every step (chooser-driven and forced) equals one process."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lr = 0.1
        w13, w2, *_ = _problem(world, E, D, I, K, [4] * world)
        ref13, ref2 = w13.clone(), w2.clone()
        layer = AdaptiveMoEExperts(w13, w2, chooser=StrategyChooser())
        layout = layer.layout
        order = [Strategy("ep", 2), Strategy("dp"), Strategy("ep+tp", group=1), Strategy("tp"), None,
                 Strategy("ep+dp", group=world), None, None, Strategy("ep", 1)]
        chooser_steps = []
        for step, strat in enumerate(order):
            _, _, xs, ids, ws, gs = _problem(world, E, D, I, K, [4 + step] * world, seed=100 + step)
            # reference step on the full weights
            _, _, _, g13, g2, _ = _reference(world, E, K, ref13, ref2, xs, ids, ws, gs, 0.0)
            ref13, ref2 = ref13 - lr * g13, ref2 - lr * g2
            layer.zero_grad()
            learned = sum(len(v) for v in layer.chooser._ratios.values())
            y = layer(xs[rank], ids[rank], ws[rank], strategy=strat)
            if strat is None:
                # a training step is learned from forward + backward, lazily: the chooser's first
                # call has nothing to learn; each later one learns the previous one's complete time
                # (the forced steps in between are not the chooser's and are not learned)
                now = sum(len(v) for v in layer.chooser._ratios.values())
                assert now == learned + (1 if chooser_steps else 0), (chooser_steps, learned, now)
                assert (layer.last.seconds is None) == (not chooser_steps)
                assert layer.last.seconds is None or layer.last.seconds > 0
                chooser_steps.append(step)
            (y * gs[rank]).sum().backward()
            with torch.no_grad():
                layer.w13 -= lr * layer.w13.grad
                layer.w2 -= lr * layer.w2.grad
        want13, want2 = layout.shard(ref13, ref2, rank)
        torch.testing.assert_close(layer.w13.detach(), want13)
        torch.testing.assert_close(layer.w2.detach(), want2)
    finally:
        dist.destroy_process_group()


@exits_cleanly
def check_inference_overlap(rank, world, init_file, E, D, I, K):
    """The overlapped (no-grad) pipelined path equals the plain one; the replicated-context wrapper
    equals the single-process layer on all tokens."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        w13, w2, xs, ids, ws, _ = _problem(world, E, D, I, K, [7] * world)
        layer = AdaptiveMoEExperts(w13, w2)
        # the calibrated model is the same on every rank and physical: bandwidths from the slope
        # between two message sizes (no machine moves 100 TB/s; a failed fit gave 8e15 B/s)
        cm = calibrate()
        assert 0 < cm.latency_s < 1 and cm.flops_per_s > 0, cm
        assert 0 < cm.a2a_bytes_per_s < 1e14 and 0 < cm.allgather_bytes_per_s < 1e14, cm
        everyone = [None] * world
        dist.all_gather_object(everyone, cm.__dict__)
        assert all(e == everyone[0] for e in everyone), everyone
        # the same layer built from this rank's units alone (as the benchmark builds it)
        from_shard = AdaptiveMoEExperts(*ShardLayout(E, I, world).shard(w13, w2, rank), num_experts=E)
        with torch.no_grad():
            want = layer(xs[rank], ids[rank], ws[rank], strategy=Strategy("ep", 1))
            torch.testing.assert_close(from_shard(xs[rank], ids[rank], ws[rank], strategy=Strategy("tp")), want)
            for d in (2, 4):
                got = layer(xs[rank], ids[rank], ws[rank], strategy=Strategy("ep", d))
                torch.testing.assert_close(got, want)
            # every rank holding every token (the Ray runtime's replicated context)
            x_all, ids_all, w_all = torch.cat(xs), torch.cat(ids), torch.cat(ws)
            full = moe_experts_reference(x_all, w13, w2, ids_all, w_all)
            for strat in (Strategy("ep", 2), Strategy("tp"), Strategy("ep+dp", group=world), None):
                rep = ReplicatedTokensExperts(AdaptiveMoEExperts(w13, w2, strategy=strat, chooser=StrategyChooser()))
                torch.testing.assert_close(rep(x_all, ids_all, w_all), full, msg=lambda m: f"{strat}: {m}")
                assert "strategy" in rep.stats()
    finally:
        dist.destroy_process_group()


@exits_cleanly
def check_chooser_agrees_across_ranks(rank, world, init_file, E, D, I, K):
    """Ranks with different token counts and different local timings still pick the same
    strategy every step (else their collectives would not match and the step would hang)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        w13, w2, *_ = _problem(world, E, D, I, K, [4] * world)
        layer = AdaptiveMoEExperts(w13, w2, chooser=StrategyChooser())
        picks = []
        for step in range(8):
            _, _, xs, ids, ws, _ = _problem(world, E, D, I, K, [3 + 5 * r + step for r in range(world)],
                                            seed=200 + step)
            with torch.no_grad():
                layer(xs[rank], ids[rank], ws[rank])
            picks.append(str(layer.last.strategy))
        everyone = [None] * world
        dist.all_gather_object(everyone, (picks, sorted((str(k), [round(r, 12) for r in v]) for k, v in layer.chooser._ratios.items())))
        assert all(e == everyone[0] for e in everyone), everyone
        assert layer.stats()["strategy"] == picks[-1]
        _check_settled_calls_cost_no_collective(rank, world, E, D, I, K)
    finally:
        dist.destroy_process_group()


@exits_cleanly
def check_moe_layer_in_training(rank, world, init_file):
    """The training module's MoELayer, sharded with apply_adaptive_parallel: every rank's output
    equals the single-process layer's on its tokens; expert shards get the gradient of the whole
    batch, and the replicated router's gradients sum to the single-process ones. With a capacity
    factor, the sharded layer (capacity in the adaptive layer) drops what the single-process layer
    (capacity in its router, moe.losses' rule) drops on each rank's tokens."""
    from moe.layer import MoELayer
    from moe.losses import BalanceConfig
    from placement.adaptive import apply_adaptive_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for factor in (0.0, 1.0, -1.2):
            torch.manual_seed(0)
            sizes = dict(hidden_size=12, num_experts=4, top_k=2, intermediate_size=8)
            ref = MoELayer.simple(**sizes, balance=BalanceConfig(capacity_factor=factor)).double()
            par = MoELayer.simple(**sizes).double()
            par.load_state_dict(ref.state_dict())
            apply_adaptive_parallel(par, capacity_factor=factor)
            g = torch.Generator().manual_seed(7)
            xs = [torch.randn(5 + 2 * r, 12, generator=g, dtype=torch.float64) for r in range(world)]
            drops = 0
            for strat in (None, Strategy("dp"), Strategy("tp"), Strategy("ep", 2), Strategy("ep+tp", group=1)):
                par.zero_grad()
                ref.zero_grad()
                par.block.experts.fixed = strat  # None: the chooser picks
                y, _ = par(xs[rank])
                y.sum().backward()
                outs = [ref(x) for x in xs]
                sum(y_r.sum() for y_r, _ in outs).backward()
                torch.testing.assert_close(y, outs[rank][0].detach(), msg=lambda m: f"f={factor} {strat}: {m}")
                assert par.block.experts.last.dropped == outs[rank][1].dropped
                drops += outs[rank][1].dropped
                lay = par.block.experts.layout
                want13, want2 = lay.shard(ref.block.experts.w13.grad, ref.block.experts.w2.grad, rank)
                torch.testing.assert_close(par.block.experts.w13.grad, want13)
                torch.testing.assert_close(par.block.experts.w2.grad, want2)
                gr = par.block.router.weight.grad.clone()
                dist.all_reduce(gr)
                torch.testing.assert_close(gr, ref.block.router.weight.grad)
            total = torch.tensor([drops])
            dist.all_reduce(total)
            assert (int(total) > 0) == (factor != 0), f"factor {factor}: {int(total)} dropped"
    finally:
        dist.destroy_process_group()


@exits_cleanly
def check_causal_lm_training_with_switches(rank, world, init_file):
    """A MoEForCausalLM trained data-parallel over the ranks, its experts sharded by
    apply_adaptive_parallel and the strategy switching every step (the chooser's picks included),
    follows one process training on all ranks' batches: same replicated parameters, and each
    rank's expert shard equal to that shard of the single process's experts. The strategy in use
    reaches the serving metrics' ``strategy`` key through the layer's ``stats()``."""
    from moe import MoEConfig, MoEForCausalLM
    from moe.train import lm_loss
    from placement.adaptive import apply_adaptive_parallel
    from serve.metrics import collect_component_stats

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = MoEConfig.tiny("mixtral", num_experts=4, num_hidden_layers=2)
        ref = MoEForCausalLM(cfg, dtype=torch.float64)
        ref.init_weights(std=0.2, seed=1)
        par = MoEForCausalLM(cfg, dtype=torch.float64)
        par.load_state_dict(ref.state_dict())
        apply_adaptive_parallel(par)
        blocks = par.moe_blocks()
        sharded = {id(p) for b in blocks for p in (b.experts.w13, b.experts.w2)}
        order = [None, Strategy("dp"), Strategy("ep+tp", group=1), Strategy("tp"), Strategy("ep", 2),
                 Strategy("ep+dp", group=world), None, Strategy("ep+tp", group=world)]
        g = torch.Generator().manual_seed(3)
        lr = 0.05
        for strat in order:
            batches = [torch.randint(0, cfg.vocab_size, (2, 7), generator=g) for _ in range(world)]
            ref.zero_grad()
            sum(lm_loss(ref(b[:, :-1]), b[:, 1:]) for b in batches).backward()
            par.zero_grad()
            for b in blocks:
                b.experts.fixed = strat  # None: the shared chooser picks (the same on every rank)
            lm_loss(par(batches[rank][:, :-1]), batches[rank][:, 1:]).backward()
            for p in par.parameters():  # data parallel outside the experts
                if id(p) not in sharded and p.grad is not None:
                    dist.all_reduce(p.grad)
            if strat is not None:
                assert all(b.experts.last.strategy == strat for b in blocks)
            with torch.no_grad():
                for m in (ref, par):
                    for p in m.parameters():
                        if p.grad is not None:
                            p -= lr * p.grad
        ref_params = dict(ref.named_parameters())
        for name, p in par.named_parameters():
            if id(p) in sharded:
                continue
            torch.testing.assert_close(p, ref_params[name], msg=lambda m: f"{name}: {m}")
        for rb, pb in zip(ref.moe_blocks(), blocks):
            want13, want2 = pb.experts.layout.shard(rb.experts.w13, rb.experts.w2, rank)
            torch.testing.assert_close(pb.experts.w13, want13)
            torch.testing.assert_close(pb.experts.w2, want2)
        assert collect_component_stats(par)["strategy"] == str(blocks[0].experts.last.strategy)
        # every step but the chooser's first pick switched (the forced ones all differ)
        assert blocks[0].experts.stats()["strategy_switches"] >= len(order) - 3
    finally:
        dist.destroy_process_group()


def _check_settled_calls_cost_no_collective(rank, world, E, D, I, K):
    """Once the chooser has settled, only every ``check_every``-th call runs the chooser's one
    all-reduce (the strategies themselves run none); outputs are the settled strategy's. The
    model alone decides (explore_margin 1), so settling does not hang on gloo's noisy timings."""
    w13, w2, xs, ids, ws, _ = _problem(world, E, D, I, K, [6] * world)
    layer = AdaptiveMoEExperts(w13, w2, chooser=StrategyChooser(check_every=4, explore_margin=1.0))
    real, count = dist.all_reduce, [0]

    def counted(*a, **k):
        count[0] += 1
        return real(*a, **k)

    dist.all_reduce = counted
    try:
        with torch.no_grad():
            for _ in range(40):  # explore: every call is a check call
                if layer.settled:
                    break
                before = count[0]
                layer(xs[rank], ids[rank], ws[rank])
                assert count[0] == before + 1
            assert layer.settled, "the chooser never settled in 40 calls"
            count[0] = 0
            for _ in range(8):
                y = layer(xs[rank], ids[rank], ws[rank])
                want = layer(xs[rank], ids[rank], ws[rank], strategy=layer.last.strategy)
                torch.testing.assert_close(y, want)
    finally:
        dist.all_reduce = real
    assert count[0] == 2, f"{count[0]} all-reduces in 8 settled calls with check_every=4"
    # a caller that knows every rank's token count: a call leaving the bucket is a check call
    # (the one all-reduce), one staying in it is not; a count below this rank's is refused
    layer.chooser.check_every = 1000
    T = xs[rank].shape[0]
    dist.all_reduce = counted
    try:
        with torch.no_grad():
            for max_tokens, checks in ((T, 0), (4 * T, 1), (4 * T + 1, 0), (T, 1)):
                count[0] = 0
                layer(xs[rank], ids[rank], ws[rank], max_tokens=max_tokens)
                assert count[0] == checks, (max_tokens, count[0])
                assert layer._agreed_shape.bucket() == layer.shape_key(max_tokens, K).bucket()
    finally:
        dist.all_reduce = real
    with pytest.raises(ValueError, match="max_tokens"):
        layer(xs[rank], ids[rank], ws[rank], max_tokens=T - 1)
    picks = [None] * world
    dist.all_gather_object(picks, str(layer.last.strategy))
    assert len(set(picks)) == 1, picks
