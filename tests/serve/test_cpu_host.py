"""CPU expert hosts as a placement tier: a tiny Mixtral whose experts are split between this
process and 2 CPU hosts (Ray actors, and the in-process thread fallback) gives the single-process
logits; killing a host mid-run re-homes its experts (to the other host, or into this process)
and the logits stay the same; hosts read exactly their experts from a checkpoint's memory map."""
import inspect
import os

import numpy as np
import pytest
import torch

from kernels import moe_experts_reference
from moe import MoEConfig, MoEForCausalLM, save_pretrained
from offload.tiered import TieredExperts, TierRuntimeConfig, apply_cpu_tier
from placement.cpu_tier import TieredPlan
from serve.cpu_host import CPUExpertHost, HostConfig, from_wire, to_wire
from serve.cpu_host_pool import HostClient, HostPoolConfig, start_hosts


def _model():
    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny("mixtral", num_hidden_layers=3), dtype=torch.float32)
    m.init_weights(std=0.2, seed=1)  # large weights: routing differs between tokens
    return m.eval()


def _plan(L=3, E=8):
    """GPU (rank 0) holds experts 0-1 of every layer, host 0 the even rest, host 1 the odd rest."""
    loc = [[0 if e < 2 else 1 + (e % 2) for e in range(E)] for _ in range(L)]
    return TieredPlan(loc, num_gpu_ranks=1, num_hosts=2, method="test")


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def _check(model, ref, atol=1e-5):
    with torch.no_grad():
        got = model(IDS)
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)


# --- the host alone -------------------------------------------------------------------------------
def test_host_compute_equals_reference_share():
    g = torch.Generator().manual_seed(0)
    E, J, D, I = 6, 8, 12, 4
    w13, w2 = torch.randn(E, J, D, generator=g), torch.randn(E, D, I, generator=g)
    host = CPUExpertHost(0, HostConfig(threads=1), pin_process=False)
    host.add_experts(2, [1, 4], to_wire(w13[[1, 4]]), to_wire(w2[[1, 4]]))
    x = torch.randn(5, D, generator=g)
    ids = torch.tensor([[1, 4], [4, 0], [2, 3], [1, -1], [5, 4]])
    w = torch.rand(5, 2, generator=g)
    masked = torch.where((ids == 1) | (ids == 4), ids, -1)
    y, secs = host.compute(2, to_wire(x), masked.numpy(), w.numpy())
    torch.testing.assert_close(from_wire(y, torch.float32), moe_experts_reference(x, w13, w2, masked, w))
    assert secs >= 0 and host.health()["pairs"] == int((masked >= 0).sum())
    with pytest.raises(ValueError, match=r"does not hold experts \[0\] of MoE layer 2"):
        host.compute(2, to_wire(x), ids.clamp(max=1).numpy(), w.numpy())
    with pytest.raises(ValueError, match="does not hold experts"):
        host.compute(0, to_wire(x), masked.numpy(), w.numpy())


def test_bf16_wire_round_trip_and_bad_settings():
    t = torch.randn(3, 5).to(torch.bfloat16)
    assert to_wire(t).dtype == np.int16
    assert torch.equal(from_wire(to_wire(t), torch.bfloat16), t)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        HostConfig(threads=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        HostConfig(dtype="int8")
    with pytest.raises(ValueError, match="backend must be"):
        HostPoolConfig(backend="mpi")


def test_host_reads_only_its_experts_from_the_checkpoint(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path)
    host = CPUExpertHost(0, pin_process=False)
    layer_ids = [b.layer_idx for b in model.moe_blocks()]
    nbytes = host.load_checkpoint(str(tmp_path), layer_ids, [(1, 3), (2, 7)])
    assert host.held() == [(1, 3), (2, 7)]
    ex = model.moe_blocks()[1].experts
    assert torch.equal(host.experts[(1, 3)][0], ex.w13.detach()[3])
    assert torch.equal(host.experts[(1, 3)][1], ex.w2.detach()[3])
    assert nbytes == 2 * (ex.w13[0].numel() + ex.w2[0].numel()) * 4
    with pytest.raises(ValueError, match="outside the checkpoint"):
        host.load_checkpoint(str(tmp_path), layer_ids, [(5, 0)])


# --- the tier in the model: thread hosts (no Ray) ---------------------------------------------------
def test_thread_hosts_same_logits_and_failover_to_the_other_host():
    model = _model()
    with torch.no_grad():
        ref = model(IDS)
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    rt = apply_cpu_tier(model, _plan(), hosts)
    assert all(isinstance(b.experts, TieredExperts) for b in model.moe_blocks())
    _check(model, ref)
    s = rt.stats()
    assert s["cpu_pairs_per_host"].keys() == {0, 1} and s["local_pairs"] > 0
    assert s["cpu_pairs"] + s["local_pairs"] == 3 * IDS.numel() * 2  # every (token, slot) once
    hosts[0].kill()
    _check(model, ref)
    s = rt.stats()
    assert s["dead_hosts"] == [0] and s["retries"] == 1 and s["rehomed_experts"] == 9
    assert (rt.host_of[rt.host_of >= 0] == 1).all() and rt.host_of.max() == 1
    hosts[1].kill()  # no host left: streamed into this process
    _check(model, ref)
    assert (rt.host_of == -1).all() and rt.stats()["dead_hosts"] == [0, 1]


def test_process_hosts_same_logits_and_a_crash_is_rehomed():
    model = _model()
    with torch.no_grad():
        ref = model(IDS)
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="process"))
    try:
        assert [h.kind for h in hosts] == ["process", "process"]
        assert len({h.call("ready")["pid"] for h in hosts} | {os.getpid()}) == 3
        rt = apply_cpu_tier(model, _plan(), hosts)
        _check(model, ref)
        hosts[1].local.proc.kill()  # a crash, not an orderly stop
        hosts[1].local.proc.join()
        _check(model, ref)
        assert rt.stats()["dead_hosts"] == [1] and not hosts[1].alive
        assert sorted(hosts[0].call("held")) == sorted(_plan().experts_on_host(0) + _plan().experts_on_host(1))
    finally:
        for h in hosts:
            h.kill()


