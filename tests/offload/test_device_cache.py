"""driver='device' (offload/device_cache.py): the plan on the device against a plain reference cache, the
fill kernel (interpreted) against a copy, and offloaded generation equal to resident generation."""
import numpy as np
import pytest
import torch

from offload import OffloadConfig
from offload.device_cache import DeviceExpertCache, fill_slots
from offload.store import HostExpertStore

from .helpers import greedy, offloaded, tiny_model

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the kernels' tests: interpreted in CI

PROMPT = [3, 17, 5, 9, 30]
STEPS = 6


class _RefCache:
    """The same policy, written plainly on the host: what plan() must decide."""

    def __init__(self, E, S, policy, decay):
        self.E, self.S, self.policy, self.decay = E, S, policy, decay
        self.expert_in = [-1] * S
        self.last = [0] * S
        self.freq = np.zeros(E)
        self.clock = self.tick = 0
        self.hits = self.misses = self.fills = 0

    def step(self, ids):
        """ids: list of lists (rounds are planned here as the device plans them). Returns per token-slot the
        round each id was computed in."""
        pending = [e for e in ids if e >= 0]
        distinct = sorted(set(pending))
        self.clock += 1
        res = {e: s for s, e in enumerate(self.expert_in) if e >= 0}
        self.hits += sum(e in res for e in distinct)
        self.misses += sum(e not in res for e in distinct)
        if self.policy == "lfu":
            self.freq *= self.decay
            self.freq[distinct] += 1
        computed_in = {}
        rnd = 0
        while distinct:
            res = {e: s for s, e in enumerate(self.expert_in) if e >= 0}
            busy = {res[e] for e in distinct if e in res}
            cands = [s for s in range(self.S) if s not in busy]

            def key(s):
                e = self.expert_in[s]
                if e < 0:
                    return (0, -np.inf, -np.inf, s)
                return (0, self.freq[e] if self.policy == "lfu" else 0, self.last[s], s)
            cands.sort(key=key)
            misses = [e for e in distinct if e not in res]
            for e, s in zip(misses, cands):
                old = self.expert_in[s]
                self.expert_in[s] = e
                self.fills += 1
                res.pop(old, None)
                res[e] = s
            done = [e for e in distinct if e in res and e not in misses] + [e for e in misses if e in res]
            for e in done:  # one tick per expert used, hits first (as the host cache touches them)
                self.tick += 1
                self.last[res[e]] = self.tick
                computed_in[e] = rnd
            distinct = [e for e in distinct if e not in res]
            rnd += 1
        return computed_in


def _store(L, E, I=4, D=6, seed=0, pin=False):
    g = torch.Generator().manual_seed(seed)
    t = (lambda x: x.pin_memory()) if pin else (lambda x: x)
    return HostExpertStore([(t(torch.randn(E, 2 * I, D, generator=g)), t(torch.randn(E, D, I, generator=g)))
                            for _ in range(L)])


