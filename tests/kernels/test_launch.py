"""kernels/launch.py: a compiled kernel launched again by its key, without Triton's binding.

The CPU tests drive the Launcher with a stand-in JIT function (a JITFunction subclass whose
``fn[grid](...)`` records the call and hands back a stand-in compiled kernel), so they check what
the key tells apart and what reaches the launcher. On a GPU the same fused MoE call is compared
with and without the fast path, and MOEFLOW_LAUNCH_CHECK=1 makes every launch of the GPU suite
check that Triton itself picks the kernel the key had cached.
"""
import pytest
import torch
from triton.runtime.jit import JITFunction

import kernels.launch as kl


class _Compiled:
    def __init__(self, name):
        self.name = name
        self.calls = []
        self.function = f"fn-{name}"
        self.packed_metadata = f"meta-{name}"

    def run(self, *a):  # the launcher: grid x3, stream, function, metadata, launch metadata, hooks, args
        self.calls.append(a)


class _Param:
    def __init__(self, default):
        self.default = default


class _FakeJit(JITFunction):
    """fn(x_ptr, n, BLOCK: constexpr, FLAG: constexpr = 7): compiles one kernel per Triton-style
    specialization (dtype and 16-byte alignment of x, n == 1, n % 16, BLOCK, FLAG)."""

    def __init__(self):  # no JITFunction.__init__: nothing here is Triton code
        self.arg_names = ["x_ptr", "n", "BLOCK", "FLAG"]
        self.params = [_Param(None), _Param(None), _Param(None), _Param(7)]
        self.__name__ = "fake_kernel"
        self.kernels = {}
        self.triton_calls = 0

    def __getitem__(self, grid):
        def go(x, n, BLOCK, FLAG=7, **opts):
            self.triton_calls += 1
            spec = (x.dtype, x.data_ptr() % 16 == 0, n == 1, n % 16 == 0, BLOCK, FLAG, repr(sorted(opts.items())))
            k = self.kernels.setdefault(spec, _Compiled(len(self.kernels)))
            k.calls.append(("triton", grid, x, n, BLOCK, FLAG))
            return k
        return go


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(kl, "ENABLED", True)
    monkeypatch.setattr(kl, "CHECK", False)
    monkeypatch.setattr(kl, "_current_device", lambda: 0)
    monkeypatch.setattr(kl, "_raw_stream", lambda device: 1234)
    return _FakeJit()


def test_a_repeated_key_goes_straight_to_the_launcher_with_every_parameter(fake):
    launch = kl.Launcher(fake)
    x = torch.zeros(64)
    k = launch[(3,)](x, 32, BLOCK=16, num_warps=4)
    assert fake.triton_calls == 1 and k.calls[-1][0] == "triton"
    assert launch[(5, 2)](x, 32, BLOCK=16, num_warps=4) is k
    assert fake.triton_calls == 1
    # grid padded to 3, the raw stream, the kernel's handle and metadata, no hooks, then every
    # parameter in signature order: positionals, keywords, the default of FLAG
    assert k.calls[-1] == (5, 2, 1, 1234, "fn-0", "meta-0", None, None, None, x, 32, 16, 7)


def test_what_the_key_tells_apart(fake):
    launch = kl.Launcher(fake)
    x = torch.zeros(64, dtype=torch.float16)
    launch[(1,)](x, 32, BLOCK=16)
    seen = fake.triton_calls
    for args, kwargs in [((x[1:], 32), {"BLOCK": 16}),              # address no longer 16-byte aligned
                         ((x.float(), 32), {"BLOCK": 16}),          # dtype
                         ((x, 33), {"BLOCK": 16}),                  # integer value
                         ((x, 32), {"BLOCK": 32}),                  # constexpr
                         ((x, 32), {"BLOCK": 16, "FLAG": 1}),       # constexpr given over its default
                         ((x, 32), {"BLOCK": 16, "num_warps": 8}),  # launch option
                         ((x, 1), {"BLOCK": 16}),                   # (Triton makes 1 a constant)
                         ((x, True), {"BLOCK": 16})]:               # True == 1 but not the same argument
        launch[(1,)](*args, **kwargs)
        assert fake.triton_calls == seen + 1, (args, kwargs)
        seen += 1
        launch[(1,)](*args, **kwargs)  # now cached
        assert fake.triton_calls == seen
    # another tensor of the same dtype and alignment takes the cached kernel
    launch[(1,)](torch.ones(64, dtype=torch.float16), 32, BLOCK=16)
    assert fake.triton_calls == seen


