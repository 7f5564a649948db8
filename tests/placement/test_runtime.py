"""Expert-parallel runtime on Ray actors with gloo ranks: logits equal the single-process model
for several plans, both modes, 2 and 4 ranks; the traffic the ranks move equals the figures
placement/metrics.py predicts for the same routing."""
import numpy as np
import pytest
import torch

from moe import MoEConfig, MoEForCausalLM
from placement.affinity import AffinityStats
from placement.baselines import eplb, round_robin
from placement.replicate import add_affinity_replicas
from placement.ilp import SolverConfig, solve_exflow
from placement.metrics import evaluate
from placement.plan import PlacementPlan
from placement.runtime import EPConfig, ExpertParallelRuntime, apply_placement, split_state_dict
from routing.trace import RoutingTrace

pytestmark = pytest.mark.ray


def _model(family, **kw):
    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny(family, **kw), dtype=torch.float32)
    m.init_weights(std=0.2, seed=1)  # large weights: routing differs a lot between tokens
    return m.eval()


def _record(model, ids_BT):
    """The routing of one forward, as a RoutingTrace (token order = flattened batch)."""
    rec = {}
    hooks = [b.router.register_forward_hook(lambda mod, inp, out, i=b.moe_index: rec.__setitem__(i, out))
             for b in model.moe_blocks()]
    with torch.no_grad():
        logits = model(ids_BT)
    for h in hooks:
        h.remove()
    L = len(rec)
    ids = np.stack([rec[i][0].numpy() for i in range(L)])
    w = np.stack([rec[i][1].float().numpy() for i in range(L)])
    return logits, RoutingTrace(ids, model.config.num_experts, weights=w)


def _random_plan(L, E, P, seed):
    rng = np.random.default_rng(seed)
    return PlacementPlan([(rng.permutation(E) % P).tolist() for _ in range(L)], P, method="random")


def _check(rt, ids_BT, want, trace, plan):
    for mode in ("standard", "coherent"):
        rt.set_mode(mode)
        rt.reset_counters()
        got = rt.forward(ids_BT)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{plan.method} {mode}: {m}")
        c = rt.counters()
        f = evaluate(plan, trace)
        rows = sum(x["dispatch_rows"] + x["combine_rows"] for x in c)
        want_rows = (f.cc_messages_per_token if mode == "coherent" else f.ep_messages_per_token) * trace.num_tokens
        assert rows == pytest.approx(want_rows), f"{plan.method} {mode}: moved rows {rows} != predicted {want_rows}"
        if mode == "coherent" and trace.top_k == 1:
            assert all(x["all_to_all_calls"] <= x["layers"] for x in c)  # one all-to-all per layer


@pytest.fixture(scope="module")
def rt4(ray_session):
    model = _model("mixtral", num_hidden_layers=3)
    rt = ExpertParallelRuntime(model, round_robin(3, 8, 4), EPConfig(mode="coherent"))
    yield rt
    rt.shutdown()


