"""Launching a compiled Triton kernel again without Triton's per-call argument binding.

``fn[grid](*args, **kw)`` binds every argument to the signature, specializes each one (a pointer's
dtype and 16-byte alignment, an integer's divisibility by 16 and width), formats a cache key and
checks the kernel's globals before it calls the compiled kernel's launcher. On the H200 machine's
CPU that was 30-70 us a launch (session 11, run s11-j), and a training step at 64 tokens launches
~10 kernels: such steps are host-bound.

``Launcher(fn)[grid](*args, **kw)`` is the same call. The first call of a given key goes through
Triton (compiling when needed) and keeps the compiled kernel it launched; later calls with the
same key call that kernel's launcher directly. The key holds at least what Triton specializes on:
    a tensor          its dtype and whether its address is a multiple of 16 bytes
    a descriptor      its base's dtype and alignment, its shape, strides and block shape
    anything else     its type and exact value (integers, bools, floats, None)
    every keyword     constexpr values and launch options (num_warps, num_stages, launch_pdl)
    the device
so two calls with one key compile to one kernel. Falls back to Triton's own path under the
interpreter, while a launch hook is set (profilers), and when ``ENABLED`` is False.
``MOEFLOW_LAUNCH_CHECK=1`` (the GPU tests) launches every call through Triton instead and checks
that Triton picked the very kernel the key had cached.
"""
from __future__ import annotations

import os

import torch

from triton import knobs
from triton.runtime.jit import JITFunction

_current_device = torch.cuda.current_device
try:  # what Triton's CUDA driver reads for the current stream (no Stream object made)
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - a torch without it
    def _raw_stream(device):
        return torch.cuda.current_stream(device).cuda_stream

ENABLED = os.environ.get("MOEFLOW_FAST_LAUNCH", "1") != "0"
CHECK = os.environ.get("MOEFLOW_LAUNCH_CHECK", "0") == "1"
MAX_ENTRIES = 256  # keys per kernel (token counts vary in serving); the cache starts over past it


def _arg_key(a):
    t = type(a)
    if t is int:  # most arguments (sizes, strides); a bool is (bool, value), never equal to 0 or 1
        return a
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.dtype, not (a.data_ptr() & 15)
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor):  # triton.tools.tensor_descriptor.TensorDescriptor
        return (t, base.dtype, not (base.data_ptr() & 15), tuple(a.shape), tuple(a.strides),
                tuple(a.block_shape), getattr(a, "padding", None), getattr(a, "round_f32_to_tf32", None))
    return t, a


class _Entry:
    __slots__ = ("launcher", "function", "packed", "tail", "kernel")

    def __init__(self, kernel, tail):
        self.kernel = kernel
        self.launcher = kernel.run
        self.function = kernel.function
        self.packed = kernel.packed_metadata
        self.tail = tail


class Launcher:
    """``Launcher(jit_fn)[grid](*args, **kwargs)``: see the module docstring."""

    def __init__(self, fn):
        self.fn = fn
        self.fast = isinstance(fn, JITFunction)  # not under the interpreter (an InterpretedFunction)
        self._cache: dict = {}
        if self.fast:
            self._names = list(fn.arg_names)
            self._defaults = [p.default for p in fn.params]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def _tail(self, nargs: int, kwargs: dict) -> tuple:
        """The values of the parameters after the positional ones, in signature order (keywords
        or defaults): the launcher takes every parameter, constexprs included."""
        return tuple(kwargs[n] if n in kwargs else self._defaults[i]
                     for i, n in enumerate(self._names) if i >= nargs)

    def run(self, grid, args: tuple, kwargs: dict):
        if not (self.fast and ENABLED) or _hooked():
            return self.fn[grid](*args, **kwargs)
        device = _current_device()
        key = (device, tuple(map(_arg_key, args)), tuple(kwargs.items()))
        try:
            entry = self._cache.get(key)
        except TypeError:  # an unhashable argument: no key, Triton's own path
            return self.fn[grid](*args, **kwargs)
        if entry is None or CHECK:
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            if entry is not None and entry.kernel is not kernel:
                raise RuntimeError(f"kernels.launch: the key of a {self.fn.__name__} launch picked another "
                                   f"compiled kernel than Triton's own specialization did: {key}")
            if entry is None and kernel is not None:
                if len(self._cache) >= MAX_ENTRIES:
                    self._cache.clear()
                self._cache[key] = _Entry(kernel, self._tail(len(args), kwargs))
            return kernel
        g = len(grid)
        entry.launcher(grid[0], grid[1] if g > 1 else 1, grid[2] if g > 2 else 1,
                       _raw_stream(device), entry.function, entry.packed,
                       None, None, None, *args, *entry.tail)
        return entry.kernel


def _hooked() -> bool:
    """Whether a launch hook is set (a HookChain with calls, or a plain function in other versions)."""
    rt = knobs.runtime
    return bool(getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)
                or getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook))
