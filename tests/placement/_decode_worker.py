"""Run in each spawned gloo rank by test_decode.py: home-only decoding equals one process, and
moves the rows placement/metrics.py predicts for the decode steps' routing."""
import numpy as np
import torch
import torch.distributed as dist

from moe import MoEConfig, MoEForCausalLM
from placement.baselines import round_robin
from placement.decode import decode_step
from placement.metrics import evaluate
from placement.runtime import apply_placement
from routing.trace import RoutingTrace

from ._clean_exit import exits_cleanly as _exits_cleanly


def _model(family, kw):
    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny(family, **kw), dtype=torch.float32)
    m.init_weights(std=0.2, seed=1)
    return m.eval()


@torch.no_grad()
def _decode(model, ids, n, step, after_prefill=lambda: None):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    logits = model(ids, cache=cache)
    after_prefill()
    toks, steps = [], [logits[:, -1:]]
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
        if i < n - 1:
            logits = step(cache, nxt)
            steps.append(logits[:, -1:])
    return torch.cat(toks, 1), torch.cat(steps, 1)


def _predicted_rows(plan, routes, num_layers, num_experts, mode):
    """Rows metrics.py predicts for the decode steps: routes are the reference's router outputs
    (ids, weights) [B, K] in call order, num_layers per step; row b's origin is b mod P."""
    total = 0.0
    for s in range(0, len(routes), num_layers):
        ids = np.stack([r[0].numpy() for r in routes[s:s + num_layers]])
        w = np.stack([r[1].float().numpy() for r in routes[s:s + num_layers]])
        f = evaluate(plan, RoutingTrace(ids, num_experts, weights=w))
        total += (f.cc_messages_per_token if mode == "coherent" else f.ep_messages_per_token) * ids.shape[1]
    return total