def test_two_ranks_mixtral_round_robin_and_replicated_eplb(rt4):
    # plans on 2 ranks run on ranks 0-1 of the 4-actor runtime, in their own process group
    rt2 = rt4
    model = _model("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    want, trace = _record(model, ids)
    st = AffinityStats.from_trace(trace)
    # and copies placed by affinity (placement/replicate.py) on top of round robin
    for plan in (round_robin(3, 8, 2), eplb(st, 2), add_affinity_replicas(round_robin(3, 8, 2), trace, 1)):
        rt2.load(model, plan)
        n_copies = sum(len(plan.ranks_of(l, e)) for l in range(3) for e in range(8))
        assert sum(rt2.expert_params) == n_copies * (2 * 16 * 32 + 32 * 16)  # each rank only its own experts
        _check(rt2, ids, want, trace, plan)
        if plan.method == "round_robin":
            ref, ref_logits = _greedy(model, ids, 4)
            for mode in ("standard", "coherent"):
                rt2.set_mode(mode)
                for home_only in (False, True):
                    toks, logits = rt2.greedy(ids, 4, home_only)
                    assert torch.equal(toks, ref), (mode, home_only)
                    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def _greedy(model, ids, n):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    out, steps = [], []
    with torch.no_grad():
        logits = model(ids, cache=cache)
        for _ in range(n):
            steps.append(logits[:, -1:])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = model(nxt, cache=cache)
    return torch.cat(out, 1), torch.cat(steps, 1)


def test_four_ranks_deepseek_ilp_and_random_plans(rt4):
    # dense first layer, shared experts, grouped sigmoid routing, top-k from the tiny preset
    model = _model("deepseek_v3", num_hidden_layers=4)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    want, trace = _record(model, ids)
    L, E = trace.num_layers, trace.num_experts
    ilp = solve_exflow(AffinityStats.from_trace(trace), 4, config=SolverConfig(time_limit_s=3))
    ref, ref_logits = _greedy(model, ids, 3)
    for plan in (ilp, _random_plan(L, E, 4, seed=3)):
        rt4.load(model, plan)
        _check(rt4, ids, want, trace, plan)
        for mode in ("standard", "coherent"):  # ExFlow decoding: MLA attention on the home rank only
            rt4.set_mode(mode)
            toks, logits = rt4.greedy(ids, 3, home_only=True)
            assert torch.equal(toks, ref)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_top1_coherent_uses_one_all_to_all_per_layer(rt4):
    model = _model("mixtral", num_hidden_layers=3, num_experts_per_tok=1)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    want, trace = _record(model, ids)
    plan = _random_plan(3, 8, 4, seed=0)
    rt4.load(model, plan)
    _check(rt4, ids, want, trace, plan)
    rt4.reset_counters()
    ref, ref_logits = _greedy(model, ids, 4)
    toks, logits = rt4.greedy(ids, 4, home_only=True)
    assert torch.equal(toks, ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    c = rt4.counters()  # prefill + 3 home-only steps: no partial sum ever moves, one all-to-all per layer
    assert sum(x["combine_rows"] for x in c) == 0
    assert all(x["all_to_all_calls"] <= x["layers"] for x in c)
    rt4.set_mode("standard")
    rt4.reset_counters()
    rt4.forward(ids)
    assert max(x["all_to_all_calls"] for x in rt4.counters()) > 3  # standard needs more


def test_serving_steps_return_logits_or_rank_0s_greedy_tokens(rt4):
    """step(argmax=True), the engine's greedy_next: each row's argmax taken on rank 0 equals the argmax
    of the logits step() returns, step by step (prefill, then decode on the kept cache); argmax needs
    last_only."""
    model = _model("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    rt4.load(model, round_robin(3, 8, 4))  # the tests before may have left another model loaded
    rt4.set_mode("coherent")
    rt4.open_cache(3, 12)
    seqs = {}
    for argmax in (False, True):
        feed, out = ids, []
        for i in range(4):
            got = rt4.step(feed, None, range(3) if i == 0 else (), True, argmax=argmax)
            tok = got if argmax else got[:, -1].argmax(-1, keepdim=True)
            assert tok.shape == (3, 1) and tok.dtype == torch.int64
            out.append(tok)
            feed = tok
        seqs[argmax] = torch.cat(out, 1)
    assert torch.equal(seqs[True], seqs[False])
    with torch.no_grad():  # and both are the single-process model's greedy tokens
        cache = model.new_cache(3, 12)
        feed, want = ids, []
        for _ in range(4):
            feed = model(feed, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            want.append(feed)
    assert torch.equal(seqs[True], torch.cat(want, 1))
    with pytest.raises(Exception, match="needs last_only=True"):
        rt4.step(ids[:, :1], None, (), False, argmax=True)


def test_configuration_errors():
    with pytest.raises(ValueError, match="mode"):
        EPConfig(mode="fast")
    # ranks sharing a GPU: only through gloo (NCCL refuses two ranks on one device)
    assert EPConfig(device="cuda").process_group() == "nccl" and EPConfig().process_group() == "gloo"
    assert EPConfig(device="cuda", comm="gloo", gpus_per_rank=0.5).process_group() == "gloo"
    with pytest.raises(ValueError, match="comm='gloo'"):
        EPConfig(device="cuda", gpus_per_rank=0.5)
    with pytest.raises(ValueError, match="gpus_per_rank must be"):
        EPConfig(device="cuda", comm="gloo", gpus_per_rank=0)
    with pytest.raises(ValueError, match="comm must be"):
        EPConfig(comm="mpi")
    with pytest.raises(ValueError, match="CPU ranks use gloo"):
        EPConfig(comm="nccl")
    with pytest.raises(ValueError, match="adaptive"):
        EPConfig(device="cuda", comm="gloo", parallel="adaptive")
    model = _model("mixtral")
    with pytest.raises(ValueError, match="plan is for"):
        split_state_dict(model, round_robin(3, 8, 2))
    with pytest.raises(ValueError, match="rank 5"):
        apply_placement(model, round_robin(2, 8, 2), 5)


def test_runtime_refuses_more_ranks_than_it_has(rt4):
    with pytest.raises(ValueError, match="only 4"):
        rt4.load(_model("mixtral", num_hidden_layers=3), round_robin(3, 8, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rank_results_cross_the_wire_bit_for_bit_in_their_dtype(dtype):
    from placement.runtime import pack_result, unpack_result
    t = (torch.randn(8, 1, 4096) * 3).to(dtype)
    w = pack_result(t)
    assert type(w[1]).__module__ == "numpy"  # not a pickled torch tensor
    w[1].setflags(write=False)  # as Ray hands it out
    back = unpack_result(w)
    assert back.dtype == dtype and torch.equal(back, t)
    back += 1  # memory of its own: writing it is safe


def test_ep_trace_prints_each_ranks_calls(tmp_path, monkeypatch, capsys):
    """MOEFLOW_EP_TRACE=1: a rank prints entering and leaving each call (where a stalled collective
    would show which rank is inside which call); unset, it prints nothing."""
    import torch.distributed as dist

    from placement.runtime import EPWorker
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        cfg = MoEConfig.tiny("mixtral", num_hidden_layers=2)
        w = EPWorker(0, 1, EPConfig(device="cpu"))
        w.load_seeded(cfg.to_hf_dict(), round_robin(2, cfg.num_experts, 1).to_dict(), 0, 0.2, "float32")
        w.open_cache(2, 8)
        assert capsys.readouterr().out == ""
        monkeypatch.setenv("MOEFLOW_EP_TRACE", "1")
        w.step(torch.ones(2, 3, dtype=torch.long), None, [], True)
        w.step(torch.ones(2, 1, dtype=torch.long), None, [], True)
        lines = capsys.readouterr().out.splitlines()
        assert [x.split()[4:6] for x in lines] == [["#1", "enter"], ["#1", "leave"], ["#2", "enter"], ["#2", "leave"]]
        assert all(x.startswith("[ep-trace rank 0] step") for x in lines) and "(2, 3)" in lines[0]
    finally:
        dist.destroy_process_group()


def test_a_rank_that_raises_fails_the_call_at_once(ray_session):
    """One rank raises while its peer waits for it inside a collective: the runtime raises that
    rank's error at once (ray.get of the ranks' results raises the first error it sees), so a
    failing rank cannot look like a stalled step. An _all that waited for every rank would hang."""
    import threading

    import ray
    from ray.util.placement_group import remove_placement_group
    model = MoEForCausalLM(MoEConfig.tiny("mixtral", num_hidden_layers=2), dtype=torch.float32)
    model.init_weights(std=0.2, seed=1)
    rt = ExpertParallelRuntime(model, round_robin(2, model.config.num_experts, 2), EPConfig(mode="coherent"))
    try:
        ray.get(rt.workers[0].open_cache.remote(2, 16))  # rank 1 has no serving cache: its step raises
        got = {}

        def call():
            try:
                rt.step(torch.ones(2, 4, dtype=torch.long), None, (), True)
            except Exception as e:  # noqa: BLE001 - the test reads it
                got["error"] = e
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the runtime waited for the rank stuck in a collective"
        assert "no serving cache on this rank" in str(got["error"])
    finally:
        for w in rt.workers:  # rank 0 is still inside its step: no graceful shutdown
            ray.kill(w)
        remove_placement_group(rt.pg)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["sharing", "two_gpus"])
def test_gpu_ranks_on_one_or_two_gpus(ray_session, backend, layout):
    """Two ranks on one GPU (EPConfig comm='gloo', gpus_per_rank=0.5: collectives through host memory),
    or on two GPUs over NCCL: a forward and the serving steps (replicated prefill, home-only decode,
    eager) give the single-process model's logits."""
    import ray
    need = 1 if layout == "sharing" else 2
    if ray.cluster_resources().get("GPU", 0) < need:
        pytest.skip(f"Ray sees fewer than {need} GPUs")
    model = _model("mixtral", num_hidden_layers=3)
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        cache = model.new_cache(3, 10)
        ref = [model(ids, cache=cache, last_only=True)]
        feeds = [ref[-1][:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):
            ref.append(model(feeds[-1], cache=cache, last_only=True))
            feeds.append(ref[-1][:, -1].argmax(-1, keepdim=True))
    comm = dict(comm="gloo", gpus_per_rank=0.5) if layout == "sharing" else dict(comm="nccl")
    rt = ExpertParallelRuntime(model, round_robin(3, 8, 2), EPConfig(mode="coherent", device="cuda", backend=backend,
                                                                     **comm))
    try:
        tol = dict(rtol=1e-5, atol=1e-5) if backend == "torch" else dict(rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(rt.forward(ids), want, **tol)
        rt.open_cache(3, 10)
        got = [rt.step(ids, None, (), True)] + [rt.step(f, None, (), True) for f in feeds[:3]]
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, **tol)
        assert sum(c["dispatch_rows"] for c in rt.counters()) > 0
    finally:
        rt.shutdown()