def test_rehome_local_and_no_source_is_a_clear_error():
    model = _model()
    with torch.no_grad():
        ref = model(IDS)
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    rt = apply_cpu_tier(model, _plan(), hosts, TierRuntimeConfig(rehome="local"))
    hosts[1].kill()
    _check(model, ref)
    assert sorted(model.moe_blocks()[0].experts.local_ids) == [0, 1, 3, 5, 7]
    assert rt.stats()["experts_on_hosts"] == 9

    model2 = _model()
    hosts2 = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    apply_cpu_tier(model2, _plan(), hosts2, TierRuntimeConfig(keep_source=False))
    hosts2[0].kill()
    with pytest.raises(RuntimeError, match="cannot be re-homed: no checkpoint"):
        model2(IDS)


def test_gpu_cache_plus_hosts_split_misses_same_logits():
    """offload's slot cache inside, every expert also on a host: hits from the cache, misses
    shared between copies and hosts by the cost model; a host dying mid-run is re-homed."""
    from offload import CostModel, HostExpertStore, OffloadConfig
    from offload.apply import install

    model = _model()
    with torch.no_grad():
        ref = model(IDS)
    blocks = model.moe_blocks()
    store = HostExpertStore.from_blocks(blocks, pin=False)
    # equal cost either way: the split sends about half of a step's misses to each resource
    cost = CostModel(copy_bytes_per_s=1e9, cpu_base_s=store.expert_bytes / 1e9, cpu_per_token_s=1e-12)
    cfg = OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False)
    cache = install(blocks, store, cfg, device=torch.device("cpu"), top_k=2, slots=2, cost=cost)
    everything_on_hosts = TieredPlan.on_hosts(3, 8, 2)
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    with pytest.raises(ValueError, match="dispatch must be"):
        TierRuntimeConfig(dispatch="random")
    rt = apply_cpu_tier(model, everything_on_hosts, hosts, TierRuntimeConfig(dispatch="split"))
    _check(model, ref)
    s = rt.stats()
    assert s["cpu_pairs"] > 0 and s["gpu_rank_pairs"] > 0 and cache.stats()["misses"] > 0
    assert s["cpu_pairs"] + s["gpu_rank_pairs"] == 3 * IDS.numel() * 2
    hosts[1].kill()
    _check(model, ref)
    assert rt.stats()["dead_hosts"] == [1]


def test_split_needs_a_cache():
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    with pytest.raises(ValueError, match="install offload's cache first"):
        apply_cpu_tier(_model(), _plan(), hosts, TierRuntimeConfig(dispatch="split"))


def test_apply_mismatches_are_clear():
    model = _model()
    hosts = start_hosts(HostPoolConfig(num_hosts=1, backend="thread"))
    with pytest.raises(ValueError, match="2 CPU hosts but 1 were given"):
        apply_cpu_tier(model, _plan(), hosts)
    with pytest.raises(ValueError, match="for 2 MoE layers x 8 experts"):
        apply_cpu_tier(model, _plan(L=2), hosts)