def test_auto_driver_takes_the_device_where_it_runs_and_measured_faster(model):
    """driver='auto': 'device' on a CUDA device with the triton experts and settings it takes, for experts of at
    most AUTO_DEVICE_MAX_EXPERT bytes whose decode step's top-k fit the slots in one round; else 'host' (with the
    reason being the device, the backend, a refused setting, the disk store, large experts or a batch needing
    rounds); on this CPU machine the model offloads with the host's cache."""
    from offload.apply import resolve_driver
    from offload.cache import ExpertCache
    from offload.config import AUTO_DEVICE_MAX_EXPERT
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    qwen3, mixtral = 9_437_184, 352_321_536  # bytes of one bfloat16 expert

    def pick(dev=cuda, backend="triton", disk=False, nbytes=qwen3, slots=32, top_k=8, dtype=None, **kw):
        return resolve_driver(OffloadConfig(slots_per_layer=slots, driver="auto", **kw), device=dev, backend=backend,
                              use_disk=disk, expert_bytes=nbytes, slots=slots, top_k=top_k, expert_dtype=dtype)
    assert pick() == "device"
    assert pick(prefetch="next_layer_gate") == "device" and pick(policy="lru") == "device"
    assert pick(dev=cpu) == "host" and pick(backend="torch") == "host" and pick(disk=True) == "host"
    assert pick(cpu_fallback=True) == "host" and pick(expert_slices=2) == "host"
    assert pick(policy="belady", trace=object()) == "host"
    assert pick(nbytes=mixtral, slots=2, top_k=2) == "host" and pick(nbytes=AUTO_DEVICE_MAX_EXPERT) == "device"
    assert pick(decode_batch=4) == "device" and pick(decode_batch=5) == "host"  # 4 x 8 fit 32 slots in one round
    assert pick(slots=16, decode_batch=2) == "device" and pick(slots=16, decode_batch=4) == "host"  # OLMoE at 25%
    assert pick(slots=6) == "host"  # fewer slots than top-k: rounds at any batch
    # rounds, but bfloat16 experts the device driver packs and the host path would not (8 <= MiB < 10): device
    bf16 = torch.bfloat16
    assert pick(decode_batch=8, dtype=bf16) == "device" and pick(decode_batch=8, dtype=torch.float32) == "host"
    assert pick(decode_batch=8, dtype=bf16, pack_experts=False) == "host"  # (packing as given: the same on both)
    olmoe = 12_582_912  # both drivers pack it: at 4 rows of 16 slots, the copy engine
    assert pick(nbytes=olmoe, slots=16, decode_batch=4, dtype=bf16) == "host"
    assert pick(nbytes=olmoe, slots=16, decode_batch=2, dtype=bf16) == "device"
    for given in ("host", "device"):  # a driver named is kept
        assert resolve_driver(OffloadConfig(slots_per_layer=2, driver=given), device=cpu, backend="torch",
                              use_disk=False, expert_bytes=mixtral, slots=2, top_k=8) == given
    m = offloaded(model, slots_per_layer=2, driver="auto")
    assert type(m.offload_cache) is ExpertCache
    assert m.offload_cache.driver_choice == "driver auto -> host: the device driver runs on a CUDA device, not cpu"
    assert offloaded(model, slots_per_layer=2, driver="device").offload_cache.driver_choice == "driver device"
    from offload.apply import driver_choice  # each pick says why

    def why(**kw):
        kw = {"dev": cuda, "backend": "triton", "disk": False, "nbytes": qwen3, "slots": 32, "top_k": 8, **kw}
        return driver_choice(OffloadConfig(slots_per_layer=kw["slots"], driver="auto", **kw.pop("cfg", {})),
                             device=kw["dev"], backend=kw["backend"], use_disk=kw["disk"], expert_bytes=kw["nbytes"],
                             slots=kw["slots"], top_k=kw["top_k"], expert_dtype=kw.get("dtype"))
    assert why() == ("device", "a decode step's experts (1 row x top-8) fit the 32 slots in one round")
    assert why(backend="torch")[1].endswith("not 'torch' (--backend triton)")
    assert why(cfg=dict(cpu_fallback=True))[1] == "the device driver does not do cpu_fallback"
    assert why(disk=True)[1].startswith("the device driver reads experts from host memory")
    assert why(nbytes=mixtral, slots=2, top_k=2) == ("host", "experts of 336.0 MiB (over 64 MiB) make copy-bound "
                                                     "steps, where the copy engine reads faster")
    assert why(cfg=dict(decode_batch=8), dtype=bf16)[1] == ("it packs these 9.0 MiB experts to 12 bits a weight and "
                                                            "the host path would not")
    assert why(cfg=dict(decode_batch=8)) == ("host", "8 rows x top-8 outnumber the 32 slots: copy-bound steps in "
                                                     "rounds, where the copy engine reads faster")
    with pytest.raises(ValueError, match="decode_batch"):
        OffloadConfig(slots_per_layer=2, decode_batch=0)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("E,S,K,T", [(8, 3, 2, 1), (8, 1, 2, 1), (16, 4, 4, 3), (8, 8, 2, 2), (6, 2, 3, 2)])
