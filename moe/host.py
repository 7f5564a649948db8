"""Keep the thread that drives decode steps on a fast CPU core.

A decode step of an offloaded model is host-bound: per layer the host reads the routing, updates the
cache's books and issues copies and launches, so the step's time follows how fast this thread runs
Python. On the H200 machine the same fixed Python loop ran at ~100 ns a turn on some cores and ~200 on
others, each core keeping its speed for seconds and the pattern shifting over minutes (run s24-e: six
sweeps over the 16 cores, ~0.2 s apart): a virtual machine's cores share physical ones with work the
guest cannot see, and the kernel's scheduler does not know which are slow. Decode steps on the engine's
path then ran at rates ~1.3-1.5x apart from one process to the next (BENCHMARKS 3o).

    pinner = HostPinner()      # on the thread that runs the steps
    pinner.check()             # before each step: cheap; every `every_s` seconds it times this core
                               # and, when it has slowed past `slack` x the best seen, sweeps the
                               # allowed cores and moves to the fastest

Only the calling thread is pinned (Linux: sched_setaffinity on thread id 0). Threads it starts later
inherit its one-core mask, so torch's intra-op pool is started first (one parallel op) and keeps the
whole mask, as does every thread that already exists; the pinner restores the thread's mask on
``release()``. Where the platform has no per-thread affinity (not Linux) the pinner does nothing.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable


def python_speed_ns(turns: int = 2000) -> float:
    """A fixed pure-Python loop on the calling thread, ns per turn (the faster of two): how fast the core
    the thread sits on runs the host's work right now."""
    best = float("inf")
    for _ in range(2):
        d: dict = {}
        t = time.perf_counter()
        for i in range(turns):
            d[i & 1023] = d.get(i & 1023, 0) + i
        best = min(best, (time.perf_counter() - t) / turns * 1e9)
    return best


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


class HostPinner:
    """Pins the calling thread to the fastest of its allowed cores and re-checks it now and then.

    every_s: seconds between checks of the current core (one ``python_speed_ns`` reading, ~0.2-0.4 ms);
    slack: a core reading more than ``slack`` x the fastest of the last sweep is left for a new sweep
    (one reading per allowed core, with the thread moved to each: ~5 ms on 16 cores);
    speed: the timer (tests pass a stand-in that reads the thread's core)."""

    def __init__(self, every_s: float = 2.0, slack: float = 1.25, cores: set[int] | None = None,
                 speed: Callable[[], float] = python_speed_ns, clock: Callable[[], float] = time.monotonic):
        if every_s <= 0 or slack < 1.0:
            raise ValueError(f"HostPinner needs every_s > 0 and slack >= 1 (got every_s={every_s}, slack={slack})")
        self.every_s, self.slack, self.speed, self.clock = every_s, slack, speed, clock
        self.enabled = can_pin()
        self._mask = set(os.sched_getaffinity(0)) if self.enabled else set()
        if cores is not None:
            bad = set(cores) - self._mask
            if self.enabled and bad:
                raise ValueError(f"cores {sorted(bad)} are not allowed to this thread (allowed: {sorted(self._mask)})")
            self._cores = sorted(cores)
        else:
            self._cores = sorted(self._mask)
        self.core: int | None = None   # where the thread is pinned (None: not pinned)
        self.thread: int | None = None  # the pinned thread's id
        self.best_ns = float("nan")    # the fastest core's reading at the last sweep
        self.readings: dict[int, float] = {}
        self.sweeps = 0
        self.moves = 0
        self._next = 0.0
        if self.enabled and len(self._cores) < 2:
            self.enabled = False       # one core: nothing to choose

    def sweep(self) -> int:
        """Time every allowed core (the thread moved onto each in turn) and pin to the fastest."""
        if not self.enabled:
            return -1
        _start_intra_op_pool()
        self.readings = {}
        for c in self._cores:
            os.sched_setaffinity(0, {c})
            self.readings[c] = self.speed()
        best = min(self._cores, key=lambda c: self.readings[c])
        os.sched_setaffinity(0, {best})
        if self.core is not None and best != self.core:
            self.moves += 1
        self.core, self.best_ns, self.thread = best, self.readings[best], threading.get_ident()
        self.sweeps += 1
        self._next = self.clock() + self.every_s
        return best

    def check(self) -> int | None:
        """Before a step: the first call sweeps; later calls, once every ``every_s``, time the current core
        and sweep again when it reads slower than ``slack`` x the last sweep's best. Returns the core."""
        if not self.enabled:
            return None
        if self.core is None or self.thread != threading.get_ident():
            return self.sweep()  # first call, or steps now driven from another thread: pin that one
        now = self.clock()
        if now < self._next:
            return self.core
        self._next = now + self.every_s
        if self.speed() > self.slack * self.best_ns:
            return self.sweep()
        return self.core

    def release(self) -> None:
        """Give the pinned thread its whole mask back (call it on that thread)."""
        if self.enabled and self.core is not None and self.thread == threading.get_ident():
            os.sched_setaffinity(0, self._mask)
            self.core = None


def _start_intra_op_pool() -> None:
    """Start torch's intra-op threads (if they are not yet) while this thread still has its whole mask:
    threads started after the pin would inherit its one core."""
    global _pool_started
    if _pool_started:
        return
    import torch
    if torch.get_num_threads() > 1:
        torch.ones(1 << 18).sum()  # a reduction large enough to run in parallel
    _pool_started = True


_pool_started = False