# --- Ray actors ----------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_hosts_same_logits_kill_mid_run(ray_session, tmp_path):
    ray = ray_session
    model = _model()
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        ref = model(IDS)
    n_cores = len(os.sched_getaffinity(0))
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="ray", num_cpus=0.1, pin=n_cores >= 2,
                                       cores=(0, 1) if n_cores >= 2 else None))
    assert all(h.kind == "ray" for h in hosts)
    info = [h.call("ready") for h in hosts]
    assert len({i["pid"] for i in info}) == 2  # two processes
    if n_cores >= 2:  # each host pinned to its own core
        assert [i["cores"] for i in info] == [[0], [1]]
    rt = apply_cpu_tier(model, _plan(), hosts, checkpoint=str(tmp_path))
    assert sorted(hosts[0].call("held")) == sorted(_plan().experts_on_host(0))  # only its experts
    _check(model, ref)
    # kill host 1 while the decode runs: generation with the cache must equal the reference's
    outs = {}
    for name, m in (("ref", _model()), ("tier", model)):
        cache = m.new_cache(2, 16)
        with torch.no_grad():
            logits = [m(IDS[:, :5], cache=cache)[:, -1]]
            for step in range(4):
                if name == "tier" and step == 2:
                    ray.kill(hosts[1].actor, no_restart=True)
                logits.append(m(IDS[:, 5 + step:6 + step], cache=cache)[:, -1])
        outs[name] = torch.stack(logits)
    torch.testing.assert_close(outs["tier"], outs["ref"], atol=1e-5, rtol=0)
    s = rt.stats()
    assert s["dead_hosts"] == [1] and s["rehomed_experts"] == 9
    assert sorted(hosts[0].call("held")) == sorted(_plan().experts_on_host(0) + _plan().experts_on_host(1))
    hosts[0].kill()


# --- gloo ranks + CPU hosts ----------------------------------------------------------------------
from placement.runtime import EPConfig, EPWorker, split_state_dict, unpack_result  # noqa: E402


class TierWorker(EPWorker):
    """An expert-parallel rank whose MoE layers also send the CPU tier's tokens to the hosts."""

    def tier(self, plan_dict, hosts, checkpoint):
        apply_cpu_tier(self.model, TieredPlan.from_dict(plan_dict), hosts, checkpoint=checkpoint)
        return sorted(self.model.moe_blocks()[0].experts.inner.local_ids)


@pytest.mark.ray
def test_gloo_ranks_and_cpu_hosts_same_logits(ray_session, tmp_path):
    ray = ray_session
    model = _model()
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        ref = model(IDS)
    # 2 GPU-tier ranks: experts 0-1 on rank 0, 2-3 on rank 1; hosts: 4,6 / 5,7
    loc = [[0, 0, 1, 1, 2, 3, 2, 3] for _ in range(3)]
    plan = TieredPlan(loc, num_gpu_ranks=2, num_hosts=2, method="test")
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="ray", num_cpus=0.1))
    cls = ray.remote(TierWorker)
    workers = [cls.options(num_cpus=0.1).remote(r, 2, EPConfig(mode="standard")) for r in range(2)]
    try:
        addr, port = ray.get(workers[0].address.remote())
        # the runtime's connect took (addr, port), later (rank, addr, port): follow whichever is here
        with_rank = "rank" in inspect.signature(EPWorker.connect).parameters
        ray.get([w.connect.remote(*((r,) if with_rank else ()), addr, port) for r, w in enumerate(workers)])
        gplan = plan.gpu_plan()
        dense, per_rank = split_state_dict(model, gplan)
        hf = model.config.to_hf_dict()
        ray.get([w.load.remote(hf, dense, per_rank[r], gplan.to_dict()) for r, w in enumerate(workers)])
        ray.get([w.tier.remote(plan.to_dict(), hosts, str(tmp_path)) for w in workers])
        # rank 0 returns the logits (the others may return None: every rank computed the same)
        outs = ray.get([w.forward.remote(IDS, None) for w in workers])
        assert outs[0] is not None
        for got in [unpack_result(o) for o in outs if o is not None]:  # rank results travel as numpy
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        # each token went to a host once (not once per rank)
        pairs = sum(h.call("health")["pairs"] for h in hosts)
        assert 0 < pairs < 3 * IDS.numel() * 2
        ray.kill(hosts[0].actor, no_restart=True)
        outs = ray.get([w.forward.remote(IDS, None) for w in workers])
        assert outs[0] is not None
        for got in [unpack_result(o) for o in outs if o is not None]:  # rank results travel as numpy
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    finally:
        ray.get([w.shutdown.remote() for w in workers])
        for w in workers:
            ray.kill(w)
        hosts[1].kill()


def test_probe_cost_measures_a_thread_host():
    host = start_hosts(HostPoolConfig(num_hosts=1, backend="thread"))[0]
    g = torch.Generator().manual_seed(0)
    host.call("add_experts", 0, [0], to_wire(torch.randn(1, 32, 16, generator=g)),
              to_wire(torch.randn(1, 16, 16, generator=g)))
    from serve.cpu_host_pool import probe_cost
    c = probe_cost(host, 0, 0, hidden_size=16, repeat=2)
    assert c.latency_s > 0 and c.bytes_per_s > 0 and c.cpu_per_token_s > 0 and c.row_bytes == 2 * 16 * 4
    with pytest.raises(ValueError, match=r"does not hold expert \(0, 3\)"):
        host.call("measure", 0, 3)
    host.kill()