@_exits_cleanly
def check_decode(rank, world, init_file, family, kw, mode, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(family, kw)
        blocks = model.moe_blocks()
        ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
        routes, hooks = [], []

        def record():  # the decode steps' routing, not the prefill's
            hooks.extend(b.router.register_forward_hook(lambda m, i, o: routes.append((o[0], o[1])))
                         for b in blocks)
        ref = _decode(model, ids, 4, lambda c, x: model(x, cache=c), record)
        for h in hooks:
            h.remove()
        plan = round_robin(len(blocks), model.config.num_experts, world)
        state = apply_placement(model, plan, rank, mode)

        def reset():  # count the decode steps only (the prefill is the replicated forward)
            for k in state.counters:
                state.counters[k] = 0
        got = _decode(model, ids, 4, lambda c, x: decode_step(model, c, x, state), reset)
        assert torch.equal(got[0], ref[0]), f"rank {rank}: tokens differ"
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
        moved = torch.tensor([state.counters["dispatch_rows"], state.counters["combine_rows"]])
        dist.all_reduce(moved)  # rows every rank sent away
        if rank == 0:
            torch.save(dict(state.counters, dispatch_total=int(moved[0]), combine_total=int(moved[1]),
                            predicted=_predicted_rows(plan, routes, len(blocks), model.config.num_experts, mode)),
                       out_file)
    finally:
        dist.destroy_process_group()


@_exits_cleanly
def check_sync_free_step(rank, world, init_file, family, kw, mode, out_file):
    """decode_step with the slots given and the moved rows summed on the device (what
    HomeDecodeGraphs captures) equals the default step: logits, tokens and every counter."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(family, kw)
        ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
        plan = round_robin(len(model.moe_blocks()), model.config.num_experts, world)
        state = apply_placement(model, plan, rank, mode)
        n = 4
        results = []
        def reset():  # count the decode steps only (the prefill is the replicated forward)
            for k in state.counters:
                state.counters[k] = 0
        for sync_free in (False, True):
            moved_2 = torch.zeros(2, dtype=torch.long)
            if sync_free:  # the most slots the cache has: masked slots change nothing
                step = lambda c, x: decode_step(model, c, x, state, c.max_len, moved_2)  # noqa: E731
            else:
                step = lambda c, x: decode_step(model, c, x, state)  # noqa: E731
            toks, logits = _decode(model, ids, n, step, reset)
            counters = dict(state.counters)
            if sync_free:
                assert counters["dispatch_rows"] == counters["combine_rows"] == 0, "rows counted on the host"
                counters["dispatch_rows"], counters["combine_rows"] = moved_2.tolist()
            results.append((toks, logits, counters))
        (t0, l0, c0), (t1, l1, c1) = results
        assert torch.equal(t0, t1), f"rank {rank}: tokens differ"
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
        assert c0 == c1, f"rank {rank}: counters {c1} != {c0}"
        if rank == 0:
            torch.save(c0, out_file)
    finally:
        dist.destroy_process_group()


@_exits_cleanly
def check_idle_rows(rank, world, init_file, family, kw, mode, out_file):
    """A serving batch's idle rows (valid False at a step) neither advance in the cache nor send
    anything to another rank, and the rows taking part get the single-process model's logits
    (its forward with the same valid masks), step after step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(family, kw)
        B, T0, n = 4, 5, 5
        ids = torch.randint(3, 128, (B, T0), generator=torch.Generator().manual_seed(0))
        # row 1 idles from the second step on, row 2 at steps 0 and 3, row 3 always takes part but
        # in the last step, where every row idles
        valid_steps = torch.ones(n, B, 1, dtype=torch.bool)
        valid_steps[1:, 1] = False
        valid_steps[[0, 3], 2] = False
        valid_steps[n - 1] = False
        feeds = torch.randint(3, 128, (n, B, 1), generator=torch.Generator().manual_seed(1))

        @torch.no_grad()
        def run(step):
            cache = model.new_cache(B, T0 + n)
            model(ids, cache=cache)
            outs = []
            for s in range(n):
                outs.append(step(cache, feeds[s], valid_steps[s]))
            return torch.cat(outs, 1), cache.lengths.clone()

        ref, ref_len = run(lambda c, x, v: model(x, cache=c, valid_BT=v))
        plan = round_robin(len(model.moe_blocks()), model.config.num_experts, world)
        state = apply_placement(model, plan, rank, mode)
        for k in state.counters:
            state.counters[k] = 0
        sent = []  # rows this rank sent away, per decode step

        def step(c, x, v):
            before = state.counters["dispatch_rows"] + state.counters["combine_rows"]
            out = decode_step(model, c, x, state, valid_B1=v)
            sent.append(state.counters["dispatch_rows"] + state.counters["combine_rows"] - before)
            return out
        got, got_len = run(step)
        assert torch.equal(got_len, ref_len), f"rank {rank}: lengths {got_len} != {ref_len}"
        assert torch.equal(ref_len, torch.tensor([T0 + n - 1, T0 + 1, T0 + n - 3, T0 + n - 1]))
        live = valid_steps[:, :, 0].T  # [B, n]
        torch.testing.assert_close(got[live], ref[live], rtol=1e-5, atol=1e-5)
        assert sent[-1] == 0, f"rank {rank}: a step of idle rows sent {sent[-1]} rows to other ranks"
        moved = torch.tensor([state.counters["dispatch_rows"]])
        dist.all_reduce(moved)
        if rank == 0:
            torch.save(dict(state.counters, dispatch_total=int(moved[0])), out_file)
    finally:
        dist.destroy_process_group()


class _FailingGraphs:
    """Stands in for HomeDecodeGraphs on the CPU: its capture fails on rank 1 only."""

    def __init__(self, rank):
        self.rank, self.captured = rank, []

    def slots_for(self, max_length):
        return max_length + 1

    def capture_for(self, ids_B1, valid_B1, max_length):
        from moe.cuda_graph import GraphCaptureError
        if self.rank == 1:
            raise GraphCaptureError("stand-in capture failure")
        self.captured.append(self.slots_for(max_length))
        return True

    def step(self, *args):
        raise AssertionError("a graph was replayed although a rank's capture failed")


def _serving_steps(rank, world, ep_config, B, T, prepare=None):
    """A fresh EPWorker on a seeded 2-layer Mixtral (round robin): one prefill step of B rows x T
    tokens and 3 decode steps through EPWorker.step; (rank 0's packed results, the worker)."""
    from placement.runtime import EPWorker
    cfg = MoEConfig.tiny("mixtral", num_hidden_layers=2)
    prompt = torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(0))
    feeds = torch.randint(3, 128, (3, B, 1), generator=torch.Generator().manual_seed(1))
    w = EPWorker(rank, world, ep_config)
    w.load_seeded(cfg.to_hf_dict(), round_robin(2, cfg.num_experts, world).to_dict(), 0, 0.2, "float32")
    w.open_cache(B, T + 4)
    if prepare is not None:
        prepare(w)
    return [w.step(prompt, None, [], True)] + [w.step(feeds[s], None, [], True) for s in range(3)], w