def test_plan_decides_as_the_reference(policy, E, S, K, T):
    rng = np.random.default_rng(E * 100 + S * 10 + K + T)
    cache = DeviceExpertCache(_store(1, E), S, policy, "cpu", lfu_half_life=3.0 if policy == "lfu" else None)
    ref = _RefCache(E, S, policy, cache.decay)
    for step in range(40):
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
        if step % 7 == 3:
            ids[0, -1] = -1  # a dropped slot
        want = ref.step(ids.reshape(-1).tolist())
        pending = torch.from_numpy(ids.reshape(-1)).long()
        for r in range(cache.rounds(T, K)):
            slot_N, fill_e, fill_s = cache.plan(0, pending, r)
            got = {int(e) for e, s in zip(pending.tolist(), slot_N.tolist()) if e >= 0 and s >= 0}
            assert got == {e for e, rr in want.items() if rr == r}, (step, r)
            # the slots hold what the table says, and the fill list is exactly the admitted misses
            table = cache.slot_of[0, :E].tolist()
            for e, s in zip(pending.tolist(), slot_N.tolist()):
                if s >= 0:
                    assert table[e] == s and int(cache.expert_in[0, s]) == e
            fills = {(int(e), int(s)) for e, s in zip(fill_e.tolist(), fill_s.tolist()) if e >= 0}
            assert all(table[e] == s for e, s in fills)
            pending = torch.where(slot_N >= 0, -1, pending)
        assert (pending < 0).all()
        assert sorted(cache.resident(0)) == sorted(e for e in ref.expert_in if e >= 0)
    st = cache.stats()
    assert (st["hits"], st["misses"], st["copies"]) == (ref.hits, ref.misses, ref.fills)
    assert st["hits"] > 0 and st["misses"] > 0