def test_off_check_hooks_and_unhashable_arguments_go_through_triton(fake, monkeypatch):
    launch = kl.Launcher(fake)
    x = torch.zeros(64)
    launch[(1,)](x, 32, BLOCK=16)
    monkeypatch.setattr(kl, "ENABLED", False)
    launch[(1,)](x, 32, BLOCK=16)
    assert fake.triton_calls == 2
    monkeypatch.setattr(kl, "ENABLED", True)
    monkeypatch.setattr(kl, "_hooked", lambda: True)
    launch[(1,)](x, 32, BLOCK=16)
    assert fake.triton_calls == 3
    monkeypatch.setattr(kl, "_hooked", lambda: False)
    launch[(1,)](x, 32, BLOCK=16, opt={"a": 1})   # an unhashable option: no key
    assert fake.triton_calls == 4
    monkeypatch.setattr(kl, "CHECK", True)  # every call through Triton, which must agree with the key
    launch[(1,)](x, 32, BLOCK=16)
    assert fake.triton_calls == 5


def test_a_set_launch_hook_counts_as_hooked():
    from triton import knobs

    def hook(*a):
        pass
    assert not kl._hooked()
    knobs.runtime.launch_enter_hook.add(hook)  # a HookChain (Triton 3.6 and 3.8)
    try:
        assert kl._hooked()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not kl._hooked()


def test_check_mode_catches_a_key_that_maps_two_specializations_to_one_kernel(fake, monkeypatch):
    launch = kl.Launcher(fake)
    x = torch.zeros(64)
    launch[(1,)](x, 32, BLOCK=16)
    fake.kernels.clear()  # Triton now compiles a new kernel for the same key: the check must see it
    monkeypatch.setattr(kl, "CHECK", True)
    with pytest.raises(RuntimeError, match="another compiled kernel"):
        launch[(1,)](x, 32, BLOCK=16)


def test_the_cache_starts_over_past_its_bound(fake, monkeypatch):
    monkeypatch.setattr(kl, "MAX_ENTRIES", 4)
    launch = kl.Launcher(fake)
    x = torch.zeros(64)
    for n in range(10):
        launch[(1,)](x, n + 2, BLOCK=16)
    assert len(launch._cache) <= 4


def test_interpreted_or_plain_functions_are_passed_through():
    calls = []

    class Plain:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k)) or "done"
    launch = kl.Launcher(Plain())
    assert not launch.fast
    assert launch[(2,)](1, B=3) == "done" and calls == [((2,), (1,), {"B": 3})]


@pytest.mark.gpu
def test_gpu_fused_moe_fwd_bwd_same_with_and_without_the_fast_path(monkeypatch):
    from kernels.fused_moe import fused_moe
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    E, D, I, K, T = 8, 256, 128, 2, 37
    # x at an odd offset in its buffer: not 16-byte aligned, a key of its own
    buf = torch.randn(T * D + 1, device=dev, dtype=dt, generator=g)
    w13 = torch.randn(E, 2 * I, D, device=dev, dtype=dt, generator=g) / D ** .5
    w2 = torch.randn(E, D, I, device=dev, dtype=dt, generator=g) / I ** .5
    ids = torch.randint(0, E, (T, K), device=dev, generator=g)
    wts = torch.rand(T, K, device=dev, generator=g)
    outs = {}
    for fast in (False, True, True):  # the second fast run launches from the cache
        monkeypatch.setattr(kl, "ENABLED", fast)
        res = []
        for x0 in (buf[:T * D].view(T, D), buf[1:].view(T, D)):
            x = x0.detach().requires_grad_()
            a, b = w13.clone().requires_grad_(), w2.clone().requires_grad_()
            w = wts.clone().requires_grad_()
            y = fused_moe(x, a, b, ids, w)
            y.float().square().sum().backward()
            res += [y, x.grad, a.grad, b.grad, w.grad]
        outs.setdefault(fast, []).append(res)
    for ref, got in zip(outs[False][0], outs[True][0]):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for ref, got in zip(outs[False][0], outs[True][1]):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