@_exits_cleanly
def check_serve_capture_agreement(rank, world, init_file, out_file):
    """EPWorker.step: when one rank fails to capture a decode graph, every rank decodes eagerly (no
    rank replays a graph whose collectives the others would not match), with the eager logits."""
    from placement.runtime import EPConfig, unpack_result
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        runs = []
        for failing in (False, True):
            def fail(w):
                w._serve_graph = lambda: None if w._serve_graphs_off else _FailingGraphs(rank)
            outs, w = _serving_steps(rank, world, EPConfig(device="cpu"), 2, 4, fail if failing else None)
            runs.append((outs, w._serve_graphs_off))
        (ref, off0), (got, off1) = runs
        assert off0 == "" and off1 == ("stand-in capture failure" if rank == 1 else "another rank's capture failed")
        if rank == 0:
            for a, b in zip(got, ref):  # rank 0's results, as they travel (placement.runtime.pack_result)
                torch.testing.assert_close(unpack_result(a), unpack_result(b), rtol=0, atol=0)
            torch.save({"steps": len(got)}, out_file)
    finally:
        dist.destroy_process_group()


@_exits_cleanly
def check_staged_collectives(rank, world, init_file, mode, out_file):
    """Collectives through host memory (EPConfig.comm='gloo' with GPU ranks) move the same rows:
    forced on for CPU tensors, a replicated prefill and home-only decode steps give the unstaged
    run's logits bit for bit."""
    import placement.collectives as coll
    from placement.runtime import EPConfig, unpack_result
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        real, calls = coll.staged, []
        runs = []
        for force in (False, True):
            if force:
                coll.staged = lambda t, group=None: calls.append(t.shape) or True
            runs.append(_serving_steps(rank, world, EPConfig(device="cpu", mode=mode), 3, 5)[0])
        coll.staged = real
        if rank == 0:
            for a, b in zip(*runs):
                torch.testing.assert_close(unpack_result(b), unpack_result(a), rtol=0, atol=0)
            torch.save({"staged_calls": len(calls)}, out_file)
    finally:
        dist.destroy_process_group()


@_exits_cleanly
def check_disagreement_raises(rank, world, init_file, out_file):
    """MOEFLOW_EP_CHECK=1: when one rank's replicated hidden states differ (here: one row perturbed on
    rank 1), every rank raises, naming the layer and the rows where the ranks parted."""
    import os
    os.environ["MOEFLOW_EP_CHECK"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model("mixtral", {"num_hidden_layers": 2})
        ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
        apply_placement(model, round_robin(2, model.config.num_experts, world), rank, "coherent")
        with torch.no_grad():
            model(ids)  # alike on every rank: passes
            if rank == 1:
                model.embed.weight[ids[1, 3]] += 1.0
            try:
                model(ids)
                msg = ""
            except RuntimeError as e:
                msg = str(e)
        torch.save({"msg": msg}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@_exits_cleanly
def check_routing_from_rank0(rank, world, init_file, mode, out_file, device="cpu"):
    """Replicated computations may differ between ranks (the H200's cuDNN attention is not repeatable):
    every rank splits its collectives by rank 0's routing. Here rank 1's routers are negated, so its own
    routing differs everywhere; the forward still completes and rank 0's logits are the single-process
    model's (without the broadcast gloo aborts on collectives of different sizes, NCCL waits forever).
    device 'cuda': one GPU per rank, NCCL."""
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model("mixtral", {"num_hidden_layers": 3}).to(device)
        ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            want = model(ids)
        state = apply_placement(model, round_robin(3, model.config.num_experts, world), rank, mode)
        with torch.no_grad():
            if rank == 1:
                for b in model.moe_blocks():
                    for p in b.router.parameters():
                        p.neg_()
            got = model(ids)
        if rank == 0:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.save(dict(state.counters), out_file)
    finally:
        dist.destroy_process_group()


@_exits_cleanly
def check_greedy_takes_rank0_tokens(rank, world, init_file, home_only, out_file):
    """EPWorker.greedy feeds every rank rank 0's next tokens: here rank 1's head is negated, so its
    own argmax differs everywhere; rank 0's tokens and logits still equal one process's greedy."""
    from placement.runtime import EPConfig, EPWorker
    from placement.trace_routing import seeded_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = MoEConfig.tiny("mixtral", num_hidden_layers=2, tie_word_embeddings=False)
        prompt = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
        ref = seeded_model(cfg, 0, 0.2, torch.float32)
        want = _decode(ref, prompt, 4, lambda c, x: ref(x, cache=c))
        w = EPWorker(rank, world, EPConfig(device="cpu"))
        w.load_seeded(cfg.to_hf_dict(), round_robin(2, cfg.num_experts, world).to_dict(), 0, 0.2, "float32")
        if rank == 1:
            with torch.no_grad():
                w.model.lm_head.weight.neg_()
        toks, logits = w.greedy(prompt, 4, home_only=home_only)
        if rank == 0:
            assert torch.equal(toks, want[0]), (toks, want[0])
            torch.testing.assert_close(logits, want[1], rtol=1e-5, atol=1e-5)
            torch.save({"tokens": toks}, out_file)
    finally:
        dist.destroy_process_group()