@pytest.mark.parametrize("M", [1, 3])
def test_fill_kernel(M):
    """The fill kernel (interpreted in CI, compiled on a GPU: host store pinned, slots on the device) against its
    plain reference, with a -1 entry."""
    src13, src2 = torch.randn(5, 2 * 24, 40), torch.randn(5, 40, 24)
    ref13, ref2 = torch.full((3, 48, 40), float("nan")), torch.full((3, 40, 24), float("nan"))
    fe = torch.tensor([4, -1, 1][:M])
    fs = torch.tensor([2, 1, 0][:M])
    fill_slots(src13, src2, ref13, ref2, fe, fs, use_kernel=False)
    if DEV.type == "cuda":
        src13, src2 = src13.pin_memory(), src2.pin_memory()
    got13, got2 = torch.full_like(ref13, float("nan"), device=DEV), torch.full_like(ref2, float("nan"), device=DEV)
    fill_slots(src13, src2, got13, got2, fe.to(DEV), fs.to(DEV), use_kernel=True)
    torch.testing.assert_close(got13.cpu(), ref13, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(got2.cpu(), ref2, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(got13[2].cpu(), src13[4])


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixtral")


@pytest.fixture(scope="module")
def resident(model):
    return greedy(model, PROMPT, STEPS)


@pytest.mark.parametrize("policy,slots", [("lru", 1), ("lru", 3), ("lru", 8), ("lfu", 1), ("lfu", 3)])
def test_device_driver_equals_resident(model, resident, policy, slots):
    m = offloaded(model, slots_per_layer=slots, policy=policy, driver="device")
    toks, logits = greedy(m, PROMPT, STEPS)
    torch.testing.assert_close(logits, resident[1], atol=1e-6, rtol=0)
    assert toks == resident[0]
    st = m.offload_cache.stats()
    assert st["misses"] > 0 and st["copies"] >= st["misses"]
    if slots >= 8:
        assert st["copies"] == st["misses"] <= 8 * len(m.moe_blocks())  # each expert read once, then kept
    assert "decided on the device" in m.offload_cache.describe()


@pytest.mark.parametrize("policy,slots", [("lru", 2), ("lfu", 3)])
def test_device_driver_with_next_layer_prefetch_equals_resident(model, resident, policy, slots):
    """prefetch='next_layer_gate' under driver='device': layer l+1's router on layer l's input guesses, the
    guesses are planned and read into layer l+1's slots (inline on the CPU, on a side stream on a GPU), and the
    outputs stay the resident model's; the prefetches are counted and some are used."""
    m = offloaded(model, slots_per_layer=slots, policy=policy, driver="device", prefetch="next_layer_gate", prefetch_k=2)
    toks, logits = greedy(m, PROMPT, STEPS)
    torch.testing.assert_close(logits, resident[1], atol=1e-6, rtol=0)
    assert toks == resident[0]
    st = m.offload_cache.stats()
    assert st["prefetches"] > 0 and 0 < st["useful_prefetches"] <= st["prefetches"]
    assert 0 < st["prefetch_precision"] <= 1 and 0 < st["prefetch_recall"] <= 1
    assert st["copies"] >= st["prefetches"] and st["evictions"] > 0


def test_device_driver_guesses_before_it_joins_the_prefetch_into_its_layer(model, monkeypatch):
    """Every next router's guess (here the gate trick's) is computed first in a layer's forward, before the layer
    joins the prefetch into its own slots (_early_guess: on a GPU the compute stream works on it while that
    prefetch still fills; after the demand fill it held back the side stream's prefetch, BENCHMARKS 3s); the last
    MoE layer guesses nothing."""
    import offload.device_cache as dc
    m = offloaded(model, slots_per_layer=2, driver="device", prefetch="next_layer_gate", prefetch_k=2)
    cache, log = m.offload_cache, []
    real_guess, real_join = dc.router_guess, cache.join
    monkeypatch.setattr(dc, "router_guess", lambda *a, **k: log.append("guess") or real_guess(*a, **k))
    monkeypatch.setattr(cache, "join", lambda layer: log.append(layer) or real_join(layer))
    greedy(m, PROMPT, 2)
    L = len(m.moe_blocks())
    joins = [i for i, e in enumerate(log) if e != "guess"]
    assert len(joins) > L and log.count("guess") == len(joins) // L * (L - 1)
    for i in joins:
        assert (log[i - 1] == "guess") == (log[i] < L - 1), log[max(0, i - 3):i + 1]


def test_device_driven_models_are_not_cut_into_graph_pieces(model):
    """Graph pieces cut around host-deciding experts; device-deciding ones need none (the whole step captures
    with the triton backend, graph_support), so piecewise_support says why not, and the Engine decodes eagerly
    where the whole step cannot be captured."""
    from moe.cuda_graph import graph_support, piecewise_support
    m = offloaded(model, slots_per_layer=2, driver="device")
    assert "decides on the device" in piecewise_support(m, need_cuda=False)
    assert graph_support(m) is not None  # on the CPU


def test_device_driver_refuses_what_it_cannot_do():
    for kw, what in ((dict(store="disk", checkpoint="x"), "store='disk'"), (dict(prefetch="predictor", predictor=type("P", (), {"predict_batch": None})()), "prefetch='predictor'"),
                     (dict(cpu_fallback=True), "cpu_fallback"), (dict(expert_slices=2), "expert_slices"),
                     (dict(policy="belady", trace=object()), "policy='belady'")):
        with pytest.raises(ValueError, match=what):
            OffloadConfig(slots_per_layer=2, driver="device", **kw)
    with pytest.raises(ValueError, match="driver must be"):
        OffloadConfig(slots_per_layer=2, driver="gpu")
    with pytest.raises(ValueError, match="lru' or 'lfu"):
        DeviceExpertCache(_store(1, 4), 2, "belady")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("E,S,K,T", [(8, 3, 2, 1), (16, 4, 4, 3), (6, 2, 3, 2), (12, 12, 3, 1)])
def test_plan_kernel_decides_as_plan_torch(policy, E, S, K, T):
    """The one-program plan kernel (interpreted in CI, compiled on a GPU) against plan_torch, step by step, round by
    round: the same slots, fill lists, tables, recency stamps, LFU counts and counters."""
    rng = np.random.default_rng(E + 7 * S + K + T)
    caches = [DeviceExpertCache(_store(1, E, pin=DEV.type == "cuda"), S, policy, DEV, lfu_half_life=2.5 if policy == "lfu" else None)
              for _ in range(2)]
    caches[0]._kernel, caches[1]._kernel = False, True
    for step in range(12):
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).reshape(-1)
        if step % 5 == 2:
            ids[-1] = -1
        if step % 3 == 1:  # a prefetch of guesses first (the previous layer's), as the side stream plans it
            guess = torch.from_numpy(rng.choice(E, min(E, K + 1), replace=False)).long().to(DEV)
            for a, b in zip(*[c.plan(0, guess.clone(), 0, prefetch=True) for c in caches]):
                assert torch.equal(a, b), step
        pend = [torch.from_numpy(ids).long().to(DEV) for _ in caches]
        for r in range(caches[0].rounds(T, K)):
            outs = [c.plan(0, p, r) for c, p in zip(caches, pend)]
            for a, b in zip(*outs):
                assert torch.equal(a, b), (step, r)
            pend = [torch.where(o[0] >= 0, -1, p) for o, p in zip(outs, pend)]
        for name, n in (("slot_of", E), ("expert_in", S), ("last_use", S), ("freq", E), ("fresh", S)):  # (past n: nobody's)
            assert torch.equal(getattr(caches[0], name)[:, :n], getattr(caches[1], name)[:, :n]), name
        for name in ("clock", "counters"):
            assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name


@pytest.mark.parametrize("policy,slots", [("lru", 1), ("lfu", 3)])
def test_device_driver_packed_equals_unpacked(model, policy, slots):
    """A packed store (12 bits a weight) under driver='device': the fill decodes the packed buffers (the kernel,
    interpreted in CI), the tokens and logits are those of the unpacked store bit for bit, and the bytes read
    are the packed buffers' (~3/4 of the bfloat16 bytes)."""
    from .helpers import twin
    bf = twin(model).to(torch.bfloat16)
    runs = []
    for pack in (False, True):
        m = offloaded(bf, slots_per_layer=slots, policy=policy, driver="device", pack_experts=pack)
        assert (m.offload_cache.packed is not None) == pack
        runs.append((greedy(m, PROMPT, 4), m.offload_cache.stats()))
    (a, sa), (b, sb) = runs
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert sa["copies"] == sb["copies"] > 0 and 0.7 * sa["bytes_copied"] < sb["bytes_copied"] < 0.85 * sa["bytes_copied"]
    assert "packed" in m.offload_cache.describe()


def test_auto_takes_the_device_where_the_host_paths_staging_leaves_no_room(model, monkeypatch):
    """A budget that holds the experts' slots but not the host path's packed staging buffer as well: where 'auto'
    chose the host path (here by a batch that needs rounds) and the device driver can run, it takes the device
    driver, which sets no staging aside, instead of failing; where the device driver cannot run, the host path's
    error stands. (On this CPU the device driver 'runs' only by the patch.)"""
    import offload.apply as apply_mod
    from offload import apply_offload

    from .helpers import twin
    bf = twin(model).to(torch.bfloat16)
    blocks = bf.moe_blocks()
    expert = (blocks[0].experts.w13[0].numel() + blocks[0].experts.w2[0].numel()) * 2
    ids = {id(p) for b in blocks for p in b.experts.parameters()}
    dense = sum(p.numel() * p.element_size() for p in bf.parameters() if id(p) not in ids)
    dense += sum(b.numel() * b.element_size() for b in bf.buffers())
    budget = dense + 2 * len(blocks) * expert + 1024  # 2 slots a layer; the staging buffer (>= 1 MiB) does not fit
    kw = dict(gpu_memory=budget, reserve_bytes=0, device="cpu", calibrate=False, pack_experts=True, decode_batch=64)
    with pytest.raises(ValueError, match="cannot hold"):
        apply_offload(twin(bf), OffloadConfig(**kw))  # the device driver cannot run on the CPU: the host's error
    monkeypatch.setattr(apply_mod, "device_driver_runs", lambda cfg, **_: True)
    m = apply_offload(twin(bf), OffloadConfig(**kw))
    assert isinstance(m.offload_cache, DeviceExpertCache) and m.offload_cache.slots == 2
    assert "staging buffers" in m.offload_cache.driver_choice
    assert m.offload_cache.packed is not None
    want = greedy(offloaded(bf, slots_per_layer=2, driver="device", pack_experts=True), PROMPT, 4)
    got = greedy(m, PROMPT, 4)
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_packed_fill_reaches_buffers_in_every_chunk_of_the_arena():
    """Each packed buffer in a chunk of its own (an arena of tiny chunks): the fill kernel (interpreted) reaches
    them all from the one anchor and decodes each into its slot exactly as the reference decode (interpreted in CI;
    compiled on a GPU, the arena pinned)."""
    from kernels.unpack import pack_bf16, unpack_bf16_reference
    from offload.device_cache import PackedSource, fill_slots_packed
    from offload.store import PackedHostExpertStore, PinnedArena
    g = torch.Generator().manual_seed(3)
    E, I, D = 4, 8, 40
    w13, w2 = torch.randn(E, 2 * I, D, generator=g).bfloat16(), torch.randn(E, D, I, generator=g).bfloat16()
    w13[1, 0, :5] = torch.tensor([1e30, -1e-30, 3e20, 0.0, -7e-25]).bfloat16()  # escapes
    arena = PinnedArena(64, pin=DEV.type == "cuda")  # every buffer larger than a chunk: one chunk each
    layer = [(arena.take(buf.numel()).copy_(buf), base, n_esc) for buf, base, n_esc in
             (pack_bf16(w13[e], w2[e]) for e in range(E))]
    assert len(arena.chunks) == E
    store = PackedHostExpertStore([layer], (2 * I, D), (D, I), arena)
    src = PackedSource(store, DEV)
    d13 = torch.full((3, 2 * I, D), float("nan"), device=DEV).bfloat16()
    d2 = torch.full((3, D, I), float("nan"), device=DEV).bfloat16()
    moved = torch.zeros(1, dtype=torch.int64, device=DEV)
    fill_slots_packed(src, 0, d13, d2, torch.tensor([3, 1, -1], device=DEV), torch.tensor([0, 2, 1], device=DEV), moved)
    d13, d2 = d13.cpu(), d2.cpu()
    for e, s in ((3, 0), (1, 2)):
        r13, r2 = torch.empty(2 * I, D).bfloat16(), torch.empty(D, I).bfloat16()
        unpack_bf16_reference(*store.packed(0, e), r13, r2)
        assert torch.equal(d13[s].view(torch.int16), r13.view(torch.int16)) and torch.equal(d13[s], w13[e])
        assert torch.equal(d2[s], w2[e])
    assert torch.isnan(d13[1].float()).all()  # the -1 entry wrote nothing
    assert int(moved) == store.copy_nbytes(0, 3) + store.copy_nbytes(0, 1)
